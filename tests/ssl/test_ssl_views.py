"""View policies, the batch partition and the relative elements g = g2 g1^-1."""

import warnings

import pytest
import torch

from equivision.ssl import (
    BasePolicy,
    EquivariantPolicy,
    Photometric,
    ViewSampler,
    check_patch_aligned,
    geometric_params,
    patch_aligned_scales,
)
from equivision.ssl.views import _clean
from equivision.transforms import Dihedral, Scale

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_images(b: int, size: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size),
                            indexing="ij")
    f = torch.arange(1, b + 1, dtype=torch.float32)[:, None, None, None]
    return torch.stack([0.5 + 0.4 * torch.sin(f * xx + 0.7 * yy),
                        0.5 + 0.4 * torch.cos(1.3 * xx - f * yy),
                        (0.5 + 0.3 * xx * yy).expand(b, 1, size, size)], 1).squeeze(2)


def test_patch_aligned_scales():
    assert patch_aligned_scales(32, 4) == [0.75, 1.0, 1.25]
    assert patch_aligned_scales(16, 4) == [1.0]
    assert patch_aligned_scales(224, 16) == pytest.approx([10 / 14, 12 / 14, 1, 16 / 14, 18 / 14])
    check_patch_aligned(1.25, 32, 4)
    with pytest.raises(ValueError, match="scale 0.8 leaves the patch grid"):
        check_patch_aligned(0.8, 32, 4)
    with pytest.raises(ValueError, match="leaves the patch grid"):  # 7 patches of 8: odd offset
        EquivariantPolicy(32, 4, scales=[0.875], canvas="fixed")
    with pytest.warns(UserWarning, match="no patch-aligned scale"):
        EquivariantPolicy(16, 4, canvas="fixed")


@pytest.mark.parametrize("size,scales", [(16, [1.0]), (32, [0.75, 1.0, 1.25])])
def test_relative_element_maps_view1_onto_view2(size, scales):
    """Jitter off: g(view1) == view2 exactly without scaling, and on the valid region
    up to resampling error with scaling."""
    x = smooth_images(6, size)
    eq = EquivariantPolicy(size, 4, scales=scales, photometric=Photometric.off(),
                           canvas="fixed")
    sampler = ViewSampler(BasePolicy(), eq, ratio=0.5)
    vb = sampler(x, gen(1))
    assert vb.eq_index.tolist() == [0, 1, 2]
    assert len(vb.g1) == len(vb.g2) == len(vb.relative) == 3
    for i, g in enumerate(vb.relative):
        v1, v2 = vb.views[0][i: i + 1], vb.views[1][i: i + 1]
        if g.exact:  # no scaling left: a single element of D4 in closed form
            assert isinstance(g, Dihedral)
        # view i is g_v applied to the original image
        torch.testing.assert_close(vb.views[0][i: i + 1], vb.g1[i].apply_image(x[i: i + 1]))
        moved = g.apply_image(v1)
        if g.exact:
            assert torch.equal(moved, v2)
        else:
            mask = g.valid_mask((size, size)) & vb.g2[i].valid_mask((size, size))
            err = (moved - v2)[..., mask].abs().mean()
            assert err < 0.05, (g, err)
            # a wrong element would not match: the identity leaves a large error
            assert (v1 - v2)[..., mask].abs().mean() > 2 * err or g == Dihedral(0)


def test_relative_elements_cover_the_group_and_scales_are_anisotropic():
    eq = EquivariantPolicy(32, 4, photometric=Photometric.off(), canvas="fixed")
    gs = eq.sample(200, gen(2))
    params = [geometric_params(g) for g in gs]
    assert {p[0] for p in params} == {0, 1, 2, 3}
    assert {p[1] for p in params} == {False, True}
    assert any(p[2] != p[3] for p in params)
    assert {p[2] for p in params} == {0.75, 1.0, 1.25}
    # S.S^-1 rounds to the identity: same element twice gives relative identity
    g = Dihedral(1, True) @ Scale(1.25, 0.75)
    sampler = ViewSampler(BasePolicy(), eq, 1.0)
    assert _clean(g @ g.inverse()) == Dihedral(0)
    assert sampler.n_equivariant(10) == 10


def test_partition_small_ratio_warns_once_and_is_empty():
    x = torch.rand(8, 3, 16, 16)
    eq = EquivariantPolicy(16, 4, scales=[1.0])
    sampler = ViewSampler(BasePolicy(), eq, ratio=0.01)
    with pytest.warns(UserWarning, match="without the SER term"):
        vb = sampler(x, gen())
    assert vb.eq_index.numel() == 0 and vb.relative == []
    assert [v.shape for v in vb.views] == [x.shape, x.shape]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler(x, gen())  # only once
        ViewSampler(BasePolicy(), None, ratio=0.0)(x, gen())  # r = 0 asked for: no warning
    with pytest.raises(ValueError, match="ratio"):
        ViewSampler(BasePolicy(), eq, ratio=1.5)


def test_views_reproducible_in_range_and_grayscale_ok():
    x = torch.rand(4, 3, 16, 16)
    eq = EquivariantPolicy(16, 4, scales=[1.0])
    sampler = ViewSampler(BasePolicy(), eq, ratio=0.5)
    a, b = sampler(x, gen(5)), sampler(x, gen(5))
    for va, vb in zip(a.views, b.views):
        assert torch.equal(va, vb)
        assert va.min() >= 0 and va.max() <= 1
    assert a.relative == b.relative
    assert not torch.equal(a.views[0], a.views[1])
    gray = torch.rand(4, 1, 16, 16)
    out = BasePolicy(photometric=Photometric(jitter_p=1.0, grayscale_p=1.0, blur_p=1.0,
                                             solarize_p=1.0))(gray, gen())
    assert out.shape == gray.shape and torch.isfinite(out).all()
    # photometric jitter really changes pixel values
    on = Photometric(jitter_p=1.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    assert not torch.allclose(on(x, gen()), x)
    assert torch.equal(Photometric.off()(x, gen()), x)


def test_base_policy_crops():
    """With crop area 1/4 and no flip / jitter, a crop is a zoomed-in sub-image: it
    differs from the image but is the resized content of one quarter."""
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(1, 1, 4, 4) / 16  # (1,1,16,16)
    pol = BasePolicy(crop_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0,
                     photometric=Photometric.off())
    torch.testing.assert_close(pol(x, gen()), x)  # a full-image crop is the identity
    small = BasePolicy(crop_scale=(0.25, 0.25), ratio=(1.0, 1.0), flip_p=0.0,
                       photometric=Photometric.off())
    assert not torch.allclose(small(x, gen()), x)
