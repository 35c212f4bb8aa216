"""Supervised training: the loop, exact resumption, its checkpoints, segmentation."""

import csv
import os
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from equivision.checkpoint import (
    FORMAT,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from equivision.models import create_model, model_from_checkpoint
from equivision.models.cnn import SmallCNN
from equivision.training import HISTORY_KEYS, TrainConfig, TrainError, evaluate, train
from equivision.utils import (
    seed_everything,
)


class Pairs(Dataset):
    """(image (1, size, size), int label) pairs; the label shifts the image mean."""

    def __init__(self, n=48, size=8, classes=2, seed=0, label_offset=0):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.x = torch.randn(n, 1, size, size, generator=g) * 0.5 + self.y.view(-1, 1, 1, 1)
        self.label_offset = label_offset

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i]) + self.label_offset


def small(**kw):
    return create_model("cnn-small", num_classes=2, **kw)


def quiet(**kw):
    base = dict(epochs=2, batch_size=8, lr=0.05, device="cpu", seed=0)
    base.update(kw)
    return TrainConfig(**base)


def noisy_augment(x):
    """Randomness from torch, Python and NumPy, so that all RNG states matter on resume."""
    if random.random() < 0.5:
        x = x.flip(-1)
    return x + 0.05 * torch.randn_like(x) + float(np.random.rand()) * 0.01


class Crash:
    def __init__(self, after):
        self.after = after

    def on_epoch_end(self, epoch, model, history):
        if epoch == self.after:
            raise KeyboardInterrupt("simulated interruption")


class RandomConsumer:
    """A callback that draws random numbers; it must not change the training stream."""

    def __init__(self):
        self.epochs = []

    def on_epoch_end(self, epoch, model, history):
        self.epochs.append((epoch, len(history["epoch"])))
        torch.rand(100)
        random.random()
        np.random.rand()


# ----------------------------------------------------------------------------- training


def test_loss_decreases_and_log(tmp_path):
    torch.manual_seed(0)
    model = small()
    data, val = Pairs(48, seed=0), Pairs(32, seed=1)
    before = evaluate(model, val, batch_size=16)
    cb = RandomConsumer()
    cfg = quiet(epochs=6, optimizer="adam", lr=0.02, weight_decay=0.0, warmup_epochs=1)
    hist = train(model, data, val, cfg, out_dir=tmp_path, callbacks=[cb], progress=False)
    after = evaluate(model, val, batch_size=16)
    assert list(hist) == list(HISTORY_KEYS)
    assert hist["epoch"] == [1, 2, 3, 4, 5, 6]
    assert hist["train_loss"][-1] < hist["train_loss"][0]
    assert after["loss"] < before["loss"] and after["accuracy"] >= 0.8
    assert hist["val_acc"][-1] == pytest.approx(after["accuracy"])
    assert hist["lr"][0] == pytest.approx(0.02 / 6)  # warmup: 6 steps per epoch
    assert cb.epochs == [(e, e) for e in range(1, 7)]
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and list(rows[0]) == list(HISTORY_KEYS)
    assert float(rows[-1]["train_loss"]) == pytest.approx(hist["train_loss"][-1])
    raw = torch.load(tmp_path / "last.pt", weights_only=True)  # everything is weights-only
    assert raw["format"] == FORMAT and raw["epoch"] == 6 and raw["model_name"] == "cnn-small"
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "log.csv"]


def test_train_without_val_or_out_dir():
    torch.manual_seed(0)
    hist = train(small(), Pairs(16), config=quiet(epochs=1, schedule="constant"), progress=False)
    assert hist["val_loss"] == [None] and hist["val_acc"] == [None]


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_is_bit_identical(tmp_path):
    cfg = quiet(epochs=3, warmup_epochs=1, weight_decay=1e-3, momentum=0.9)
    data, val = Pairs(40, seed=0), Pairs(16, seed=1)

    seed_everything(0)
    straight = small(dropout=0.3)
    hist_a = train(straight, data, val, cfg, out_dir=tmp_path / "a", augment=noisy_augment,
                   callbacks=[RandomConsumer()], progress=False)

    seed_everything(0)
    interrupted = small(dropout=0.3)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, data, val, cfg, out_dir=tmp_path / "b", augment=noisy_augment,
              callbacks=[Crash(after=1)], progress=False)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1

    # everything fresh, global RNGs in another state: the checkpoint must restore it all
    seed_everything(1234)
    torch.rand(7)
    resumed = small(dropout=0.3)
    hist_b = train(resumed, Pairs(40, seed=0), Pairs(16, seed=1), quiet(**{**cfg.to_dict()}),
                   out_dir=tmp_path / "b", resume=True, augment=noisy_augment, progress=False)

    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for key in HISTORY_KEYS:
        if key != "time":
            assert hist_a[key] == hist_b[key], key
    last_a = load_checkpoint(tmp_path / "a" / "last.pt")
    last_b = load_checkpoint(tmp_path / "b" / "last.pt")
    assert all(torch.equal(last_a["model"][k], last_b["model"][k]) for k in last_a["model"])
    with open(tmp_path / "b" / "log.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2", "3"]


def test_refuses_to_overwrite_existing_run(tmp_path):
    torch.manual_seed(0)
    train(small(), Pairs(16), config=quiet(epochs=1), out_dir=tmp_path, progress=False)
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(FileExistsError, match="resume=True"):
        train(small(), Pairs(16), config=quiet(epochs=1), out_dir=tmp_path, progress=False)
    assert (tmp_path / "last.pt").read_bytes() == before


def test_resume_finished_run_and_missing_checkpoint(tmp_path):
    torch.manual_seed(0)
    hist = train(small(), Pairs(16), config=quiet(epochs=1), out_dir=tmp_path, progress=False)
    with pytest.warns(UserWarning, match="nothing to do"):
        again = train(small(), Pairs(16), config=quiet(epochs=1), out_dir=tmp_path,
                      resume=True, progress=False)
    assert again["train_loss"] == hist["train_loss"]
    with pytest.warns(UserWarning, match="starting a fresh run"):
        train(small(), Pairs(16), config=quiet(epochs=1), out_dir=tmp_path / "new",
              resume=True, progress=False)
    with pytest.raises(ValueError, match="out_dir"):
        train(small(), Pairs(16), config=quiet(epochs=1), resume=True, progress=False)


def test_resume_with_other_architecture(tmp_path):
    torch.manual_seed(0)
    train(small(), Pairs(16), config=quiet(epochs=1), out_dir=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="width"):
        train(small(width=4), Pairs(16), config=quiet(epochs=2), out_dir=tmp_path,
              resume=True, progress=False)
    # a model not built by create_model: caught by the key/shape check
    with pytest.raises(CheckpointError, match="shape mismatch"):
        train(SmallCNN(num_classes=2, width=4), Pairs(16), config=quiet(epochs=2),
              out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="Sequential"):
        train(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), Pairs(16), config=quiet(epochs=2),
              out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="optimizer"):
        train(small(), Pairs(16), config=quiet(epochs=2, optimizer="adam"), out_dir=tmp_path,
              resume=True, progress=False)


def test_resume_with_other_settings_warns_naming_them(tmp_path):
    torch.manual_seed(0)
    train(small(), Pairs(16), config=quiet(epochs=1), out_dir=tmp_path, progress=False)
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match=r"differing keys: optimizer: 'sgd' -> 'adam'"):
        train(small(), Pairs(16), config=quiet(epochs=2, optimizer="adam"), out_dir=tmp_path,
              resume=True, progress=False)
    assert (tmp_path / "last.pt").read_bytes() == before  # a refused resume writes nothing
    with pytest.warns(UserWarning, match=r"lr \(0\.05 -> 0\.1\).*steps per epoch \(2 -> 3"):
        train(small(), Pairs(24), config=quiet(epochs=2, lr=0.1), out_dir=tmp_path,
              resume=True, progress=False)
    with open(tmp_path / "log.csv") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]


def test_resume_from_corrupt_checkpoint(tmp_path):
    torch.manual_seed(0)
    train(small(), Pairs(16), config=quiet(epochs=1), out_dir=tmp_path, progress=False)
    path = tmp_path / "last.pt"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        train(small(), Pairs(16), config=quiet(epochs=2), out_dir=tmp_path, resume=True,
              progress=False)


def test_bad_data_and_config():
    with pytest.raises(TrainError, match="labels range"):
        train(small(), Pairs(16, label_offset=5), config=quiet(epochs=1), progress=False)
    with pytest.raises(ValueError, match="empty"):
        train(small(), Pairs(0), config=quiet(epochs=1), progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="grad_clip"):
        TrainConfig(grad_clip=-1.0)
    cfg = TrainConfig(optimizer="adamw", grad_clip=1.0, label_smoothing=0.1)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(TrainError, match="loss became"):
        train(small(), Pairs(16), config=quiet(epochs=1, lr=1e30, momentum=0.0),
              augment=lambda x: x * float("inf"), progress=False)


def test_evaluate_restores_mode_and_rng():
    torch.manual_seed(0)
    model = small(dropout=0.5).train()
    state = torch.get_rng_state()
    res = evaluate(model, Pairs(20), batch_size=6, device="cpu")
    assert torch.equal(state, torch.get_rng_state())
    assert model.training
    assert set(res) == {"loss", "accuracy"} and 0 <= res["accuracy"] <= 1



def test_model_from_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = create_model("cnn-small", num_classes=2, width=6)
    train(model, Pairs(16), config=quiet(epochs=1), out_dir=tmp_path, progress=False)
    rebuilt = model_from_checkpoint(tmp_path / "last.pt")
    assert rebuilt.equivision_kwargs == model.equivision_kwargs and not rebuilt.training
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(rebuilt(x), model.eval()(x))
    save_checkpoint(tmp_path / "anon.pt", {"model": model.state_dict()})
    with pytest.raises(CheckpointError, match="does not record which model"):
        model_from_checkpoint(tmp_path / "anon.pt")



# ---------------------------------------------------------------- dense labels (segmentation)


class Maps(Dataset):
    """(image (1, 8, 8), label map (8, 8)): class 1 where the pixel is bright, 255 on row 0."""

    def __init__(self, n=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 1, 8, 8, generator=g)
        self.y = (self.x[:, 0] > 0.5).long()
        self.y[:, 0] = 255

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def pixel_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))


def test_dense_training_and_evaluate():
    data = Maps()
    model = pixel_net()
    history = train(model, data, data, quiet(epochs=4, lr=0.5), progress=False)
    assert history["val_loss"][-1] < history["val_loss"][0]
    assert history["val_acc"][-1] > 0.9 and history["train_acc"][-1] > 0.8
    res = evaluate(model, data, batch_size=5)
    with torch.no_grad():
        out = model(data.x)
    ref = nn.functional.cross_entropy(out, data.y, ignore_index=255)
    assert res["loss"] == pytest.approx(float(ref), rel=1e-5)
    valid = data.y != 255
    acc = float(((out.argmax(1) == data.y) & valid).sum()) / int(valid.sum())
    assert res["accuracy"] == pytest.approx(acc)
    assert 0 < res["miou"] <= 1 and "miou" not in evaluate(small(), Pairs(n=8), 4)


def test_dense_ignored_pixels_do_not_train():
    data, other = Maps(n=8), Maps(n=8)
    other.x[:, :, 0] = torch.rand(8, 1, 8)  # other pixel values under the ignored row 0
    a, b = pixel_net(), pixel_net()
    train(a, data, config=quiet(epochs=1), progress=False)
    train(b, other, config=quiet(epochs=1), progress=False)
    # 1x1 convolutions: row 0 only reaches its own (ignored) outputs, so it has no say
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a.parameters(), b.parameters()))
    c = pixel_net()
    train(c, Maps(n=8, seed=1), config=quiet(epochs=1), progress=False)
    assert not all(torch.allclose(p, q, atol=1e-6) for p, q in zip(a.parameters(),
                                                                     c.parameters()))


def test_dense_labels_reject_mask_blind_augment_and_bad_outputs():
    data = Maps(n=8)
    with pytest.raises(TrainError, match="takes_masks"):
        train(pixel_net(), data, config=quiet(epochs=1), augment=noisy_augment, progress=False)

    def flip_both(x, y):
        return x.flip(-1), y.flip(-1)

    flip_both.takes_masks = True
    train(pixel_net(), data, config=quiet(epochs=1), augment=flip_both, progress=False)
    with pytest.raises(TrainError, match=r"\(N, num_classes, H, W\)"):
        train(small(), data, config=quiet(epochs=1), progress=False)
    bad = Maps(n=8)
    bad.y[0, 3, 3] = 7
    with pytest.raises(TrainError, match="besides the ignored 255"):
        train(pixel_net(), bad, config=quiet(epochs=1), progress=False)
    with pytest.raises(ValueError, match="ignore_index"):
        TrainConfig(ignore_index=1.5)


class StepWatcher:
    """A step callback that draws random numbers and records what it saw."""

    def __init__(self):
        self.steps, self.weights, self.training = [], [], []

    def on_step_end(self, step, model):
        torch.rand(5)  # must not change the training stream
        self.steps.append(step)
        self.weights.append(float(model.fc.weight.detach().sum()))
        self.training.append(model.training)


def test_step_hooks_fire_after_every_supervised_step(tmp_path):
    """Issue 15: supervised training reports its steps, as SSL pretraining does."""
    cfg = quiet(epochs=3)  # 40 images, batch 8: 5 steps per epoch
    seed_everything(0)
    plain = train(small(), Pairs(40), config=cfg, progress=False)
    seed_everything(0)
    watcher = StepWatcher()
    watched = train(small(), Pairs(40), config=cfg, callbacks=[watcher], progress=False)
    assert watcher.steps == list(range(1, 16))
    assert len(set(watcher.weights)) == 15 and all(watcher.training)  # after each update
    assert {k: v for k, v in plain.items() if k != "time"} == {
        k: v for k, v in watched.items() if k != "time"}
    # a resumed run goes on counting from where the checkpoint stopped
    first, rest = StepWatcher(), StepWatcher()
    seed_everything(0)
    with pytest.raises(KeyboardInterrupt):
        train(small(), Pairs(40), config=cfg, out_dir=tmp_path, progress=False,
              callbacks=[first, Crash(after=1)])
    train(small(), Pairs(40), config=cfg, out_dir=tmp_path, resume=True, progress=False,
          callbacks=[rest])
    assert first.steps == list(range(1, 6)) and rest.steps == list(range(6, 16))


def _drop_layout_arguments(path):
    """Rewrite a training checkpoint as one written before ``order`` / ``dropout_layers``
    existed."""
    state = load_checkpoint(path)
    state["model_kwargs"] = {k: v for k, v in state["model_kwargs"].items()
                             if k not in ("order", "dropout_layers")}
    save_checkpoint(path, state)


def test_resume_from_a_checkpoint_older_than_an_argument(tmp_path):
    """An argument added since the checkpoint was written counts with the value the old
    model had: cnn7's default, z2cnn's legacy layout; a model in another layout is refused."""
    data = Pairs(8, size=28)
    for name, old in (("cnn7", {}), ("z2cnn", {"order": "bn-relu", "dropout_layers": 7})):
        out = tmp_path / name
        torch.manual_seed(0)
        train(create_model(name, width=4, num_classes=2, **old), data,
              config=quiet(epochs=1), out_dir=out, progress=False)
        _drop_layout_arguments(out / "last.pt")
        hist = train(create_model(name, width=4, num_classes=2, **old), data,
                     config=quiet(epochs=2), out_dir=out, resume=True, progress=False)
        assert len(hist["train_loss"]) == 2
    with pytest.raises(CheckpointError, match="order"):
        train(create_model("z2cnn", width=4, num_classes=2), data, config=quiet(epochs=3),
              out_dir=tmp_path / "z2cnn", resume=True, progress=False)
