"""The one training runner: supervised training and SSL pretraining both drive it.

A :class:`TrainingTask` holds what is a run's own (its model, optimizer, data, the steps of
one epoch, the checkpoint payload); :func:`run` does the rest the same way for every task:

* opening ``out_dir/last.pt``: a fresh run never overwrites it, a resumed run is checked
  against it (:meth:`TrainingTask.check_resume`; a differing configuration is refused with
  a ``CheckpointError`` naming the keys, and the old checkpoint is left untouched);
* the epoch loop (``stop_after`` stops early as if interrupted) with a progress bar;
* every process's RNG state (torch, CUDA, Python, NumPy and the task's own generators)
  saved after every epoch and restored on resume, so a resumed run is bit-identical;
* after every epoch, on rank 0 only (torchrun): the atomic checkpoint
  (:func:`equivision.checkpoint.save_checkpoint`) first, then the CSV logs
  (:func:`equivision.io.write_csv`) rewritten from the checkpoint's history, so the logs
  never hold rows that no checkpoint holds; then a barrier;
* callbacks ``on_epoch_end(epoch, model, history)`` run with the RNG states preserved;
  callbacks ``on_step_end(step, model)`` too, after every optimiser step of a task that
  reports its steps with :meth:`TrainingTask.end_step` (``step`` counts the steps done
  since the run began, across epochs and resumes).

Example::

    class Task(TrainingTask):
        log_keys = ("epoch", "loss")
        def run_epoch(self, epoch): ...; return {"epoch": epoch, "loss": loss}
        def state(self): return {"model": self.model.state_dict()}

    history = run(Task(), RunOptions(epochs=3, out_dir="runs/x", resume=True))
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import __version__
from ..checkpoint import CheckpointError, save_checkpoint
from ..io import write_csv
from ..utils import get_rng_state, preserve_rng_state, set_rng_state
from .distributed import barrier, dist_info, gather_objects
from .resume import check_history, open_checkpoint, refuse_changes

__all__ = ["TrainingTask", "RunOptions", "run", "CHECKPOINT_NAME", "LOG_NAME"]

#: File name of the per-epoch checkpoint inside ``out_dir``.
CHECKPOINT_NAME = "last.pt"
#: File name of the per-epoch CSV log inside ``out_dir``.
LOG_NAME = "log.csv"

Table = tuple[tuple[str, ...], dict[str, list[Any]]]


class TrainingTask:
    """What one kind of training holds besides the runner's loop.

    Subclasses set :attr:`log_keys` (the columns of ``log.csv``; the first is ``"epoch"``)
    and implement :meth:`run_epoch` and :meth:`state`; the other hooks have defaults.

    Attributes:
        log_keys: columns of the per-epoch log and keys of the returned history.
        required_keys: checkpoint keys a resumable checkpoint must hold.
        model: the module handed to callbacks (None: no callbacks possible).
    """

    log_keys: tuple[str, ...] = ("epoch",)
    required_keys: tuple[str, ...] = ("epoch", "history", "rng")
    model: nn.Module | None = None
    #: the ``on_step_end`` hooks of the run's callbacks (set by :func:`run`)
    step_hooks: Sequence[Any] = ()

    def end_step(self, step: int) -> None:
        """Report that optimiser step ``step`` (1-based over the whole run) is done: every
        callback's ``on_step_end(step, model)`` runs, with the RNG states preserved so
        that a watched run draws the same random numbers as an unwatched one. A task
        that counts steps calls this from :meth:`run_epoch`; the others never need to."""
        if not self.step_hooks:
            return
        with preserve_rng_state():
            for hook in self.step_hooks:
                hook(step, self.model)

    def start(self) -> None:
        """Set up a fresh run (seeding, broadcasting rank 0's weights)."""

    def check_resume(self, ckpt: dict[str, Any], where: str) -> list[str]:
        """Settings that differ from the checkpoint's and forbid resuming it, each as
        ``"key: saved -> current"``; called before anything is loaded."""
        return []

    def restore(self, ckpt: dict[str, Any], where: str) -> None:
        """Load the checkpoint's model, optimizer, ... state (raise ``CheckpointError``
        naming ``where`` when it does not fit)."""

    def generators(self) -> dict[str, torch.Generator]:
        """The task's own generators, saved and restored with the global RNG states."""
        return {}

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """Train epoch ``epoch`` (from 1); returns its log row keyed by :attr:`log_keys`."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """The checkpoint payload besides ``epoch``, ``history`` and ``rng``."""
        raise NotImplementedError

    def extra_logs(self) -> dict[str, Table]:
        """More CSV files to write next to ``log.csv``: ``{file name: (columns, rows)}``."""
        return {}

    def summary(self, row: dict[str, Any]) -> dict[str, str]:
        """What the epoch progress bar shows after an epoch."""
        return {}


@dataclass
class RunOptions:
    """How :func:`run` runs a task.

    Attributes:
        epochs: total number of epochs (a resumed run trains up to this many).
        out_dir: where to write ``last.pt`` and the CSV logs after every epoch (None:
            nothing is written and resuming is impossible).
        resume: continue from ``out_dir/last.pt`` (a fresh run if there is none, with a
            warning); with False an existing checkpoint raises ``FileExistsError``.
        stop_after: stop after this epoch as if interrupted (None: run to ``epochs``).
        callbacks: objects with an optional ``on_epoch_end(epoch, model, history)`` and
            an optional ``on_step_end(step, model)`` (see :meth:`TrainingTask.end_step`).
        progress: show progress bars (rank 0 only).
        desc: the epoch bar's label.
    """

    epochs: int
    out_dir: str | os.PathLike | None = None
    resume: bool = False
    stop_after: int | None = None
    callbacks: Sequence[Any] = ()
    progress: bool = True
    desc: str = "epochs"

    @property
    def checkpoint_path(self) -> Path | None:
        """``out_dir/last.pt`` (None without ``out_dir``)."""
        return None if self.out_dir is None else Path(self.out_dir) / CHECKPOINT_NAME


def run(task: TrainingTask, options: RunOptions) -> dict[str, list[Any]]:
    """Run ``task`` for ``options.epochs`` epochs (fresh or resumed); returns the history:
    a dict of equal-length lists keyed by ``task.log_keys``."""
    path = options.checkpoint_path
    task.step_hooks = [hook for hook in (getattr(c, "on_step_end", None)
                                         for c in options.callbacks) if callable(hook)]
    ckpt = open_checkpoint(path, options.resume, task.required_keys, stacklevel=4)
    if ckpt is None:
        task.start()
        start, history = 0, {k: [] for k in task.log_keys}
    else:
        assert path is not None
        start, history = _resume(task, ckpt, f"checkpoint file {str(path)!r}", options.epochs)
    last = options.epochs if options.stop_after is None else min(options.epochs,
                                                                 options.stop_after)
    show = options.progress and dist_info()[0] == 0
    bar = tqdm(range(start, last), initial=start, total=options.epochs, desc=options.desc,
               disable=not show)
    for index in bar:
        epoch = index + 1
        row = task.run_epoch(epoch)
        for key in task.log_keys:
            history[key].append(row[key])
        _save(task, path, epoch, history)
        bar.set_postfix(task.summary(row))
        _call_back(options.callbacks, epoch, task.model, history)
    bar.close()
    return {k: list(v) for k, v in history.items()}


def _resume(task: TrainingTask, ckpt: dict[str, Any], where: str, epochs: int
            ) -> tuple[int, dict[str, list[Any]]]:
    """Check the checkpoint against the task, load it; returns ``(epoch, history)``."""
    refuse_changes(where, task.check_resume(ckpt, where))
    task.restore(ckpt, where)
    start, history = check_history(ckpt, task.log_keys, where)
    _restore_rng(task, ckpt["rng"], where)
    if start >= epochs:
        warnings.warn(f"{where} has already trained {start} of {epochs} epochs; nothing to "
                      "do", stacklevel=4)
    return start, history


def _rng_state(task: TrainingTask) -> dict[str, Any]:
    """This process's global RNG states plus the task's generators."""
    return {**get_rng_state(), **{k: g.get_state() for k, g in task.generators().items()}}


def _restore_rng(task: TrainingTask, saved: Any, where: str) -> None:
    """Restore this process's RNG states from a checkpoint's ``rng`` entry: a list with one
    state per process (or, from older checkpoints, one state)."""
    rank, world = dist_info()
    states = saved if isinstance(saved, list) else [saved]
    if len(states) != world:
        warnings.warn(f"{where} was written by {len(states)} process(es), now {world}; every "
                      "process restores rank 0's RNG state, so the run is not exact",
                      stacklevel=5)
    state = states[rank] if len(states) == world else states[0]
    try:
        set_rng_state(state)
        for name, generator in task.generators().items():
            generator.set_state(state[name])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{where}: its RNG state is malformed: {e}") from e


def _save(task: TrainingTask, path: Path | None, epoch: int,
          history: dict[str, list[Any]]) -> None:
    """Rank 0 writes the checkpoint, then the CSV logs; every process then waits."""
    rng = gather_objects(_rng_state(task))  # a collective: every process takes part
    if path is not None and dist_info()[0] == 0:
        save_checkpoint(path, {**task.state(), "epoch": epoch, "history": history,
                               "rng": rng, "equivision_version": __version__})
        tables = {LOG_NAME: (task.log_keys, history), **task.extra_logs()}
        for name, (keys, rows) in tables.items():
            write_csv(path.parent / name, keys,
                      ([rows[k][i] for k in keys] for i in range(len(rows[keys[0]]))))
    barrier()


def _call_back(callbacks: Sequence[Any], epoch: int, model: nn.Module | None,
               history: dict[str, list[Any]]) -> None:
    """Call every callback's ``on_epoch_end`` with the RNG states preserved."""
    if not callbacks:
        return
    with preserve_rng_state():
        for callback in callbacks:
            hook = getattr(callback, "on_epoch_end", None)
            if hook is not None:
                hook(epoch, model, {k: list(v) for k, v in history.items()})
