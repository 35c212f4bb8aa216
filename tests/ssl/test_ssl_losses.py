"""Patch-wise NT-Xent (gradients!), base SSL losses and the methods with/without SER."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from equivision.ssl import (
    DINO,
    BarlowTwins,
    BasePolicy,
    DINOLoss,
    EquivariantPolicy,
    MoCoV3,
    PatchNTXent,
    SERConfig,
    SSLViT,
    ViewSampler,
    barlow_twins_loss,
    build_method,
    infonce,
)
from equivision.transforms import Dihedral, Scale
from equivision.transforms.elements import act_on_maps

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit(**kw) -> SSLViT:
    torch.manual_seed(0)
    args = dict(image_size=16, patch_size=4, dim=32, depth=3, heads=2, cls_layer=2)
    args.update(kw)
    return SSLViT(**args)


def batch(b: int = 8, ratio: float = 0.5, seed: int = 0, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, size, size, generator=g)
    scales = [1.0] if size == 16 else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eq = EquivariantPolicy(size, 4, scales=scales, canvas="fixed")
    return ViewSampler(BasePolicy(), eq, ratio)(x, g)


def reference_patch_ntxent(head, t1, t2, relative):
    """Direct transcription of the paper's formula, anchor by anchor."""
    m, d, h, w = t1.shape
    z = act_on_maps(relative, t1)
    valid = torch.stack([g.valid_mask((h, w)) for g in relative]).reshape(m, -1)
    p1 = F.normalize(head.projector(z.flatten(2).transpose(1, 2)), dim=-1)
    p2 = F.normalize(head.projector(t2.flatten(2).transpose(1, 2)), dim=-1)
    losses = []
    for i in range(m):
        for j in range(h * w):
            if not valid[i, j]:
                continue
            pos = torch.exp(p1[i, j] @ p2[i, j] / head.tau)
            neg = 0.0
            for mm in range(m):
                if mm == i:
                    continue
                for n in range(h * w):
                    if valid[mm, n]:
                        neg = neg + torch.exp(p1[i, j] @ p1[mm, n] / head.tau)
                        neg = neg + torch.exp(p1[i, j] @ p2[mm, n] / head.tau)
            losses.append(-torch.log(pos / (pos + neg)))
    return torch.stack(losses).mean()


def test_patch_ntxent_matches_the_formula_with_masks():
    torch.manual_seed(1)
    head = PatchNTXent(8, proj_dim=6, hidden=10, tau=0.3)
    t1, t2 = torch.randn(3, 8, 4, 4), torch.randn(3, 8, 4, 4)
    rel = [Dihedral(1, True), Scale(0.5, 1.0), Dihedral(2) @ Scale(1.5)]
    ours = head(t1, t2, rel)
    torch.testing.assert_close(ours, reference_patch_ntxent(head, t1, t2, rel))
    # the zoom-out really removed anchors (otherwise the mask would be untested)
    assert not Scale(0.5, 1.0).valid_mask((4, 4)).all()


def test_patch_ntxent_rewards_equivariant_maps():
    """Maps that transform with g (t2 = g·t1) score far better than unrelated ones."""
    torch.manual_seed(2)
    head = PatchNTXent(8, proj_dim=8, hidden=16, tau=0.2)
    t1 = torch.randn(4, 8, 4, 4)
    rel = [Dihedral(k, k % 2 == 0) for k in range(4)]
    good = head(t1, act_on_maps(rel, t1), rel)
    bad = head(t1, torch.randn(4, 8, 4, 4), rel)
    assert good < bad - 1.0
    with pytest.raises(ValueError, match="same shape"):
        head(t1, t1[:2], rel)


def _grad_norms(module):
    return {n: (0.0 if p.grad is None else p.grad.abs().sum().item())
            for n, p in module.named_parameters()}


def test_equivariance_loss_alone_trains_projector_and_blocks_up_to_L_only():
    """The released SER code gathered token maps inside no_grad, so L_equiv gave no
    gradient; ours must reach the projector and every block <= L, and nothing after."""
    vit = tiny_vit()
    method = MoCoV3(vit, SERConfig(weight=1.0, proj_dim=16, hidden=32), hidden=32, proj_dim=16)
    out = method(batch())
    method.zero_grad()
    out["loss_equiv"].backward()
    proj = _grad_norms(method.ser_heads[0].projector)
    assert all(v > 0 for v in proj.values()), proj
    enc = _grad_norms(vit)
    for name, v in enc.items():
        before_l = name.startswith(("blocks.0.", "blocks.1.", "patch_embed", "pos_embed",
                                    "norm_l"))
        if before_l:
            assert v > 0, name
        else:  # blocks.2 (after L), cls_token, final norm
            assert v == 0, name
    for i in range(vit.cls_layer):
        assert sum(v for n, v in enc.items() if n.startswith(f"blocks.{i}.")) > 0
    assert out["loss_equiv"].item() > 0


def test_ser_at_every_block_reaches_later_blocks():
    vit = tiny_vit()
    method = BarlowTwins(vit, SERConfig(layer="all", proj_dim=8, hidden=16), hidden=16,
                         proj_dim=16)
    assert len(method.ser_heads) == 3
    method(batch())["loss_equiv"].backward()
    enc = _grad_norms(vit)
    assert sum(v for n, v in enc.items() if n.startswith("blocks.2.")) > 0
    # later patch tokens attend to [CLS], so it gets a gradient; the final norm does not
    assert enc["norm.weight"] == 0 and enc["cls_token"] > 0


def test_infonce_and_barlow_reference_values():
    torch.manual_seed(3)
    q, k = torch.randn(5, 7), torch.randn(5, 7)
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.2
    torch.testing.assert_close(infonce(q, k, 0.2), F.cross_entropy(logits, torch.arange(5)) * 0.4)
    z = torch.randn(16, 4)
    # identical embeddings: perfect diagonal, only the off-diagonal term remains
    c = ((z - z.mean(0)) / z.std(0, unbiased=False)).T @ (
        (z - z.mean(0)) / z.std(0, unbiased=False)) / 16
    off = (c.pow(2).sum() - torch.diagonal(c).pow(2).sum()) * 0.0051
    torch.testing.assert_close(barlow_twins_loss(z, z), off, atol=1e-4, rtol=1e-4)
    assert barlow_twins_loss(z, torch.randn(16, 4)) > barlow_twins_loss(z, z) + 1


def test_dino_loss_temperature_warmup_and_centre():
    crit = DINOLoss(4, warmup_frac=0.5)
    assert crit.current_teacher_temp == pytest.approx(0.04)
    crit.set_progress(5, 20)
    assert crit.current_teacher_temp == pytest.approx(0.055)
    crit.set_progress(20, 20)
    assert crit.current_teacher_temp == pytest.approx(0.07)
    t = [torch.ones(3, 4) * torch.tensor([1.0, 0, 0, 0])] * 2
    s = [torch.randn(3, 4, requires_grad=True) for _ in range(2)]
    loss = crit(s, t)
    assert torch.isfinite(loss)
    torch.testing.assert_close(crit.center, torch.tensor([[0.1, 0, 0, 0]]))
    crit.eval()
    crit(s, t)
    torch.testing.assert_close(crit.center, torch.tensor([[0.1, 0, 0, 0]]))


METHOD_KW = {
    "mocov3": dict(hidden=32, proj_dim=16),
    "dino": dict(hidden=32, out_dim=32, bottleneck=8),
    "barlow": dict(hidden=32, proj_dim=16),
}


@pytest.mark.parametrize("name", ["mocov3", "dino", "barlow"])
@pytest.mark.parametrize("variant", [None, "ser", "augself", "equimod"])
def test_methods_finite_and_decrease(name, variant):
    ser = None if variant is None else SERConfig(weight=0.5, proj_dim=16, hidden=32,
                                                 variant=variant)
    method = build_method(name, tiny_vit(), ser, **METHOD_KW[name])
    if name == "dino":  # fixed targets: frozen centre and teacher (no on_step_end)
        method.criterion.eval()
    vb = batch(6)
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(6):
        out = method(vb)
        assert set(out) == {"loss", "loss_ssl", "loss_equiv"}
        assert all(torch.isfinite(v) and v.dim() == 0 for v in out.values())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0], losses
    if variant is None:
        assert out["loss_equiv"].item() == 0.0
    else:
        assert out["loss_equiv"].item() > 0
        torch.testing.assert_close(out["loss"], out["loss_ssl"] + 0.5 * out["loss_equiv"])


@pytest.mark.parametrize("cls,teacher", [(MoCoV3, "momentum_backbone"),
                                         (DINO, "teacher_backbone")])
def test_momentum_update_changes_the_teacher(cls, teacher):
    method = cls(tiny_vit(), None, **METHOD_KW["mocov3" if cls is MoCoV3 else "dino"])
    vb = batch(4)
    twin = getattr(method, teacher)
    assert all(not p.requires_grad for p in twin.parameters())
    before = {n: p.clone() for n, p in twin.named_parameters()}
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    opt.zero_grad()
    method(vb)["loss"].backward()
    opt.step()
    method.on_step_end(0, 10)
    after = dict(twin.named_parameters())
    assert any(not torch.equal(after[n], before[n]) for n in before)
    # EMA: teacher = m·old + (1 - m)·student, with the cosine-scheduled momentum
    m = method.momentum
    assert m == pytest.approx(method.base_momentum)
    student = dict(method.backbone.named_parameters())
    for n in ("patch_embed.weight", "blocks.0.attn.qkv.weight"):
        torch.testing.assert_close(after[n], m * before[n] + (1 - m) * student[n])
    method.on_step_end(5, 10)  # half-way along the cosine schedule
    assert method.momentum == pytest.approx(0.5 * (1 + method.base_momentum))
    method.on_step_end(10, 10)
    assert method.momentum == pytest.approx(1.0)


def test_lambda_zero_control_and_empty_equivariant_part():
    vit = tiny_vit()
    method = MoCoV3(vit, SERConfig(weight=0.0, proj_dim=8, hidden=16), hidden=32, proj_dim=16)
    out = method(batch(6))
    assert out["loss_equiv"].item() > 0  # reported ...
    torch.testing.assert_close(out["loss"], out["loss_ssl"])  # ... but not trained on
    with pytest.warns(UserWarning, match="without the SER term"):
        vb = batch(6, ratio=0.01)
    method.ser.weight = 0.5
    out = method(vb)
    assert out["loss_equiv"].item() == 0.0
    out["loss"].backward()  # still trains the base objective
    assert vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_paper_ser_settings():
    assert SERConfig.paper("dino").tau == 0.5 and SERConfig.paper("mocov3").tau == 0.3
    assert SERConfig.paper("barlow", weight=0.1).weight == 0.1


def test_bad_configuration_messages():
    with pytest.raises(ValueError, match="unknown SSL method"):
        build_method("simclr", tiny_vit())
    with pytest.raises(ValueError, match="SERConfig.layer"):
        MoCoV3(tiny_vit(), SERConfig(layer=7))
    with pytest.raises(ValueError, match="unknown SER variant"):
        MoCoV3(tiny_vit(), SERConfig(variant="bogus"))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="SSLViT"):
        MoCoV3(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


def test_dino_collapse_stats_tell_uniform_from_one_hot_from_healthy():
    crit = DINOLoss(8)  # teacher temperature 0.04 at the start
    k = 8
    same = torch.randn(1, k).repeat(6, 1) * 0.5
    crit.center.copy_(same[:1])  # the centre has caught up with a constant output
    uniform = crit.collapse_stats(same)
    assert uniform["entropy_sample"] == pytest.approx(math.log(k), abs=1e-5)
    assert uniform["entropy_mean"] == pytest.approx(math.log(k), abs=1e-5)
    assert uniform["image_std"] == pytest.approx(0.0, abs=1e-6)
    crit.center.zero_()
    dominant = crit.collapse_stats(torch.eye(k)[[0] * 6])  # one prototype for every image
    assert dominant["entropy_mean"] < 0.01 and dominant["entropy_sample"] < 0.01
    healthy = crit.collapse_stats(torch.eye(k)[[0, 1, 2, 3, 4, 5]])
    assert healthy["entropy_sample"] < 0.01 < math.log(6) - 0.01 < healthy["entropy_mean"]
    assert healthy["max_entropy"] == pytest.approx(math.log(k))
    with pytest.raises(ValueError, match="teacher logits"):
        crit.collapse_stats(torch.zeros(3, k + 1))


def test_dino_method_collapse_stats_read_the_teacher():
    method = DINO(tiny_vit(), None, **METHOD_KW["dino"])
    stats = method.collapse_stats(batch(4).views[0])
    assert set(stats) == {"entropy_sample", "entropy_mean", "max_entropy", "logit_std",
                          "image_std"}
    assert 0 <= stats["entropy_sample"] <= stats["entropy_mean"] + 1e-6
    assert stats["entropy_mean"] <= stats["max_entropy"] + 1e-6
    assert 0 < stats["logit_std"] <= 1
