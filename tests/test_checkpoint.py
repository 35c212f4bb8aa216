"""Checkpoint files: atomic saves, weights-only loading, clear errors."""

import os
import pickle

import numpy as np
import pytest
import torch

from equivision.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)
from equivision.models import create_model


class Foreign:
    """An arbitrary class that weights_only loading must refuse."""


def small(**kw):
    return create_model("cnn-small", num_classes=2, **kw)


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}})
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))


def test_save_refuses_unsafe_values(tmp_path):
    with pytest.raises(TypeError, match="numpy"):
        save_checkpoint(tmp_path / "x.pt", {"model": {}, "extra": np.zeros(2)})
    with pytest.raises(TypeError, match="Foreign"):
        save_checkpoint(tmp_path / "x.pt", {"model": {}, "extra": [Foreign()]})
    assert os.listdir(tmp_path) == []


def test_corrupt_checkpoints_give_clear_errors(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"model": {"w": torch.randn(50, 50)}})
    cases = {}
    cases["trunc.pt"] = (good.read_bytes()[:1000], "corrupt or truncated")
    cases["random.pt"] = (np.random.default_rng(0).bytes(2000), "not a PyTorch checkpoint")
    cases["empty.pt"] = (b"", "empty")
    cases["pickle.pt"] = (pickle.dumps(Foreign()), "cannot be loaded with weights_only")
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"x": Foreign()}, tmp_path / "foreign.pt")
    cases["foreign.pt"] = (None, "Foreign")
    torch.save(torch.ones(2), tmp_path / "tensor.pt")
    cases["tensor.pt"] = (None, "holds a Tensor, not a checkpoint dict")
    torch.save({"w": torch.ones(2)}, tmp_path / "bare.pt")
    cases["bare.pt"] = (None, "not an equivision checkpoint")
    save_checkpoint(tmp_path / "nomodel.pt", {"epoch": 3})
    cases["nomodel.pt"] = (None, "lacks the key.*'model'")
    cases["missing.pt"] = (None, "does not exist")
    for name, (_, message) in cases.items():
        with pytest.raises(CheckpointError, match=message) as info:
            load_checkpoint(tmp_path / name)
        assert name in str(info.value)
        assert isinstance(info.value, ValueError)


def test_load_model_weights(tmp_path):
    torch.manual_seed(0)
    src, dst = small(), small()
    torch.save(src.state_dict(), tmp_path / "bare.pt")
    load_model_weights(dst, tmp_path / "bare.pt")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(),
                                                 dst.state_dict().values()))
    save_checkpoint(tmp_path / "ck.pt", {"model": small().state_dict()})
    load_model_weights(dst, tmp_path / "ck.pt")
    ddp = {"module." + k: v for k, v in src.state_dict().items()}
    load_model_weights(dst, ddp)
    with pytest.raises(CheckpointError, match=r"shape mismatches 'features.conv1.weight'") as info:
        load_model_weights(small(width=4), tmp_path / "bare.pt")
    assert "'cnn-small' (SmallCNN)" in str(info.value)
    partial = dict(src.state_dict())
    partial.pop("fc.bias")
    partial["extra.weight"] = torch.ones(1)
    with pytest.raises(CheckpointError, match="missing keys 'fc.bias'.*unexpected keys 'extra"):
        load_model_weights(dst, partial)
    with pytest.raises(CheckpointError, match="neither a model state dict"):
        load_model_weights(dst, {"epoch": 1})


class RunsCode:
    """Unpickling this would call os.system: a code-carrying pickle."""

    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_code_carrying_pickle_is_refused_as_such(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2)}, "x": RunsCode()}, path)
    before = path.read_bytes()
    for load in (load_checkpoint, lambda p: load_model_weights(small(), p)):
        with pytest.raises(CheckpointError, match="carries code.*system") as info:
            load(path)
        assert "corrupt" not in str(info.value)
    assert path.read_bytes() == before


def test_flipped_byte_inside_a_weight_is_detected(tmp_path):
    path = tmp_path / "ckpt.pt"
    weights = torch.arange(64, dtype=torch.float32) + 0.5
    save_checkpoint(path, {"model": {"w": weights}})
    assert torch.equal(load_checkpoint(path)["model"]["w"], weights)
    data = bytearray(path.read_bytes())
    at = bytes(data).index(weights.numpy().tobytes()) + 17  # inside the tensor's bytes
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=True)["model"]["w"], weights)
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_model_weights(torch.nn.Module(), path)
