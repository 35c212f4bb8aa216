"""Two gloo processes evaluating their shards give the numbers of one process."""

import json
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Subset, TensorDataset

from equivision.data import get_dataset
from equivision.models import create_model
from equivision.robust import EquivarianceDefense, evaluate_robustness
from equivision.training import TrainConfig, train

ATTACKS = ["pgd", "bpda-eot"]
SETTINGS = dict(eps=0.1, steps=2, batch_size=3, repeats=2, eot_samples=2)


def data():
    return Subset(get_dataset("digits", split="test", size=12), range(10))


def run(weights: str) -> dict:
    model = create_model("cnn-small", width=4)
    model.load_state_dict(torch.load(weights, weights_only=True))
    defense = EquivarianceDefense(model.eval(), eps_v=0.1, steps=2, noise=1.0)
    return evaluate_robustness(model, data(), ATTACKS, defense, **SETTINGS).to_dict()


def worker(rank: int, world: int, init: str, weights: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        with open(f"{out}.{rank}", "w") as fh:
            json.dump(run(weights), fh)
    finally:
        dist.destroy_process_group()


def _numbers(result: dict) -> list[tuple[str, float]]:
    out = []
    for row in result["rows"]:
        for part in ("undefended", "defended", "defended_single", "equivariance"):
            out += [(f"{row['name']}.{part}.{k}", v) for k, v in row[part].items()]
    return out


def test_two_gloo_processes_match_one(tmp_path, one_thread):
    torch.manual_seed(0)
    model = create_model("cnn-small", width=4)
    train(model, Subset(get_dataset("digits", split="train", size=12), range(300)),
          config=TrainConfig(epochs=2, batch_size=32, lr=0.02, optimizer="adam",
                             weight_decay=0.0, seed=0, device="cpu"), progress=False)
    weights = str(tmp_path / "weights.pt")
    torch.save(model.state_dict(), weights)
    init = f"file://{tmp_path / 'rendezvous'}"
    out = str(tmp_path / "res")
    mp.spawn(worker, args=(2, init, weights, out), nprocs=2, join=True)
    single = run(weights)
    assert single["meta"]["world_size"] == 1
    for rank in range(2):
        with open(f"{out}.{rank}") as fh:
            multi = json.load(fh)
        assert multi["n_images"] == 10 and multi["meta"]["world_size"] == 2
        assert [r["attack_target"] for r in multi["rows"]] == [None, "model", "defense"]
        for (name, a), (_, b) in zip(_numbers(multi), _numbers(single), strict=True):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-9), name
    # the attack changed something, so the comparison is not between constants
    assert single["rows"][1]["undefended"]["accuracy"] < single["rows"][0]["undefended"][
        "accuracy"]


GLOO = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                          reason="torch.distributed with gloo is not available")


def _tiny(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(n, 1, 28, 28, generator=g),
                         torch.randint(0, 10, (n,), generator=g))


def _run_tiny(n: int) -> dict:
    torch.manual_seed(0)
    model = create_model("cnn-small", width=4).eval()
    result = evaluate_robustness(model, _tiny(n), ["pgd"], None, eps=0.1, steps=2,
                                 batch_size=2, checks="none").to_dict()
    return {k: v for k, v in result.items() if k not in ("seconds", "rows")} | {
        "rows": [{k: v for k, v in r.items() if k != "seconds"} for r in result["rows"]]}


def tiny_worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        results = {n: _run_tiny(n) for n in (1, 3)}
        with open(f"{out}.{rank}", "w") as fh:
            json.dump(results, fh)
    finally:
        dist.destroy_process_group()


def spawn_or_fail(fn, args: tuple, nprocs: int = 2, timeout: float = 120.0) -> None:
    """``mp.spawn`` that fails the test instead of hanging when a collective never
    matches on every process."""
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {nprocs} processes did not finish in {timeout:.0f} s (hang)")


@GLOO
def test_fewer_images_than_processes_and_uneven_shards(tmp_path, one_thread):
    """1 image on 2 processes (rank 1 gets no block) and 3 images in blocks of 2 (one
    block each, of 2 and 1 images): no hang, and every process returns the result of one
    process, attack descriptions included."""
    out = str(tmp_path / "res")
    spawn_or_fail(tiny_worker, (2, f"file://{tmp_path / 'rendezvous'}", out))
    for n in (1, 3):
        single = json.loads(json.dumps(_run_tiny(n)))
        for rank in range(2):
            with open(f"{out}.{rank}") as fh:
                multi = json.load(fh)[str(n)]
            assert multi["meta"]["world_size"] == 2 and multi["n_images"] == n
            assert multi["rows"][1]["attack"] is not None, (n, rank)
            multi["meta"]["world_size"] = 1
            assert multi == single, (n, rank)
