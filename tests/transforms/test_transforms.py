"""Group laws and actions of the shared transformation abstraction."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from equivision.transforms import (
    ColorJitter,
    Compose,
    Dihedral,
    InexactActionError,
    Layout,
    Rotation,
    Scale,
    ShapeError,
    Translation,
    group_elements,
    hflip,
    parse_transforms,
    rot90,
    vflip,
)

d4 = st.builds(Dihedral, st.integers(0, 3), st.booleans())
shifts = st.builds(Translation, st.integers(-5, 5), st.integers(-5, 5))


def img(seed=0, shape=(2, 3, 9, 9)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g)


@settings(max_examples=60, deadline=None)
@given(d4, d4)
def test_d4_composition_matches_sequential_action(g, h):
    x = img()
    assert torch.equal((g @ h)(x), g(h(x)))


@settings(max_examples=30, deadline=None)
@given(d4)
def test_d4_inverse(g):
    x = img()
    assert torch.equal(g.inverse()(g(x)), x)
    assert (g @ g.inverse()).is_identity


def test_named_elements():
    x = img()
    assert torch.equal(hflip()(x), x.flip(-1))
    assert torch.equal(vflip()(x), x.flip(-2))
    assert torch.equal(rot90(1)(x), torch.rot90(x, 1, (-2, -1)))
    assert (hflip() @ hflip()).is_identity
    assert len({Dihedral(k, f) for k in range(4) for f in (0, 1)}) == 8


def test_rot90_on_non_square_is_a_shape_error():
    with pytest.raises(ShapeError, match="square"):
        rot90(1)(torch.zeros(1, 1, 4, 5))
    assert rot90(2)(torch.ones(1, 1, 4, 5)).shape == (1, 1, 4, 5)


@settings(max_examples=40, deadline=None)
@given(shifts, shifts)
def test_translation_composition_and_mask(g, h):
    x = img(shape=(1, 1, 12, 12))
    gh = g @ h
    assert isinstance(gh, Translation)
    # on the positions valid for both steps, sequential and composed actions agree
    valid = h.valid_mask((12, 12)) & g.valid_mask((12, 12))
    both = g.apply_map(h.valid_mask((12, 12)).float()[None, None])[0, 0] > 0.5
    m = valid & both
    assert torch.allclose(gh(x)[0, 0][m], g(h(x))[0, 0][m])


def test_translation_semantics_and_no_wraparound():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y = Translation(1, 2)(x)  # right by 1, down by 2
    assert y[0, 0, 2, 1] == x[0, 0, 0, 0]
    assert y[0, 0, :2].abs().sum() == 0 and y[0, 0, :, 0].abs().sum() == 0
    mask = Translation(1, 2).valid_mask((4, 4))
    assert mask.sum() == 2 * 3 and not mask[0, 0] and mask[3, 3]


def test_translation_on_strided_maps_is_exact_or_reported():
    t = Translation(4, 2)
    fmap = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(t.apply_map(fmap, stride=2), Translation(2, 1)(fmap))
    assert t.map_exact((4, 4), 2) and not t.map_exact((4, 4), 4)
    with pytest.raises(InexactActionError, match="stride"):
        t.apply_map(fmap, stride=4)


def test_rotation_agrees_with_rot90_and_inverse():
    x = img(shape=(1, 2, 11, 11))
    assert torch.allclose(Rotation(90)(x), rot90(1)(x), atol=1e-5)
    assert not Rotation(90).exact and rot90(1).exact
    r = Rotation(20)
    yy, xx = torch.meshgrid(torch.arange(21.0), torch.arange(21.0), indexing="ij")
    smooth = torch.sin(yy / 4 + xx / 5)[None, None]
    back = r.inverse()(r(smooth))
    core = (yy - 10) ** 2 + (xx - 10) ** 2 <= 8**2  # away from the invalid corners
    assert (back - smooth)[..., core].abs().max() < 0.05  # two bilinear resamplings
    assert (Rotation(10) @ Rotation(20)).angle == 30


def test_rotation_mask_marks_corners_invalid():
    m = Rotation(45).valid_mask((15, 15))
    assert not m[0, 0] and m[7, 7] and 0.5 < m.float().mean() < 0.9


def test_scale_anisotropic_and_mask():
    cols = torch.arange(21.0)
    x = torch.exp(-((cols - 16) ** 2) / 8).expand(1, 1, 21, 21).clone()
    y = Scale(0.5, 1.0)(x)  # halve widths about the centre: column 16 -> 13
    row = y[0, 0, 10]
    assert abs(float((row * cols).sum() / row.sum()) - 13) < 0.1
    assert torch.allclose(y[0, 0, 0], y[0, 0, 20])  # heights unchanged
    m = Scale(0.5)(torch.ones(1, 1, 21, 21))[0, 0] > 0.999
    assert m[10, 10] and not m[0, 0]
    assert torch.equal(Scale(0.5).valid_mask((21, 21)), m)
    assert isinstance(Scale(2.0) @ Scale(0.5), Scale) and (Scale(2) @ Scale(0.5)).exact


def test_color_jitter_acts_on_images_only():
    x = img()
    j = ColorJitter(0.1, 1.2, 0.8, 10)
    y = j(x)
    assert not torch.allclose(y, x) and y.min() >= 0 and y.max() <= 1
    assert torch.equal(j.apply_map(x, 4), x) and j.photometric
    assert torch.equal(j.act(torch.ones(2, 5), Layout("vector")), torch.ones(2, 5))
    with pytest.raises(ValueError, match="RGB"):
        j(torch.rand(1, 1, 4, 4))
    mild = ColorJitter(0.05, 1.1)
    z = torch.rand(1, 1, 5, 5) * 0.5 + 0.2
    assert torch.allclose(mild.inverse()(mild(z)), z, atol=1e-5)


def test_compose_mixed_and_inverse():
    x = img(shape=(1, 1, 10, 10))
    c = Translation(1, 0) @ rot90(1)
    assert isinstance(c, Compose)
    assert torch.equal(c(x), Translation(1, 0)(rot90(1)(x)))
    inv = c.inverse()
    m = c.valid_mask((10, 10))
    assert torch.equal(c(inv(c(x)))[0, 0][m], c(x)[0, 0][m])


@settings(max_examples=30, deadline=None)
@given(d4, d4)
def test_group_axis_permutation_is_a_representation(g, h):
    for group in ("p4m",) + (("p4",) if not (g.flip or h.flip) else ()):
        pg, ph, pgh = g.group_permutation(group), h.group_permutation(group), (
            g @ h).group_permutation(group)
        # (g·(h·f))[i] = (h·f)[pg[i]] = f[ph[pg[i]]]
        assert pgh == [ph[pg[i]] for i in range(len(pg))]


def test_p4_group_map_action_rotates_and_rolls():
    x = torch.randn(2, 3, 4, 5, 5)
    y = rot90(1).apply_group_map(x, "p4")
    assert torch.equal(y[:, :, 1], torch.rot90(x[:, :, 0], 1, (-2, -1)))
    assert torch.equal(y[:, :, 0], torch.rot90(x[:, :, 3], 1, (-2, -1)))
    with pytest.raises(InexactActionError, match="p4m"):
        hflip().apply_group_map(x, "p4")
    assert [e.name for e in group_elements("p4")] == ["identity", "rot90", "rot180", "rot270"]


def test_token_action_moves_patches_keeps_cls():
    b, h, w, c = 2, 3, 3, 4
    grid = torch.randn(b, c, h, w)
    cls = torch.randn(b, 1, c)
    tokens = torch.cat([cls, grid.reshape(b, c, h * w).transpose(1, 2)], 1)
    out = rot90(1).act(tokens, Layout("tokens", grid=(h, w), prefix=1))
    assert torch.equal(out[:, :1], cls)
    assert torch.equal(out[:, 1:].transpose(1, 2).reshape(b, c, h, w), rot90(1)(grid))
    with pytest.raises(ValueError, match="grid"):
        rot90(1).apply_tokens(tokens, (2, 2), prefix=1)


def test_actions_are_differentiable():
    x = img(shape=(1, 3, 8, 8)).requires_grad_()
    for t in parse_transforms("rot90:1,hflip,shift:2,rotate:15,scale:1.3x0.8,jitter:0.1/1.2/0.9/5"):
        x.grad = None
        t(x).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all(), t.name


def test_parse_transforms_and_errors():
    names = [t.name for t in parse_transforms("rot90, flip, shift:1-3, rotate:15, scale:1.2x0.8")]
    assert names == ["rot90", "rot180", "rot270", "hflip", "vflip", "shift(1,1)", "shift(2,2)",
                     "shift(3,3)", "rotate(15)", "scale(1.2x0.8)"]
    assert [t.name for t in parse_transforms("rot90:1,3")] == ["rot90", "rot270"]
    assert len(parse_transforms("d4")) == 7
    with pytest.raises(ValueError, match="valid entries"):
        parse_transforms("twirl")
    with pytest.raises(ValueError, match="range"):
        parse_transforms("shift:a-b")
    with pytest.raises(ValueError, match="no transformation"):
        parse_transforms("")


def test_bad_image_input():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        rot90(1)(torch.zeros(4, 4))
    with pytest.raises(TypeError, match="floating"):
        rot90(1)(torch.zeros(1, 1, 4, 4, dtype=torch.uint8))


@pytest.mark.parametrize("h,w", [(28, 28), (16, 23), (7, 5)])
def test_rotation_and_scale_match_kornia_on_any_map(h, w):
    """The cached-grid warps give kornia's rotate / scale (align_corners=True)."""
    import kornia.geometry.transform as KT

    from equivision.transforms import Rotation, Scale

    x = torch.randn(3, 2, h, w, generator=torch.Generator().manual_seed(h * w))
    for angle in (15.0, -15.0, 37.5, 200.0):
        ref = KT.rotate(x, torch.full((3,), angle), mode="bilinear", padding_mode="zeros",
                        align_corners=True)
        assert torch.allclose(Rotation(angle).apply_map(x), ref, atol=1e-4)
    for sx, sy in ((1.3, 0.7), (0.5, 0.5)):
        ref = KT.scale(x, torch.tensor([[sx, sy]]).expand(3, 2), mode="bilinear",
                       padding_mode="zeros", align_corners=True)
        assert torch.allclose(Scale(sx, sy).apply_map(x), ref, atol=1e-4)
