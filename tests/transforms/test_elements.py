"""Per-image elements: one Transform per image, grouped so that the work stays batched."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from equivision.transforms import (
    ColorJitter,
    Dihedral,
    Layout,
    Resize,
    Rotation,
    Scale,
    ShapeError,
    Translation,
    hflip,
    identity,
    rot90,
)
from equivision.transforms.elements import ElementBatch, act_on_maps, valid_masks

MIXED = [rot90(1), Translation(1, -2), hflip(), rot90(1), Scale(0.8), Translation(1, -2),
         identity(), Rotation(20.0)]


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def one_by_one(elements, x, fn):
    return torch.cat([fn(g, x[i: i + 1]) for i, g in enumerate(elements)])


def test_groups_equal_elements_in_order_of_first_appearance():
    e = ElementBatch(MIXED)
    assert e.distinct == (rot90(1), Translation(1, -2), hflip(), Scale(0.8), identity(),
                          Rotation(20.0))
    assert e.group_ids == [0, 1, 2, 0, 3, 1, 4, 5]
    assert len(e) == 8 and e[2] == hflip() and list(e) == MIXED
    assert e[1:3] == ElementBatch([Translation(1, -2), hflip()])
    assert ElementBatch.repeat(hflip(), 3) == ElementBatch([hflip()] * 3)


class CountingFlip(Dihedral):
    """hflip that counts its calls (each distinct element must act once per batch)."""

    calls = 0

    def apply_map(self, x, stride=1.0):
        CountingFlip.calls += 1
        return super().apply_map(x, stride)


def test_each_distinct_element_acts_once_on_its_sub_batch():
    CountingFlip.calls = 0
    x = rand(6, 2, 5, 5)
    flips = [CountingFlip(0, True) if i % 2 else Dihedral(0) for i in range(6)]
    out = ElementBatch(flips).apply_image(x)
    assert CountingFlip.calls == 1
    torch.testing.assert_close(out[1::2], x[1::2].flip(-1), rtol=0, atol=0)
    torch.testing.assert_close(out[::2], x[::2], rtol=0, atol=0)


def test_images_maps_and_masks_match_image_by_image():
    e = ElementBatch(MIXED)
    x = rand(8, 3, 9, 9)
    torch.testing.assert_close(e.apply_image(x),
                               one_by_one(e, x, lambda g, t: g.apply_image(t)))
    assert torch.equal(e(x), e.apply_image(x))
    m = rand(8, 4, 6, 6, seed=1)  # stride 1: every shift is whole
    torch.testing.assert_close(e.apply_map(m), one_by_one(e, m, lambda g, t: g.apply_map(t)))
    torch.testing.assert_close(act_on_maps(MIXED, m), e.apply_map(m))
    masks = e.valid_masks((6, 6))
    assert masks.shape == (8, 6, 6) and masks.dtype == torch.bool
    assert torch.equal(masks, torch.stack([g.valid_mask((6, 6)) for g in MIXED]))
    assert torch.equal(valid_masks(MIXED, (6, 6)), masks)
    assert masks[0].all() and not masks[1].all()  # rot90 keeps all, the shift a border


def test_stride_reaches_every_element():
    e = ElementBatch([Translation(2, 0), Translation(0, 4), hflip()])
    m = rand(3, 2, 4, 4)
    out = e.apply_map(m, stride=2)
    torch.testing.assert_close(out, one_by_one(e, m, lambda g, t: g.apply_map(t, 2)))
    assert e.valid_masks((4, 4), stride=2)[1, :2].logical_not().all()
    with pytest.raises(Exception, match="whole number"):
        ElementBatch([Translation(1, 0), hflip()]).apply_map(m[:2], stride=2)


def test_group_maps_tokens_vectors_and_layouts():
    e = ElementBatch([rot90(1), rot90(2), hflip(), rot90(1)])
    gm = rand(4, 2, 8, 5, 5)
    ref = one_by_one(e, gm, lambda g, t: g.apply_group_map(t, "p4m"))
    torch.testing.assert_close(e.apply_group_map(gm, "p4m"), ref)
    torch.testing.assert_close(e.act(gm, Layout("group", group="p4m")), ref)
    tokens = rand(4, 1 + 9, 6)
    ref = one_by_one(e, tokens, lambda g, t: g.apply_tokens(t, (3, 3), prefix=1))
    torch.testing.assert_close(e.apply_tokens(tokens, (3, 3), prefix=1), ref)
    torch.testing.assert_close(e.act(tokens, Layout("tokens", grid=(3, 3), prefix=1)), ref)
    assert torch.equal(e.apply_tokens(tokens, (3, 3), prefix=1)[:, 0], tokens[:, 0])
    vec = rand(4, 7)
    assert torch.equal(e.act(vec, Layout("vector")), vec)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.builds(Dihedral, st.integers(0, 3), st.booleans()), min_size=1, max_size=6),
       st.lists(st.builds(Translation, st.integers(-2, 2), st.integers(-2, 2)),
                min_size=6, max_size=6))
def test_inverse_and_composition_are_element_wise(rots, shifts):
    g = ElementBatch(rots)
    h = ElementBatch(shifts[: len(rots)])
    x = rand(len(rots), 2, 6, 6)
    assert torch.equal(g.inverse().apply_image(g.apply_image(x)), x)
    assert g.inverse() == ElementBatch([r.inverse() for r in rots])
    assert torch.equal((g @ h).apply_image(x), g.apply_image(h.apply_image(x)))
    assert (g @ h) == ElementBatch([a @ b for a, b in zip(rots, h)])
    assert torch.equal((g @ hflip()).apply_image(x), g.apply_image(x.flip(-1)))


def test_gradients_flow_to_every_image():
    e = ElementBatch([Scale(0.8), rot90(1), Scale(0.8)])
    x = rand(3, 1, 5, 5, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(e.apply_image, (x,))
    m = rand(3, 2, 4, 4, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: e.apply_map(t), (m,))


def test_one_group_and_empty_batches():
    x = rand(3, 1, 4, 4)
    assert torch.equal(ElementBatch.repeat(rot90(1), 3).apply_image(x), rot90(1)(x))
    empty = ElementBatch([])
    assert empty.apply_map(x[:0]).shape == (0, 1, 4, 4)
    assert empty.valid_masks((4, 4)).shape == (0, 4, 4)


def test_photometric_elements_act_on_images_only():
    e = ElementBatch([ColorJitter(brightness=0.1), identity()])
    x = rand(2, 3, 4, 4) * 0.5
    torch.testing.assert_close(e.apply_image(x)[0], x[0] + 0.1)
    assert torch.equal(e.apply_map(x), x)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="2 elements for a tensor of shape"):
        ElementBatch([hflip(), hflip()]).apply_image(rand(3, 1, 4, 4))
    with pytest.raises(TypeError, match="element 1 is a str"):
        ElementBatch([hflip(), "rot90"])  # type: ignore[list-item]
    with pytest.raises(ShapeError, match="different shapes"):
        ElementBatch([Resize(0.5), Resize(2.0)]).apply_image(rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="cannot compose 2 elements with 1"):
        ElementBatch([hflip(), hflip()]) @ ElementBatch([hflip()])
    with pytest.raises(TypeError):
        ElementBatch([hflip()]).compose("hflip")  # type: ignore[arg-type]
