"""SyncBatchNorm: the global batch's statistics under two gloo processes (CPU), a plain
BatchNorm1d otherwise; pretraining converts the projectors under torchrun, and T_eq's
canvases of different sizes in every process do not deadlock the gathers."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from equivision.ssl import SERConfig, SSLViT, build_method
from equivision.ssl.syncbn import SyncBatchNorm, convert_sync_batchnorm

SHARDS = [(0, 3), (3, 8)]  # unequal shards


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, generator=g) * 3 + 1
    w = torch.randn(8, 4, generator=g)  # a fixed readout: loss = sum(w * bn(x))
    return x, w


def bn_pair():
    torch.manual_seed(0)
    plain = nn.BatchNorm1d(4)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-0.5, 0.5)
    return plain


def run_bn(module, x, w):
    x = x.clone().requires_grad_(True)
    (module(x) * w).sum().backward()
    return x.grad, module.weight.grad, module.bias.grad


def spawn(fn, args, timeout: float = 240.0) -> None:
    """Run ``fn(rank, *args)`` in two processes; fail (not hang) on a deadlock."""
    ctx = mp.spawn(fn, args=args, nprocs=2, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the two processes did not finish within {timeout:.0f} s (deadlock?)")


def test_one_process_is_plain_batchnorm_and_conversion_shares_tensors():
    plain = bn_pair()
    model = nn.Sequential(nn.Linear(4, 4), plain, nn.Sequential(nn.BatchNorm1d(4,
                                                                             affine=False)))
    params = list(model.parameters())
    keys = list(model.state_dict())
    convert_sync_batchnorm(model)
    assert isinstance(model[1], SyncBatchNorm) and isinstance(model[2][0], SyncBatchNorm)
    assert model[1].weight is plain.weight and list(model.parameters()) == params
    assert list(model.state_dict()) == keys  # checkpoints load either way
    x, w = data()
    twin = bn_pair()
    ref = run_bn(twin, x, w)
    got = run_bn(model[1], x, w)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(model[1].running_var, twin.running_var)


def bn_worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        sync = convert_sync_batchnorm(bn_pair())
        x, w = data()
        sl = slice(*SHARDS[rank])
        gx, gw, gb = run_bn(sync, x[sl], w[sl])
        for g in (gw, gb):
            dist.all_reduce(g)  # the parameter gradient of the summed loss
        torch.save({"gx": gx, "gw": gw, "gb": gb, "mean": sync.running_mean,
                    "var": sync.running_var, "y": sync.eval()(x[sl])}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_normalise_by_the_global_batch(tmp_path, one_thread):
    out = str(tmp_path / "bn")
    spawn(bn_worker, (f"file://{tmp_path / 'rendezvous'}", out))
    x, w = data()
    plain = bn_pair()
    gx, gw, gb = run_bn(plain, x, w)
    local = bn_pair()  # what unsynchronised BatchNorm would do on rank 0's shard
    lx, _, _ = run_bn(local, x[:3], w[:3])
    for rank, (a, b) in enumerate(SHARDS):
        res = torch.load(f"{out}.{rank}")
        torch.testing.assert_close(res["gx"], gx[a:b], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(res["gw"], gw, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(res["gb"], gb, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(res["mean"], plain.running_mean)
        torch.testing.assert_close(res["var"], plain.running_var)
        torch.testing.assert_close(res["y"], plain.eval()(x[a:b]))
        plain.train()
    assert not torch.allclose(torch.load(f"{out}.0")["gx"], lx, atol=1e-3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain_worker(rank: int, port: int, out: str) -> None:
    """As under ``torchrun --nproc_per_node 2``: the environment, then pretrain()."""
    from equivision.ssl.pretrain import PretrainConfig, pretrain

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        result = {}
        for name, heads in (("barlow", dict(proj_dim=8, hidden=16)),
                            ("mocov3", dict(proj_dim=8, hidden=16))):
            torch.manual_seed(0)
            enc = SSLViT(image_size=16, patch_size=4, dim=16, depth=2, heads=2, cls_layer=1)
            method = build_method(name, enc, SERConfig.paper(name, proj_dim=8, hidden=16),
                                  **heads)
            x = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(3))
            cfg = PretrainConfig(epochs=1, batch_size=8, lr=1e-3, warmup_epochs=0,
                                 ratio=0.5, device="cpu")  # resized canvases of many sizes
            history = pretrain(method, x, cfg, progress=False)
            result[name] = {
                "loss": history["loss"][-1],
                "sync": sum(isinstance(m, SyncBatchNorm) for m in method.modules()),
                "state": {k: v.clone() for k, v in method.state_dict().items()}}
        torch.save(result, f"{out}.{rank}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_pretrain_under_two_processes_syncs_projector_bn_with_resized_canvases(
        tmp_path, one_thread):
    out = str(tmp_path / "run")
    spawn(pretrain_worker, (_free_port(), out))
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    for name in ("barlow", "mocov3"):
        a, b = ranks[0][name], ranks[1][name]
        assert a["sync"] > 0 and a["sync"] == b["sync"]  # the projectors' BatchNorms
        assert a["loss"] == b["loss"] and torch.isfinite(torch.tensor(a["loss"]))
        for key, value in a["state"].items():  # every process holds the same model
            torch.testing.assert_close(value, b["state"][key], msg=key)
