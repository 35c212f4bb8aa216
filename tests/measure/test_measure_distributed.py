"""Two gloo processes measuring their shards give the numbers of one process."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from equivision.measure import measure
from equivision.measure.validation import rotated_filter_cnn


def data():
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.rand(30, 1, 12, 12, generator=g))


def worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        rep = measure(rotated_filter_cnn(), data(), "rot90:1,shift:2", batch_size=4,
                      progress=False)
        with open(f"{out}.{rank}", "w") as fh:
            json.dump(rep.to_dict(), fh)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    out = str(tmp_path / "rep")
    mp.spawn(worker, args=(2, init, out), nprocs=2, join=True)
    single = measure(rotated_filter_cnn(), data(), "rot90:1,shift:2", batch_size=4,
                     progress=False).to_dict()
    for rank in range(2):
        with open(f"{out}.{rank}") as fh:
            multi = json.load(fh)
        assert multi["n_images"] == 30 and multi["meta"]["world_size"] == 2
        for a, b in zip(multi["results"], single["results"]):
            for k, v in b["metrics"].items():
                assert a["metrics"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), (a["layer"], k)
