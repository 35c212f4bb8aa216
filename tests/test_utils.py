"""Device selection, seeding and RNG-state helpers."""

import random

import numpy as np
import pytest
import torch

from equivision.utils import (
    DeviceError,
    get_rng_state,
    model_device,
    preserve_rng_state,
    resolve_device,
    seed_everything,
    set_rng_state,
)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda:1")
    else:
        n = torch.cuda.device_count()
        with pytest.raises(DeviceError, match="visible"):
            resolve_device(f"cuda:{n}")


def test_seed_and_rng_state():
    seed_everything(3)
    a = (random.random(), np.random.rand(), torch.rand(2))
    seed_everything(3)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[:2] == b[:2] and torch.equal(a[2], b[2])
    state = get_rng_state()
    with preserve_rng_state():
        random.random()
        torch.rand(5)
    first = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(2))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])
    with pytest.raises(ValueError, match="seed"):
        seed_everything(-1)


def test_model_device_reads_parameters_then_buffers():
    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    only_buffers = torch.nn.BatchNorm1d(3, affine=False)
    assert model_device(only_buffers.to("meta")) == torch.device("meta")
    assert model_device(torch.nn.Identity(), default="meta") == torch.device("meta")
    assert model_device(torch.nn.Identity()) == torch.device("cpu")
