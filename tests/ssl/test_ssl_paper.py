"""SER as the paper defines it (issue 15): the lambda = 0 baseline, the padding-free
validity mask, T_eq without cropping and the centred equivariance score."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch

from equivision.data import ImageDataset, photos
from equivision.measure.compare import per_image_cosine
from equivision.ssl import (
    BasePolicy,
    EquivariantPolicy,
    Photometric,
    SERConfig,
    SSLViT,
    ViewBatch,
    ViewSampler,
    build_method,
)
from equivision.ssl.losses import PatchNTXent
from equivision.ssl.probe import KNNMonitor, centred_cosine, equivariance_scores
from equivision.ssl.views import (
    _clean,
    act_on_canvas,
    canvas_grids,
    canvas_shape,
    geometric_params,
    pair_valid_masks,
    patch_aligned_scales,
)
from equivision.transforms import Dihedral, Scale, hflip, rot90
from equivision.transforms.elements import ElementBatch

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]


def _ser_experiment():
    spec = importlib.util.spec_from_file_location("ser_experiment", ROOT / "experiments/ser.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


# ------------------------------------------------------------------ fix 5: the baseline
def test_control_is_paper_config_with_lambda_zero_and_same_ratio():
    for method in ("mocov3", "dino", "barlow"):
        ctl, ser = SERConfig.control(method), SERConfig.paper(method)
        assert ctl.weight == 0.0 and ser.weight == 0.5
        assert ctl.tau == ser.tau and ctl.layer == ser.layer and ctl.variant == ser.variant
        # the same partition ratio r: baseline and SER see the same views
        assert SERConfig.default_ratio(ctl) == SERConfig.default_ratio(ser) == SERConfig.RATIO
    assert SERConfig.control("mocov3", weight=3.0, proj_dim=8).weight == 0.0
    assert SERConfig.control("mocov3", proj_dim=8).proj_dim == 8
    arms = SERConfig.arms("dino")
    assert list(arms) == ["baseline", "ser", "plain"]
    assert arms["baseline"] == SERConfig.control("dino") and arms["plain"] is None


def test_experiment_baselines_are_the_lambda_zero_control():
    mod = _ser_experiment()
    for study in ("table2", "layers", "everylayer"):
        args = argparse.Namespace(study=study)
        runs = mod.study_runs(args, mod.QUICK)
        baselines = [kw for label, kw in runs if "SER" not in label]
        assert baselines, study
        for kw in baselines:  # never the plain method: the baseline keeps T_eq and r
            assert kw["ser"] is not None and kw["ser"]["weight"] == 0.0


# ------------------------------------------------------- fix 4: the centred score
def _photo_maps(g, n: int = 12):
    torch.manual_seed(0)
    enc = SSLViT(image_size=32, patch_size=4, dim=32, depth=2, heads=2, cls_layer=1).eval()
    x = photos("test", size=32, patches_per_image=4, seed=0).images[:n]
    with torch.no_grad():
        return enc, x, enc(x, all_tokens=True).token_maps, enc(g(x), all_tokens=True).token_maps


def test_centred_score_tells_the_right_action_from_a_wrong_one():
    g = rot90(1)
    _, _, maps, moved = _photo_maps(g)
    for fx, fgx in zip(maps, moved):
        right = float(centred_cosine(fgx, g.apply_map(fx)).mean())
        for wrong in (rot90(3), hflip()):
            bad = float(centred_cosine(fgx, wrong.apply_map(fx)).mean())
            assert right > bad + 0.3, (right, bad)
            # the global cosine cannot: both near 1, within a few hundredths
            glob = per_image_cosine(fgx, g.apply_map(fx)).mean()
            assert abs(glob - per_image_cosine(fgx, wrong.apply_map(fx)).mean()) < 0.05


def test_centred_cosine_is_a_per_image_centred_cosine():
    a, b = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    shift = torch.randn(3, 4, 1, 1) * 10  # per-image channel offsets do not count
    torch.testing.assert_close(centred_cosine(a + shift, b), centred_cosine(a, b))
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[0] = False
    ca = a[..., 1:, :] - a[..., 1:, :].mean((2, 3), keepdim=True)
    cb = b[..., 1:, :] - b[..., 1:, :].mean((2, 3), keepdim=True)
    torch.testing.assert_close(centred_cosine(a, b, mask), per_image_cosine(ca, cb))
    torch.testing.assert_close(centred_cosine(a, a), torch.ones(3))


def test_equivariance_scores_report_the_centred_score():
    g = rot90(1)
    enc, x, maps, moved = _photo_maps(g, n=6)
    out = equivariance_scores(enc, ImageDataset(x, torch.zeros(6).long(), ["a"]), "rot90")
    ref = [float(centred_cosine(b, g.apply_map(a)).mean()) for a, b in zip(maps, moved)]
    assert out["centred"]["rot90"] == pytest.approx(ref, abs=1e-5)
    assert min(out["scores"]["rot90"]) > max(out["centred"]["rot90"])  # global stays high


# ------------------------------------------------ fix 2: no anchor from padding
def _zoomed_out_batch() -> ViewBatch:
    g1, g2 = [Scale(0.75), Scale(0.75, 1.0)], [Scale(0.75), Scale(1.0, 0.75)]
    rel = [_clean(b @ a.inverse()) for a, b in zip(g1, g2)]
    return ViewBatch([torch.zeros(2, 3, 32, 32)] * 2, torch.arange(2), g1, g2, rel)


def test_pair_masks_drop_the_padding_of_either_view():
    batch = _zoomed_out_batch()
    masks = batch.valid_masks((8, 8))
    centre = torch.zeros(8, 8, dtype=torch.bool)
    centre[1:7, 1:7] = True
    assert torch.equal(masks[0], centre)  # g = identity, yet both views are padded
    assert ElementBatch(batch.relative[:1]).valid_masks((8, 8)).all()  # the old mask
    # image 1: view 1 padded left/right, view 2 top/bottom: only the common centre
    assert torch.equal(masks[1], centre)
    assert torch.equal(pair_valid_masks(batch.g1, batch.g2, batch.relative, (8, 8)), masks)


def test_ser_loss_ignores_the_padded_border():
    torch.manual_seed(0)
    head = PatchNTXent(8, proj_dim=8, hidden=16)
    batch = _zoomed_out_batch()
    t1, t2 = torch.randn(2, 8, 8, 8), torch.randn(2, 8, 8, 8)
    valid = batch.valid_masks((8, 8))
    # each view's own padding, in its own frame
    pad1, pad2 = (~ElementBatch(g).valid_masks((8, 8))[:, None].expand_as(t1)
                  for g in (batch.g1, batch.g2))
    n1, n2 = t1.masked_fill(pad1, 5.0), t2.masked_fill(pad2, -5.0)
    ref = head(t1, t2, batch.relative, valid)
    torch.testing.assert_close(head(n1, n2, batch.relative, valid), ref)
    assert not torch.allclose(head(n1, n2, batch.relative), head(t1, t2, batch.relative))


# ------------------------------------ fix 3: canvases without cropping, any grid
def test_canvas_grids_follow_the_released_code():
    grids = canvas_grids(8)
    assert (8, 8) in grids and (6, 8) in grids and (10, 8) in grids
    for h, w in grids:
        assert 0.7 * 64 <= h * w <= 1.3 * 64 and 3 / 4 <= w / h <= 4 / 3
    assert (6, 6) not in grids and (6, 10) not in grids  # area / aspect out of range
    scales = {h / 8 for h, _ in grids}
    assert len(scales) > len(patch_aligned_scales(32, 4))  # more than {0.75, 1, 1.25}
    assert canvas_grids(4) and all(h * w >= 0.7 * 16 for h, w in canvas_grids(4))


def test_vit_encodes_any_patch_aligned_canvas():
    torch.manual_seed(0)
    enc = SSLViT(image_size=32, patch_size=4, dim=16, depth=2, heads=2, cls_layer=1).eval()
    assert enc.positions((8, 8)) is enc.pos_embed  # the native size is unchanged
    x = torch.rand(2, 3, 24, 40)
    with torch.no_grad():
        out = enc(x, all_tokens=True)
    assert out.cls.shape == (2, 16) and out.tokens.shape == (2, 16, 6, 10)
    assert [m.shape[-2:] for m in out.token_maps] == [(6, 10)] * 2
    pos = enc.positions((6, 10))
    assert pos.shape == (1, 60, 16) and torch.isfinite(pos).all()
    # interpolating to the native grid's own size gives the learned embedding back
    back = torch.nn.functional.interpolate(
        enc.pos_embed.reshape(1, 8, 8, 16).permute(0, 3, 1, 2), size=(8, 8), mode="bicubic")
    torch.testing.assert_close(back.flatten(2).transpose(1, 2), enc.pos_embed)
    with pytest.raises(ValueError, match="multiple"):
        enc(torch.rand(1, 3, 30, 32))


def _smooth(b: int = 6, size: int = 32) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size),
                            indexing="ij")
    f = torch.arange(1, b + 1, dtype=torch.float32)[:, None, None]
    chans = [torch.sin(f * xx + yy), torch.cos(2 * yy - f * xx), f * xx * yy / b]
    return torch.stack(chans, 1) * 0.4 + 0.5


def test_resized_views_keep_the_whole_image():
    eq = EquivariantPolicy(32, 4, canvas="resize", photometric=Photometric.off())
    x = _smooth()
    sampler = ViewSampler(BasePolicy(), eq, 1.0)
    sizes = set()
    for seed in range(4):
        batch = sampler(x, torch.Generator().manual_seed(seed))
        assert batch.views[0].shape[0] == 0 and batch.batch_size == 6
        for g1, g2, a, b in zip(batch.g1, batch.g2, *batch.eq_views):
            sizes.update(a.shape[-2:])
            assert a.shape[-2] % 4 == 0 and a.shape[-1] % 4 == 0
            # g = g2 g1^-1 maps view 1 onto view 2 everywhere: nothing cropped or padded
            moved = act_on_canvas(g1, g2, a[None], tuple(b.shape[-2:]))
            assert (moved[0] - b).abs().mean() < 0.01
            h, w = canvas_shape(g1, 32)  # the whole image resized, then rotated / flipped
            assert tuple(a.shape[-2:]) == ((w, h) if geometric_params(g1)[0] % 2 else (h, w))
            assert canvas_shape(g1, 32) in {(h * 4, w * 4) for h, w in canvas_grids(8)}
    assert len(sizes) > 3  # more scales than the fixed canvas's {24, 32, 40} px
    only_one = EquivariantPolicy(32, 4, canvas="resize", scales=[1.0])
    assert only_one.grids == [(8, 8)]


def test_canvas_loss_matches_the_fixed_canvas_loss_without_scaling():
    """With native-size canvases (rotations and flips only) both layouts give one loss."""
    torch.manual_seed(0)
    enc = SSLViT(image_size=16, patch_size=4, dim=16, depth=2, heads=2, cls_layer=1)
    method = build_method("mocov3", enc, SERConfig(weight=0.5, proj_dim=8, hidden=16),
                          proj_dim=8, hidden=16).eval()
    x = _smooth(4, 16)
    g1 = [Dihedral(1), Dihedral(0, True), Dihedral(2), Dihedral(0)]
    g2 = [Dihedral(0), Dihedral(3), Dihedral(1, True), Dihedral(2)]
    rel = [_clean(b @ a.inverse()) for a, b in zip(g1, g2)]
    v1 = ElementBatch(g1).apply_image(x)
    v2 = ElementBatch(g2).apply_image(x)
    base = torch.rand(2, 3, 16, 16)
    fixed = ViewBatch([torch.cat([v1, base]), torch.cat([v2, base])], torch.arange(4),
                      g1, g2, rel)
    canvas = ViewBatch([base, base], torch.arange(4), g1, g2, rel,
                       [list(v1), list(v2)])
    with torch.no_grad():
        a, b = method(fixed), method(canvas)
    for key in ("loss", "loss_ssl", "loss_equiv"):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["mocov3", "dino", "barlow"])
def test_every_method_trains_on_resized_canvases(name):
    torch.manual_seed(0)
    enc = SSLViT(image_size=32, patch_size=4, dim=16, depth=2, heads=2, cls_layer=1)
    method = build_method(name, enc, SERConfig(weight=0.5, proj_dim=8, hidden=16))
    sampler = ViewSampler(BasePolicy(), EquivariantPolicy(32, 4, canvas="resize"), 0.5)
    out = method(sampler(_smooth(), torch.Generator().manual_seed(0)))
    out["loss"].backward()
    assert torch.isfinite(out["loss_equiv"]) and float(out["loss_equiv"].detach()) > 0
    assert enc.patch_embed.weight.grad.abs().sum() > 0


# ----------------------------------------------------------- online k-NN monitor
def test_knn_monitor_runs_as_a_runner_callback():
    from equivision.ssl.pretrain import PretrainConfig, pretrain

    torch.manual_seed(0)
    enc = SSLViT(image_size=16, patch_size=4, dim=16, depth=2, heads=2, cls_layer=1)
    method = build_method("mocov3", enc, SERConfig.control("mocov3", proj_dim=8, hidden=16),
                          proj_dim=8, hidden=16)
    x = _smooth(24, 16)
    labels = torch.arange(24) % 3
    held = ImageDataset(x[:12], labels[:12], ["a", "b", "c"])
    probe = ImageDataset(x[12:], labels[12:], ["a", "b", "c"])
    monitor = KNNMonitor(held, probe, every=2, k=5)
    cfg = PretrainConfig(epochs=3, batch_size=8, lr=1e-3, warmup_epochs=0, ratio=0.25)
    pretrain(method, x, cfg, stop_after=2, progress=False, callbacks=[monitor])
    assert monitor.history["epoch"] == [2]  # epochs 1, 2: every 2nd
    top1 = monitor.history["knn_top1"][-1]  # measured on the encoder as it is now
    assert top1 == pytest.approx(monitor.measure(enc)) and 0 <= top1 <= 1
    assert enc.training  # the encoder's mode is restored
    with pytest.raises(ValueError, match="every"):
        KNNMonitor(held, probe, every=0)


def test_knn_monitor_every_n_steps_leaves_the_run_exact():
    from equivision.ssl.pretrain import PretrainConfig, pretrain

    def trained(callbacks):
        torch.manual_seed(0)
        enc = SSLViT(image_size=16, patch_size=4, dim=16, depth=2, heads=2, cls_layer=1)
        method = build_method("mocov3", enc, SERConfig.control("mocov3", proj_dim=8,
                                                               hidden=16),
                              proj_dim=8, hidden=16)
        cfg = PretrainConfig(epochs=2, batch_size=8, lr=1e-3, warmup_epochs=0, ratio=0.25)
        pretrain(method, x, cfg, progress=False, callbacks=callbacks)
        return method

    x = _smooth(24, 16)
    labels = torch.arange(24) % 3
    held = ImageDataset(x[:12], labels[:12], ["a", "b", "c"])
    probe = ImageDataset(x[12:], labels[12:], ["a", "b", "c"])
    monitor = KNNMonitor(held, probe, every_steps=2, k=5)
    watched = trained([monitor])
    assert monitor.history["step"] == [2, 4, 6]  # 3 steps per epoch, 2 epochs
    assert monitor.history["epoch"] == [] and len(monitor.history["knn_top1"]) == 3
    assert all(0 <= v <= 1 for v in monitor.history["knn_top1"])
    plain = trained([])
    assert all(torch.equal(a, b) for a, b in zip(watched.state_dict().values(),
                                                 plain.state_dict().values()))
    assert monitor.history["knn_top1"][-1] == pytest.approx(monitor.measure(watched.backbone))
    with pytest.raises(ValueError, match="every_steps"):
        KNNMonitor(held, probe, every_steps=0)
