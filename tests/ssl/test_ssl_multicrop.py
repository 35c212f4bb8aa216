"""Multi-crop: small local views feed the base loss of MoCo-v3, DINO and Barlow Twins
(DINO's teacher and MoCo-v3's momentum encoder see only the two global views), never SER."""

from __future__ import annotations

import math

import pytest
import torch

from equivision.ssl import SERConfig, SSLViT, build_method
from equivision.ssl.losses import barlow_twins_loss, infonce
from equivision.ssl.methods import encode_view
from equivision.ssl.pretrain import PretrainConfig, default_views, pretrain

pytestmark = pytest.mark.usefixtures("one_thread")

HEADS = {"mocov3": dict(proj_dim=8, hidden=16), "dino": dict(out_dim=16, hidden=16,
                                                              bottleneck=8),
         "barlow": dict(proj_dim=8, hidden=16)}


def method(name: str, ser: bool = True):
    torch.manual_seed(0)
    enc = SSLViT(image_size=16, patch_size=4, dim=16, depth=2, heads=2, cls_layer=1)
    cfg = SERConfig.paper(name, proj_dim=8, hidden=16) if ser else None
    return build_method(name, enc, cfg, **HEADS[name])


def images(n: int = 8) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def batch(m, n_local: int, ratio: float = 0.25):
    views = default_views(m.backbone, ratio, local_crops=n_local, local_size=8)
    return views(images(), torch.Generator().manual_seed(2))


def test_local_views_follow_the_global_ones():
    m = method("mocov3")
    two, multi = batch(m, 0), batch(m, 3)
    assert two.local_views == [] and len(multi.local_views) == 3
    assert all(v.shape == (8, 3, 8, 8) for v in multi.local_views)
    for a, b in zip(two.views, multi.views):  # the global views do not depend on n_local
        assert torch.equal(a, b)
    assert [torch.equal(a, b) for a, b in zip(two.eq_views[0], multi.eq_views[0])] == \
        [True, True]
    with pytest.raises(ValueError, match="multiple of the patch size"):
        default_views(m.backbone, 0.25, local_crops=2, local_size=6)


def _sizes_seen(module: torch.nn.Module) -> list[int]:
    seen: list[int] = []
    module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[-1]))
    return seen


def test_dino_student_sees_all_views_teacher_only_globals():
    m = method("dino")
    student, teacher = _sizes_seen(m.backbone.patch_embed), _sizes_seen(
        m.teacher_backbone.patch_embed)
    calls = []
    criterion = m.criterion.forward
    m.criterion.forward = lambda s, t: calls.append((len(s), len(t))) or criterion(s, t)
    out = m(batch(m, 2))
    assert 8 in student and 8 not in teacher and 16 in teacher  # local views are 8 px
    assert calls == [(4, 2)]  # 2 global + 2 local student views, 2 teacher views
    out["loss"].backward()
    assert m.backbone.patch_embed.weight.grad.abs().sum() > 0


def test_mocov3_pairs_every_query_with_the_other_global_keys():
    m = method("mocov3", ser=False)
    for n_local in (0, 2):
        b = batch(m, n_local, ratio=0.0)
        torch.manual_seed(5)
        loss = m.ssl_loss(m.encode(b), b)
        with torch.no_grad():
            cls = [o.cls for o in m.encode(b)] + m.encode_locals(b)
            q = [m.predictor(m.projector(c)) for c in cls]
            k = [m.momentum_projector(encode_view(m.momentum_backbone, b, v).cls)
                 for v in range(2)]
        if n_local == 0:  # MoCo-v3's symmetric loss, unchanged
            expect = infonce(q[0], k[1], m.tau) + infonce(q[1], k[0], m.tau)
        else:  # queries 0..3 against the keys of the globals 0, 1, never their own
            terms = [infonce(q[v], k[g], m.tau) for v in range(4) for g in range(2) if v != g]
            assert len(terms) == 6
            expect = 2 * torch.stack(terms).mean()
        assert float(loss.detach()) == pytest.approx(float(expect), rel=1e-5)


def test_barlow_twins_pairs_the_globals_and_each_local_with_each_global():
    m = method("barlow", ser=False)
    b = batch(m, 1, ratio=0.0)
    loss = m.ssl_loss(m.encode(b), b)
    with torch.no_grad():
        z = [m.projector(c) for c in [o.cls for o in m.encode(b)] + m.encode_locals(b)]
    expect = (barlow_twins_loss(z[0], z[1], m.lambd) + barlow_twins_loss(z[0], z[2], m.lambd)
              + barlow_twins_loss(z[1], z[2], m.lambd)) / 3
    assert float(loss.detach()) == pytest.approx(float(expect), rel=1e-5)


@pytest.mark.parametrize("name", ["mocov3", "dino", "barlow"])
def test_pretrain_with_local_crops_runs_and_differs(name):
    def loss(local_crops: int) -> float:
        m = method(name)
        cfg = PretrainConfig(epochs=1, batch_size=8, lr=1e-3, warmup_epochs=0, ratio=0.25,
                             local_crops=local_crops, local_size=8)
        return pretrain(m, images(16), cfg, progress=False)["loss"][-1]

    with_locals, without = loss(2), loss(0)
    assert math.isfinite(with_locals) and with_locals != without


def test_bad_local_crop_settings_are_refused():
    with pytest.raises(ValueError, match="local_crops"):
        PretrainConfig(local_crops=-1)
    with pytest.raises(ValueError, match="local_size"):
        PretrainConfig(local_size=0)
