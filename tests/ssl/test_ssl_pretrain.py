"""Pretraining loop: exact resume, checkpoints, logs, schedules, distributed sharding."""

from __future__ import annotations

import csv
import math
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from equivision.checkpoint import CheckpointError, load_checkpoint
from equivision.ssl import SERConfig, SSLViT, ViewBatch, build_method
from equivision.ssl.pretrain import (
    EPOCH_KEYS,
    STEP_KEYS,
    PretrainConfig,
    PretrainError,
    config_differences,
    load_method,
    load_pretrained,
    pretrain,
)
from equivision.ssl.schedules import cosine, warmup_cosine

pytestmark = pytest.mark.usefixtures("one_thread")

ENC = dict(image_size=16, patch_size=4, dim=32, depth=3, heads=2, cls_layer=1)
MOCO = dict(proj_dim=16, hidden=32)


def images(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def make(ser_weight: float | None = 0.5, dim: int = 32, seed: int = 0, name: str = "mocov3"):
    torch.manual_seed(seed)
    enc = SSLViT(**{**ENC, "dim": dim})
    ser = None if ser_weight is None else SERConfig(weight=ser_weight, proj_dim=16, hidden=32)
    kw = MOCO if name == "mocov3" else {}
    return build_method(name, enc, ser, **kw)


def config(**kw) -> PretrainConfig:
    base = dict(epochs=2, batch_size=8, warmup_epochs=1, ratio=0.25, lr=1e-3, seed=3)
    return PretrainConfig(**{**base, **kw})


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no patch-aligned scale")
        yield


@pytest.mark.parametrize("name", ["mocov3", "dino", "barlow"])
def test_resume_is_bit_identical_for_every_method(tmp_path, name):
    """DINO's teacher temperature and MoCo's momentum follow the step on resume, too."""
    data = images()
    kw = dict(out_dim=64, hidden=32, bottleneck=16, warmup_frac=0.9) if name == "dino" else \
        dict(proj_dim=16, hidden=32)
    cfg = config(epochs=3)

    def build(seed: int = 0):
        torch.manual_seed(seed)
        ser = SERConfig(weight=0.5, proj_dim=16, hidden=32)
        return build_method(name, SSLViT(**ENC), ser, **kw)

    full = build()
    history = pretrain(full, data, cfg, out_dir=tmp_path / "full", progress=False)
    half = build()
    pretrain(half, data, cfg, out_dir=tmp_path / "half", progress=False, stop_after=2)
    resumed = build(seed=2)
    history2 = pretrain(resumed, data, cfg, out_dir=tmp_path / "half", resume=True,
                        progress=False)
    a, b = full.state_dict(), resumed.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert history["loss"] == history2["loss"]


def test_resume_is_bit_identical_and_logs_are_written(tmp_path):
    data = images()
    full = make()
    history = pretrain(full, data, config(), out_dir=tmp_path / "full", progress=False,
                       method_kwargs=MOCO)
    half = make()
    pretrain(half, data, config(), out_dir=tmp_path / "half", progress=False, stop_after=1,
             method_kwargs=MOCO)
    assert load_checkpoint(tmp_path / "half" / "last.pt")["epoch"] == 1
    resumed = make(seed=2)  # any initial weights: resuming replaces them
    history2 = pretrain(resumed, data, config(), out_dir=tmp_path / "half", resume=True,
                        progress=False, method_kwargs=MOCO)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:  # student, momentum encoder, projectors, predictor: bit-identical
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["backbone.pos_embed"], make().state_dict()["backbone.pos_embed"])
    assert history["loss"] == history2["loss"] and history["epoch"] == [1, 2]
    assert all(math.isfinite(v) for v in history["loss"])
    assert history["loss_equiv"][0] > 0  # the SER term was computed
    with open(tmp_path / "full" / "steps.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == STEP_KEYS and len(rows) == 4  # 2 epochs x (16 // 8) steps
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[1] == pytest.approx(1e-3) and lrs[-1] < lrs[1]  # warm-up then cosine
    with open(tmp_path / "full" / "log.csv") as f:
        epochs = list(csv.DictReader(f))
    assert tuple(epochs[0]) == EPOCH_KEYS and len(epochs) == 2

    # the stored encoder loads back with the same weights and rebuilds the method
    encoder, info = load_pretrained(tmp_path / "full" / "last.pt")
    assert info["method_name"] == "mocov3" and info["ser_config"]["weight"] == 0.5
    assert info["encoder_config"] == full.backbone.config()
    for k, v in full.backbone.state_dict().items():
        assert torch.equal(encoder.state_dict()[k], v)
    method, _ = load_method(tmp_path / "full" / "last.pt")
    assert torch.equal(method.state_dict()["projector.0.weight"], a["projector.0.weight"])

    # a checkpoint of another configuration is refused, naming the differing keys
    with pytest.raises(CheckpointError, match=r"ser\.weight: 0\.5 -> 1\.0"):
        pretrain(make(ser_weight=1.0), data, config(), out_dir=tmp_path / "half",
                 resume=True, progress=False, method_kwargs=MOCO)
    with pytest.raises(CheckpointError, match=r"config\.lr"):
        pretrain(make(), data, config(lr=2e-3), out_dir=tmp_path / "half", resume=True,
                 progress=False, method_kwargs=MOCO)
    with pytest.raises(CheckpointError, match=r"dim: 32 -> 16"):
        load_pretrained(tmp_path / "full" / "last.pt", encoder=SSLViT(**{**ENC, "dim": 16}))
    with pytest.raises(FileExistsError, match="resume=True"):
        pretrain(make(), data, config(), out_dir=tmp_path / "full", progress=False)


def test_interrupted_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    data = images(8)
    cfg = config(epochs=2, ratio=0.0)
    pretrain(make(None), data, cfg, out_dir=tmp_path, progress=False, stop_after=1)
    before = (tmp_path / "last.pt").read_bytes()
    import equivision.checkpoint as ck

    real_save = torch.save

    def broken_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        pretrain(make(None), data, cfg, out_dir=tmp_path, resume=True, progress=False)
    monkeypatch.setattr(ck.torch, "save", real_save)
    assert (tmp_path / "last.pt").read_bytes() == before
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "log.csv", "steps.csv"]


def test_dino_and_barlow_run_with_bf16_autocast_on_cpu():
    data = images(8)
    for name in ("dino", "barlow"):
        torch.manual_seed(0)
        enc = SSLViT(**ENC)
        kw = {"out_dim": 64, "hidden": 32, "bottleneck": 16} if name == "dino" else {
            "proj_dim": 32, "hidden": 32}
        method = build_method(name, enc, SERConfig(weight=0.5, proj_dim=16, hidden=32), **kw)
        h = pretrain(method, data, config(epochs=1, warmup_epochs=0, amp="bf16"),
                     progress=False)
        assert math.isfinite(h["loss"][0]) and h["loss_equiv"][0] > 0


class _NaNMethod(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = SSLViT(**ENC)

    def forward(self, batch):
        loss = self.backbone(batch.views[0]).cls.sum() * float("nan")
        return {"loss": loss, "loss_ssl": loss, "loss_equiv": loss * 0}


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(PretrainError, match="non-finite|became nan"):
        pretrain(_NaNMethod(), images(8), config(ratio=0.0), progress=False)
    with pytest.raises(ValueError, match="fit_dataset"):
        pretrain(make(), torch.rand(8, 1, 28, 28), config(), progress=False)
    with pytest.raises(PretrainError, match="fewer than one batch"):
        pretrain(make(), images(4), config(), progress=False)
    with pytest.raises(ValueError, match="warmup_epochs"):
        PretrainConfig(epochs=2, warmup_epochs=3)
    with pytest.raises(ValueError, match="amp"):
        PretrainConfig(amp="fp16")
    with pytest.raises(TypeError, match="backbone"):
        pretrain(nn.Linear(2, 2), images(8), config(), progress=False)
    assert config_differences({"a": {"b": 1}, "c": 2}, {"a": {"b": 2}, "c": 2}) == [
        "a.b: 1 -> 2"]


def test_schedules():
    values = [warmup_cosine(s, 10, 3, 1.0, 0.1) for s in range(10)]
    assert values[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert values[3] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[3:], values[4:]))
    assert cosine(0, 5, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine(4, 5, 0.04, 0.4) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(0, 5, 6, 1.0)


class _MeanMethod(nn.Module):
    """A loss that is a mean over images: sharded training must match one process."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = SSLViT(**ENC)

    def forward(self, batch):
        loss = self.backbone(batch.views[0]).cls.pow(2).sum(1).mean()
        return {"loss": loss, "loss_ssl": loss, "loss_equiv": loss * 0}


def _same_views(x, generator):
    return ViewBatch([x, x], torch.zeros(0, dtype=torch.long))


def _separable_run(out_dir=None) -> dict:
    method = _MeanMethod()
    pretrain(method, images(16), config(epochs=1, warmup_epochs=0, ratio=0.0), out_dir=out_dir,
             views=_same_views, progress=False)
    return method.state_dict()


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        warnings.filterwarnings("ignore")
        method = make(seed=rank)  # different inits: rank 0's weights are broadcast
        pretrain(method, images(16), config(epochs=1, warmup_epochs=0, ratio=0.5),
                 out_dir=out if rank == 0 else f"{out}-rank{rank}", progress=False)
        torch.save({k: v.clone() for k, v in method.state_dict().items()},
                   f"{out}.state{rank}")
        torch.save(_separable_run(), f"{out}.separable{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_stay_in_sync_and_only_rank0_writes(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    out = str(tmp_path / "run")
    mp.spawn(_worker, args=(2, init, out), nprocs=2, join=True)
    s0 = torch.load(f"{out}.state0", weights_only=True)
    s1 = torch.load(f"{out}.state1", weights_only=True)
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not (tmp_path / "run-rank1").exists()
    # shards of 4 images per process with averaged gradients == one process with 8
    single = _separable_run()
    for rank in range(2):
        multi = torch.load(f"{out}.separable{rank}", weights_only=True)
        for k, v in single.items():
            torch.testing.assert_close(multi[k], v, rtol=1e-4, atol=1e-5)
    start = _MeanMethod().state_dict()["backbone.pos_embed"]
    assert not torch.equal(single["backbone.pos_embed"], start)  # it did train


def _tiny_worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        warnings.filterwarnings("ignore")
        states = {}
        for name in ("mocov3", "dino"):  # DINO all-reduces its centre's sum and count
            method = make(name=name)
            # 3 images in batches of 2: one image per process, the third dropped
            pretrain(method, images(3), config(epochs=1, batch_size=2, warmup_epochs=0,
                                               ratio=1.0), progress=False)
            states[name] = {k: v.clone() for k, v in method.state_dict().items()}
        try:  # fewer images than processes: every process refuses, none waits
            pretrain(make(), images(1), config(batch_size=2), progress=False)
        except PretrainError as e:
            states["error"] = str(e)
        torch.save(states, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_one_image_per_process_and_fewer_images_than_processes(tmp_path):
    """Every process gets batch_size / world >= 1 images per step (batch_size divisible
    by the world size, whole batches only), so the collectives always match."""
    out = str(tmp_path / "run")
    ctx = mp.spawn(_tiny_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", out),
                   nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2 processes did not finish in 120 s (a collective hung)")
    s0, s1 = (torch.load(f"{out}.{r}", weights_only=True) for r in range(2))
    for name in ("mocov3", "dino"):
        for k in s0[name]:
            assert torch.equal(s0[name][k], s1[name][k]), (name, k)
    assert "fewer than one batch" in s0["error"] and s0["error"] == s1["error"]
