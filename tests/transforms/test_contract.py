"""Contract tests over EVERY ``Transform`` subclass and every registered group model.

Each subclass of :class:`equivision.transforms.Transform` defined in equivision must have a
sample factory in :data:`FACTORIES` (a test fails for a subclass without one); the
contracts then run over its samples:

* inverse: ``g^-1 g x == x`` (exactly for pixel permutations and whole shifts, on the
  region both steps keep valid; approximately there for interpolated ones),
* composition: ``(g @ h) x == g(h x)`` (same regions and tolerances),
* ``act`` for every layout kind: map (with a stride), group map p4 / p4m (where
  defined), tokens with a prefix token, vector,
* shape preservation, ``valid_mask``'s shape, dtype and meaning, ``map_exact`` agreeing
  with the action, and ``gradcheck`` of ``apply_image`` (float64, tiny input).

Every registered model with group convolutions must be exactly equivariant, layer by
layer, at an input size that the exactness analyzer (:mod:`equivision.gcnn`) reports exact.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import equivision
from equivision.gcnn import GroupConv2d, nearest_exact_size
from equivision.models import create_model, list_models, model_defaults
from equivision.transforms import (
    ColorJitter,
    Compose,
    Dihedral,
    InexactActionError,
    Layout,
    Resize,
    Rotation,
    Scale,
    SubpixelShift,
    Transform,
    Translation,
    group_elements,
    hflip,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------
# discovery and sample factories
# ---------------------------------------------------------------------------------------
def _import_library() -> None:
    """Import every module of equivision so that every Transform subclass is defined."""
    for info in pkgutil.walk_packages(equivision.__path__, "equivision."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)


def transform_classes() -> list[type[Transform]]:
    """Every subclass of Transform (recursively) defined inside equivision."""
    _import_library()
    found: list[type[Transform]] = []
    todo = list(Transform.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith("equivision.") and cls not in found:
            found.append(cls)
    return sorted(found, key=lambda c: c.__qualname__)


@dataclass(frozen=True)
class Samples:
    """Sample instances of one Transform subclass and how to check them.

    Attributes:
        make: builds the samples.
        atol: tolerance of the inverse / composition checks for inexact (interpolated or
            clipped) samples, on smooth images and away from the border.
        undefined: layout kinds on which the class has no action at a fixed shape.
    """

    make: Callable[[], list[Transform]]
    atol: float = 0.0
    undefined: frozenset[str] = frozenset()


FACTORIES: dict[type[Transform], Samples] = {
    Dihedral: Samples(lambda: [Dihedral(k, f) for f in (False, True) for k in range(4)]),
    Translation: Samples(lambda: [Translation(2, -1), Translation(0, 2), Translation(-3, 3)]),
    Rotation: Samples(lambda: [Rotation(17.0), Rotation(-40.0)], atol=0.03),
    Scale: Samples(lambda: [Scale(0.8), Scale(1.25, 0.9)], atol=0.03),
    # Resize changes the grid: no action on group maps or tokens of a fixed shape
    Resize: Samples(lambda: [Resize(0.5), Resize(2.0)], atol=0.03,
                    undefined=frozenset({"group", "tokens"})),
    ColorJitter: Samples(lambda: [ColorJitter(0.1, 1.2), ColorJitter(-0.05, 0.9, 1.1, 5.0)],
                         atol=1e-4),
    SubpixelShift: Samples(lambda: [SubpixelShift(0.5, 0.5), SubpixelShift(-1.25, 0.75),
                                    SubpixelShift(2.0, 0.0)], atol=0.03),
    Compose: Samples(lambda: [Compose([Translation(1, 2), Rotation(10.0)]),
                              Compose([Scale(0.9), hflip()])], atol=0.03),
}

CLASSES = transform_classes()


def samples() -> list[tuple[type[Transform], Transform]]:
    return [(cls, g) for cls in CLASSES if cls in FACTORIES for g in FACTORIES[cls].make()]


SAMPLES = samples()
IDS = [repr(g) for _, g in SAMPLES]


def smooth(b: int = 2, c: int = 3, size: int = 12, dtype=torch.float32) -> Tensor:
    """``(b, c, size, size)`` smooth images in [0.3, 0.7] (interpolation is nearly exact)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size, dtype=dtype),
                            torch.linspace(-1, 1, size, dtype=dtype), indexing="ij")
    k = torch.arange(1, b * c + 1, dtype=dtype).reshape(b, c, 1, 1)
    return 0.5 + 0.1 * torch.sin(0.2 * k * xx + 0.5 * yy) + 0.1 * torch.cos(0.1 * xx * k - yy)


def still_valid(g: Transform, h: Transform, shape: tuple[int, int]) -> Tensor:
    """``(h', w')`` bool: positions of ``g(h x)`` whose value comes, through both steps,
    from inside ``x``, shrunk by one position (bilinear borders)."""
    inner = h.valid_mask(shape).to(torch.float32)[None, None]
    kept = (g.apply_map(inner) > 1 - 1e-3)[0, 0] & g.valid_mask(tuple(inner.shape[-2:]))
    return -F.max_pool2d(-kept.float()[None, None], 3, 1, 1)[0, 0] > 0.5


def assert_agree(a: Tensor, b: Tensor, mask: Tensor, g: Transform, atol: float) -> None:
    assert a.shape == b.shape
    assert mask.any(), f"{g!r}: nothing left to compare"
    if g.exact and not g.photometric:
        assert torch.equal(a[..., mask], b[..., mask])
    else:
        torch.testing.assert_close(a[..., mask], b[..., mask], rtol=0, atol=atol)


def out_shape(g: Transform, shape: tuple[int, int]) -> tuple[int, int]:
    return g.output_size(shape) if isinstance(g, Resize) else shape


# ---------------------------------------------------------------------------------------
# every subclass has a factory
# ---------------------------------------------------------------------------------------
def test_every_transform_subclass_has_a_sample_factory():
    assert {Dihedral, Translation, Compose} <= set(CLASSES)
    missing = [f"{c.__module__}.{c.__qualname__}" for c in CLASSES if c not in FACTORIES]
    assert not missing, f"add sample factories to tests/transforms/test_contract.py: {missing}"
    stale = [c.__qualname__ for c in FACTORIES if c not in CLASSES]
    assert not stale, f"factories for classes that no longer exist: {stale}"
    for cls, g in SAMPLES:
        assert type(g) is cls


# ---------------------------------------------------------------------------------------
# per-sample contracts
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,g", SAMPLES, ids=IDS)
def test_inverse(cls, g):
    x = smooth()
    y = g.inverse()(g(x))
    assert y.shape == x.shape
    assert_agree(y, x, still_valid(g.inverse(), g, x.shape[-2:]), g, FACTORIES[cls].atol)


@pytest.mark.parametrize("cls,g", SAMPLES, ids=IDS)
def test_composition_acts_as_h_then_g(cls, g):
    x = smooth()
    partners = [h for _, h in SAMPLES if type(h) is cls][:2] + [Translation(1, 0), hflip()]
    for h in partners:
        for first, then in ((h, g), (g, h)):
            both = then @ first
            expected = then(first(x))
            tol = max(FACTORIES[type(first)].atol, FACTORIES[type(then)].atol)
            mask = still_valid(then, first, x.shape[-2:])
            assert_agree(both(x), expected, mask, both, tol)


@pytest.mark.parametrize("cls,g", SAMPLES, ids=IDS)
def test_shapes_and_map_action(cls, g):
    x = smooth(2, 3, 8)
    assert g(x).shape == (2, 3, *out_shape(g, (8, 8)))
    assert torch.equal(g(x), g.apply_image(x))
    m = torch.randn(2, 5, 8, 8)
    for stride in (1, 2, (2, 4)):
        layout = Layout("map", stride=stride if isinstance(stride, tuple) else (stride,) * 2)
        if g.map_exact((8, 8), stride):
            out = g.act(m, layout)
            assert torch.equal(out, g.apply_map(m, stride))
            assert out.shape == (2, 5, *out_shape(g, (8, 8)))
        else:  # map_exact agrees with the action: no silent rounding
            with pytest.raises(InexactActionError):
                g.act(m, layout)


@pytest.mark.parametrize("cls,g", SAMPLES, ids=IDS)
def test_group_map_action(cls, g):
    if "group" in FACTORIES[cls].undefined:
        return
    for group, order in (("p4", 4), ("p4m", 8)):
        y = torch.randn(2, 3, order, 6, 6)
        layout = Layout("group", group=group)
        try:
            perm = g.group_permutation(group)
        except InexactActionError:  # e.g. a flip on p4: not defined, and says so
            with pytest.raises(InexactActionError):
                g.act(y, layout)
            continue
        out = g.act(y, layout)
        assert out.shape == y.shape
        spatial = torch.stack([g.apply_map(y[:, :, i]) for i in range(order)], 2)
        expected = spatial if perm is None else spatial[:, :, perm]
        assert perm is None or sorted(perm) == list(range(order))
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls,g", SAMPLES, ids=IDS)
def test_token_and_vector_action(cls, g):
    v = torch.randn(3, 7)
    assert torch.equal(g.act(v, Layout("vector")), v)
    if "tokens" in FACTORIES[cls].undefined:
        return
    tokens = torch.randn(2, 1 + 36, 5)
    out = g.act(tokens, Layout("tokens", grid=(6, 6), prefix=1))
    assert out.shape == tokens.shape
    assert torch.equal(out[:, 0], tokens[:, 0])  # the [CLS] token is left as it is
    grid = tokens[:, 1:].transpose(1, 2).reshape(2, 5, 6, 6)
    moved = g.apply_map(grid).reshape(2, 5, 36).transpose(1, 2)
    torch.testing.assert_close(out[:, 1:], moved, rtol=0, atol=0)


@pytest.mark.parametrize("cls,g", SAMPLES, ids=IDS)
def test_valid_mask_shape_dtype_and_meaning(cls, g):
    for shape, stride in (((8, 8), 1), ((6, 6), 2)):
        if not g.map_exact(shape, stride):
            continue
        mask = g.valid_mask(shape, stride)
        assert mask.dtype == torch.bool and mask.shape == out_shape(g, shape)
        # valid <=> the position's value comes entirely from inside the map
        ones = g.apply_map(torch.ones(1, 1, *shape), stride)[0, 0]
        assert torch.equal(mask, ones > 1 - 1e-3)
        # and only there does a constant offset of the map come through in full
        x = torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(1))
        gap = g.apply_map(x + 1.0, stride) - g.apply_map(x, stride)
        torch.testing.assert_close(gap[0, 0][mask], torch.ones(int(mask.sum())))
        assert (gap[0, 0][~mask] < 1 - 1e-3).all()


@pytest.mark.parametrize("cls,g", SAMPLES, ids=IDS)
def test_gradcheck_apply_image(cls, g):
    gen = torch.Generator().manual_seed(0)
    x = (0.3 + 0.4 * torch.rand(1, 3, 5, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(g.apply_image, (x,), eps=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------------------
# group laws with hypothesis
# ---------------------------------------------------------------------------------------
d4 = st.builds(Dihedral, st.integers(0, 3), st.booleans())
shifts = st.builds(Translation, st.integers(-4, 4), st.integers(-4, 4))


@settings(max_examples=40, deadline=None)
@given(d4, d4)
def test_d4_is_closed_and_acts_on_group_maps_as_a_group(g, h):
    assert isinstance(g @ h, Dihedral) and (g @ h) in group_elements("p4m")
    y = torch.randn(1, 2, 8, 4, 4)
    layout = Layout("group", group="p4m")
    assert torch.equal((g @ h).act(y, layout), g.act(h.act(y, layout), layout))
    assert torch.equal(g.inverse().act(g.act(y, layout), layout), y)


@settings(max_examples=40, deadline=None)
@given(shifts, shifts, st.sampled_from([1, 2]))
def test_shifts_compose_by_adding_and_keep_their_valid_region(g, h, stride):
    assert g @ h == Translation(g.dx + h.dx, g.dy + h.dy)
    m = torch.randn(1, 2, 8, 8)
    if not (g.map_exact((8, 8), stride) and h.map_exact((8, 8), stride)):
        return
    kept = (g.apply_map(h.valid_mask((8, 8), stride).float()[None, None], stride) > 0.5)[0, 0]
    mask = kept & g.valid_mask((8, 8), stride)
    both, seq = (g @ h).apply_map(m, stride), g.apply_map(h.apply_map(m, stride), stride)
    assert torch.equal(both[..., mask], seq[..., mask])
    assert torch.equal(seq[..., ~mask], torch.zeros_like(seq[..., ~mask]))


# ---------------------------------------------------------------------------------------
# every registered group model is exactly equivariant at an exact size
# ---------------------------------------------------------------------------------------
#: tiny settings per group model: (keyword arguments, size to search an exact size from)
TINY_GROUP_MODELS: dict[str, tuple[dict, int]] = {
    "p4cnn": ({"width": 2}, 28),
    "p4resnet44": ({"depth": 8, "width": 0.25}, 9),
    "p4resnet18": ({"width": 0.125, "num_classes": 10}, 33),
}


def _has_group_convs(name: str) -> bool:
    with torch.device("meta"):
        return any(isinstance(m, GroupConv2d) for m in create_model(name).modules())


def group_models() -> list[str]:
    return [n for n in list_models()
            if re.search(r"p4|gcnn", n) or "group" in model_defaults(n) or _has_group_convs(n)]


def test_every_group_model_has_a_tiny_setting():
    names = group_models()
    assert {"p4cnn", "p4resnet44"} <= set(names)
    missing = [n for n in names if n not in TINY_GROUP_MODELS]
    assert not missing, f"add tiny settings to TINY_GROUP_MODELS: {missing}"


@pytest.mark.parametrize("group", ["p4", "p4m"])
@pytest.mark.parametrize("name", sorted(TINY_GROUP_MODELS))
def test_group_model_is_exactly_equivariant_at_an_exact_size(name, group):
    kwargs, start = TINY_GROUP_MODELS[name]
    if "group" in model_defaults(name):
        kwargs = {**kwargs, "group": group}
    elif group != "p4":
        pytest.skip(f"{name} has one group")
    torch.manual_seed(0)
    model = create_model(name, **kwargs).double().eval()
    _, size = nearest_exact_size(model, start, group=group)
    assert size is not None, f"no exact size from {start} px for {name} ({group})"
    captured: list[Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: captured.append(out))
             for m in model.modules() if isinstance(m, GroupConv2d)]
    x = torch.randn(2, kwargs.get("in_channels", model_defaults(name)["in_channels"]),
                    size, size, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
        ref, captured[:] = list(captured), []
        for g in group_elements(group)[1:]:
            moved = model(g(x))
            tol = 1e-5 * float(logits.abs().max())
            torch.testing.assert_close(moved, g.act(logits, Layout("vector")), rtol=0, atol=tol)
            for y, gy in zip(ref, captured):  # every group conv layer, as a group map
                expected = g.act(y, Layout("group", group=group))
                torch.testing.assert_close(gy, expected, rtol=0,
                                           atol=1e-5 * float(y.abs().max()))
            captured[:] = []
    for h in hooks:
        h.remove()
    assert len(ref) >= 2
