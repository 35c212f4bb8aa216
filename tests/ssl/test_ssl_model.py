"""SSLViT: [CLS] after block L, outputs, bad input, and the exact token action."""

import pytest
import torch

from equivision.ssl import SSLViT, act_on_maps
from equivision.transforms import Dihedral, Scale, group_elements

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> SSLViT:
    torch.manual_seed(0)
    args = dict(image_size=16, patch_size=4, dim=32, depth=3, heads=2, cls_layer=2)
    args.update(kw)
    return SSLViT(**args)


def test_outputs_shapes_and_config_roundtrip():
    vit = tiny()
    x = torch.rand(3, 3, 16, 16)
    out = vit(x, n_last=1, all_tokens=True)
    assert out.cls.shape == (3, 32) and out.tokens.shape == (3, 32, 4, 4)
    assert len(out.last_cls) == 1 and torch.equal(out.last_cls[-1], out.cls)
    assert len(out.token_maps) == 3 and out.token_maps[0].shape == (3, 32, 4, 4)
    assert vit.grid == (4, 4) and vit.cls_layer == 2
    # rebuilt from config() with the same weights gives the same outputs
    twin = SSLViT(**vit.config())
    twin.load_state_dict(vit.state_dict())
    assert torch.equal(twin(x).cls, vit(x).cls)
    assert vit(x).token_maps is None and vit(x).last_cls == []


def test_last_cls_are_normed_cls_of_last_blocks():
    vit = tiny(cls_layer=0)
    x = torch.rand(2, 3, 16, 16)
    out = vit(x, n_last=3)
    assert len(out.last_cls) == 3
    # recompute by hand: [CLS] from the start, then final norm after each block
    t = torch.cat([vit.cls_token.expand(2, -1, -1), vit.embed(x)], 1)
    for i, blk in enumerate(vit.blocks):
        t = blk(t)
        torch.testing.assert_close(out.last_cls[i], vit.norm(t[:, 0]))
    with pytest.raises(ValueError, match="last 1 blocks"):
        tiny(cls_layer=2)(x, n_last=2)


def test_token_map_at_L_ignores_cls_and_later_blocks():
    vit = tiny()
    x = torch.rand(2, 3, 16, 16)
    before = vit(x)
    with torch.no_grad():
        vit.cls_token.add_(1.0)
        vit.blocks[2].mlp.fc1.weight.mul_(3.0)
        vit.norm.weight.mul_(2.0)
    after = vit(x)
    assert torch.equal(before.tokens, after.tokens)
    assert not torch.allclose(before.cls, after.cls)
    # the map is norm_l of the patch tokens leaving block L
    t = vit.embed(x)
    for blk in vit.blocks[:2]:
        t = blk(t)
    ref = vit.norm_l(t).transpose(1, 2).reshape(2, 32, 4, 4)
    torch.testing.assert_close(after.tokens, ref)


def test_bad_input_messages():
    with pytest.raises(ValueError, match="not a multiple of patch_size=4"):
        SSLViT(image_size=18, patch_size=4)
    with pytest.raises(ValueError, match="cls_layer"):
        SSLViT(image_size=16, patch_size=4, depth=3, cls_layer=3)
    vit = tiny()
    with pytest.raises(ValueError, match="expected 16x16 images, got 18x18.*multiple"):
        vit(torch.rand(1, 3, 18, 18))
    with pytest.raises(ValueError, match="3 channel"):
        vit(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        vit(torch.rand(3, 16, 16))


def _d4_symmetric_(conv: torch.nn.Conv2d) -> None:
    """Make every patch kernel invariant under D4 (sum over the 8 elements) with small
    integer weights and a dyadic bias, so that sums in any order are exact in float32 (a
    random float bias makes the first partial sum inexact, and a convolution that starts
    from the bias then rounds differently for a rotated patch's order of products)."""
    with torch.no_grad():
        w = torch.randint(-4, 5, conv.weight.shape).float()
        conv.weight.copy_(torch.stack([g.apply_map(w) for g in group_elements("p4m")]).sum(0))
        conv.bias.copy_(torch.randint(-8, 9, conv.bias.shape).float() / 4)


@pytest.mark.parametrize("g", group_elements("p4m"), ids=lambda g: g.name)
def test_token_action_is_exact_for_flips_and_rotations(g):
    """Without positions, g acting on the token map (a permutation of tokens) equals
    the tokens of the transformed image, exactly: for 1x1 patches with any weights,
    and for 4x4 patches whose kernels are D4-invariant (the in-patch content is
    transformed too, so a generic kernel cannot commute)."""
    x = torch.randint(0, 256, (2, 3, 16, 16)).float() / 256  # dyadic: exact sums
    for vit in (tiny(patch_size=1), tiny()):
        if vit.patch_size > 1:
            _d4_symmetric_(vit.patch_embed)
        h, w = vit.grid

        def tokens(img, vit=vit, h=h, w=w):
            return vit.embed(img, positions=False).transpose(1, 2).reshape(2, 32, h, w)

        acted = act_on_maps([g, g], tokens(x))
        assert torch.equal(acted, tokens(g.apply_image(x)))
        # positions break it (the test can fail): the learned positions do not move
        if not g.is_identity:
            with_pos = vit.embed(g.apply_image(x)).transpose(1, 2).reshape(2, 32, h, w)
            moved = act_on_maps([g, g], vit.embed(x).transpose(1, 2).reshape(2, 32, h, w))
            assert not torch.allclose(with_pos, moved)


def test_token_action_for_scaling_resamples_like_the_image():
    """Scaling acts on tokens with the same bilinear operator; on a smooth image with
    an averaging patch embedding it matches the tokens of the scaled image closely
    (not exactly: resampling does not commute with pooling)."""
    vit = tiny(image_size=32, in_channels=1, dim=4)
    with torch.no_grad():
        vit.patch_embed.weight.fill_(1 / 16)
        vit.patch_embed.bias.zero_()
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    x = (torch.sin(2 * xx) * torch.cos(1.5 * yy))[None, None]
    g = Dihedral(1) @ Scale(1.25, 0.75)

    def tokens(img):
        return vit.embed(img, positions=False).transpose(1, 2).reshape(1, 4, 8, 8)

    acted, direct = act_on_maps([g], tokens(x)), tokens(g.apply_image(x))
    mask = g.valid_mask((8, 8))
    err = (acted - direct)[..., mask].abs().max()
    assert err < 0.05 * direct.abs().max()
    assert not mask.all()  # zoom-out along one axis leaves an invalid border
