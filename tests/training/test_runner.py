"""The shared training runner, driven by a tiny custom task."""

from __future__ import annotations

import csv
import warnings

import pytest
import torch
from torch import nn

import equivision.training.runner as runner_module
from equivision.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from equivision.training import RunOptions, TrainingTask, config_differences, run

pytestmark = pytest.mark.usefixtures("one_thread")


def _linear(seed: int) -> nn.Linear:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Linear(3, 1)


class NoisyRegression(TrainingTask):
    """Fits ``w`` to noisy targets: every epoch draws from torch's global RNG (the noise)
    and from its own generator (the order), so resuming is exact only if both come back."""

    log_keys = ("epoch", "loss", "draw")
    required_keys = ("model", "optimizer", "epoch", "history", "rng", "config")

    def __init__(self, lr: float = 0.05, seed: int = 0) -> None:
        self.config = {"lr": lr, "seed": seed}
        self.model = _linear(seed)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9)
        self.order = torch.Generator().manual_seed(seed)
        self.x = torch.linspace(-1, 1, 24).reshape(8, 3)

    def start(self) -> None:
        torch.manual_seed(self.config["seed"])

    def check_resume(self, ckpt, where):
        return config_differences(ckpt["config"], self.config)

    def restore(self, ckpt, where):
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])

    def generators(self):
        return {"order": self.order}

    def run_epoch(self, epoch):
        total = 0.0
        for i in torch.randperm(8, generator=self.order).tolist():
            target = self.x[i].sum() + 0.1 * torch.randn(())
            loss = (self.model(self.x[i]).squeeze() - target) ** 2
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            total += float(loss.detach())
        return {"epoch": epoch, "loss": total / 8, "draw": float(torch.rand(()))}

    def state(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "config": dict(self.config)}


def options(out_dir, **kw) -> RunOptions:
    return RunOptions(**{"epochs": 4, "out_dir": out_dir, "progress": False, **kw})


def csv_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_resume_continues_exactly(tmp_path):
    straight = NoisyRegression()
    hist_a = run(straight, options(tmp_path / "a"))
    run(NoisyRegression(), options(tmp_path / "b", stop_after=2))
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 2
    torch.manual_seed(99)  # another global RNG state: the checkpoint must restore it
    resumed = NoisyRegression(seed=0)
    resumed.model.weight.data.fill_(5.0)  # other weights: the checkpoint replaces them
    hist_b = run(resumed, options(tmp_path / "b", resume=True))
    assert hist_a == hist_b and hist_a["epoch"] == [1, 2, 3, 4]
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    # without restoring the generators the run would differ: the test can fail
    assert len(set(hist_a["draw"])) == 4


def test_config_mismatch_is_refused_and_checkpoint_kept(tmp_path):
    run(NoisyRegression(), options(tmp_path, stop_after=1))
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match=r"differing keys: lr: 0\.05 -> 0\.2"):
        run(NoisyRegression(lr=0.2), options(tmp_path, resume=True))
    assert (tmp_path / "last.pt").read_bytes() == before
    with pytest.raises(FileExistsError, match="resume=True"):
        run(NoisyRegression(), options(tmp_path))
    assert (tmp_path / "last.pt").read_bytes() == before


def test_csv_rows_match_checkpoints_even_when_a_save_fails(tmp_path, monkeypatch):
    run(NoisyRegression(), options(tmp_path, stop_after=2))
    ckpt = load_checkpoint(tmp_path / "last.pt")
    rows = csv_rows(tmp_path / "log.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert [float(r["loss"]) for r in rows] == ckpt["history"]["loss"]

    def failing_save(path, state):
        raise OSError("disk full")

    monkeypatch.setattr(runner_module, "save_checkpoint", failing_save)
    with pytest.raises(OSError, match="disk full"):
        run(NoisyRegression(), options(tmp_path, resume=True))
    assert [r["epoch"] for r in csv_rows(tmp_path / "log.csv")] == ["1", "2"]
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[int, list[int]]] = []

    def on_epoch_end(self, epoch, model, history) -> None:
        torch.rand(5)  # must not change the run's random stream
        self.seen.append((epoch, history["epoch"]))


def test_callbacks_see_history_and_leave_rng_alone(tmp_path):
    plain = run(NoisyRegression(), options(None, epochs=3))
    recorder = Recorder()
    watched = run(NoisyRegression(), options(None, epochs=3, callbacks=[recorder]))
    assert plain == watched
    assert recorder.seen == [(1, [1]), (2, [1, 2]), (3, [1, 2, 3])]


def test_finished_and_missing_runs_warn(tmp_path):
    run(NoisyRegression(), options(tmp_path, epochs=1))
    with pytest.warns(UserWarning, match="nothing to do"):
        run(NoisyRegression(), options(tmp_path, epochs=1, resume=True))
    with pytest.warns(UserWarning, match="starting a fresh run"):
        run(NoisyRegression(), options(tmp_path / "new", epochs=1, resume=True))
    with pytest.raises(ValueError, match="out_dir"):
        run(NoisyRegression(), options(None, resume=True))


def test_malformed_rng_state_is_a_checkpoint_error(tmp_path):
    run(NoisyRegression(), options(tmp_path, stop_after=1))
    ckpt = load_checkpoint(tmp_path / "last.pt")
    del ckpt["rng"][0]["order"]
    save_checkpoint(tmp_path / "last.pt", ckpt)  # a valid checksum: the RNG check must catch it
    with warnings.catch_warnings(), pytest.raises(CheckpointError, match="RNG state"):
        run(NoisyRegression(), options(tmp_path, resume=True))


class SteppedRegression(NoisyRegression):
    """NoisyRegression that reports each of its 8 steps per epoch to the runner."""

    def run_epoch(self, epoch):
        total = 0.0
        for k, i in enumerate(torch.randperm(8, generator=self.order).tolist()):
            target = self.x[i].sum() + 0.1 * torch.randn(())
            loss = (self.model(self.x[i]).squeeze() - target) ** 2
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            total += float(loss.detach())
            self.end_step((epoch - 1) * 8 + k + 1)
        return {"epoch": epoch, "loss": total / 8, "draw": float(torch.rand(()))}


class StepRecorder:
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.weights: list[float] = []

    def on_step_end(self, step, model) -> None:
        torch.rand(3)  # must not change the run's random stream
        self.steps.append(step)
        self.weights.append(float(model.weight.detach().sum()))


def test_step_hooks_run_after_every_step_and_leave_rng_alone(tmp_path):
    plain = run(SteppedRegression(), options(None, epochs=3))
    recorder = StepRecorder()
    watched = run(SteppedRegression(), options(None, epochs=3, callbacks=[recorder]))
    assert plain == watched  # the hook's random draws did not leak into the run
    assert recorder.steps == list(range(1, 25))
    assert len(set(recorder.weights)) == 24  # called after each update, with the model
    # a resumed run goes on counting; epoch-only callbacks and steps coexist
    first, rest, both = StepRecorder(), StepRecorder(), Recorder()
    run(SteppedRegression(), options(tmp_path, epochs=3, stop_after=1, callbacks=[first]))
    resumed = run(SteppedRegression(), options(tmp_path, epochs=3, resume=True,
                                               callbacks=[rest, both]))
    assert first.steps == list(range(1, 9)) and rest.steps == list(range(9, 25))
    assert [e for e, _ in both.seen] == [2, 3] and resumed == plain
    # a task that never reports steps runs its epoch callbacks only
    quiet = StepRecorder()
    run(NoisyRegression(), options(None, epochs=1, callbacks=[quiet]))
    assert quiet.steps == []
