"""Two gloo processes evaluating their shards give the numbers of one process."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Subset

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
