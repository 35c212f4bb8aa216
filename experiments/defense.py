"""The equivariance-defense paper's experiments at CPU scale (digits classifier, scenes
segmenter).

Sub-commands (each takes ``--quick``; ``all`` runs them in order):

    models   train and cache the digits classifier (``cnn-small``, 28 px: any input size,
             so the 0.3x-2x resizes of the default transforms work), an independently
             trained surrogate of it (transfer attacks), the ``segmenter`` on ``scenes``
             (32 px), and the rotation and contrastive heads of both
    table1   classification: rows Clean, PGD, MIM, CW, Adaptive (worst case over a
             lambda_e sweep), BPDA+EOT; columns Vanilla, Random, Rotation, Contrastive,
             Invariance, Equivariance (paper Tables 1-2)
    table2   segmentation: the same with Houdini instead of CW (mIoU)
    table4   equivariance score of clean / attacked / restored images, with bootstrap
             intervals and the paired per-image changes
    table5   equivariance defense with subsets of the transformations
    table6   eps_v trade-off: clean vs robust metric for several eps_v
    fig3     robust metric against the number of constraints K (PNG)
             (table5/6, fig3: the automatic checks' attack curves run on the first config
             only, ``--sweep-checks every`` runs them on every config)
    throughput  images per core-second of a defended prediction and of one BPDA+EOT
             draw-step, batch 1 / 16 / 64, T = 5 / 20 (plans the sizes of ``worstcase``)
    checks   honest-evaluation checks: undefended robustness, transfer vs white-box,
             metric -> 0 as eps grows, more steps/restarts, worst case over repeated
             defended predictions, the released code's preset vs ours
    worstcase  the per-image worst case of the undefended model and of each defense over
             an attack cascade (transferred PGD/MIM/CW; the AutoAttack ensemble for the bare
             model; the adaptive lambda_e sweep, BPDA+EOT and APGD through BPDA for the
             defenses) and repeated defended predictions, with the clean cost and 95 %
             intervals (:mod:`support.worstcase`); ``--columns``, ``--n``, ``--clean-n``,
             ``--attack-size``, ``--defense-steps``, ``--seeds``, ``--tasks``

``--data fashion-mnist`` swaps the classification task for Fashion-MNIST with cnn7 (padding
1) trained on the defense's views (:class:`support.view_augment.ViewAugment`), three model
seeds; its outputs go to ``runs/defense-fashion[-quick]/`` and its models to
``runs/defense-models/fashion<scale>/``.

Standard attacks (PGD, MIM, CW, Houdini) are generated on the bare model and transferred
to the defense, as in the paper; Adaptive and BPDA+EOT have the defense in the loop.
Every number comes from :func:`equivision.robust.evaluate.evaluate_robustness`.

Results: ``runs/defense[-quick]/<command>.json`` and ``.md``; models and heads are cached
under ``runs/defense-models/<scale>/`` (an existing finished model is reused).
Example: ``python experiments/defense.py all --quick``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from support.defense_throughput import throughput
from support.view_augment import ViewAugment
from support.worstcase import COLUMNS as WORST_COLUMNS
from support.worstcase import (
    DEFAULT_COLUMNS,
    WORST_FULL,
    WORST_QUICK,
    worstcase,
    worstcase_markdown,
)
from torch import nn

from equivision.data import ImageDataset, get_dataset
from equivision.measure import write_atomic
from equivision.models import create_model, model_from_checkpoint
from equivision.robust import PGD, default_transforms, train_contrastive_head, train_rotation_head
from equivision.robust.evaluate import RobustnessConfig, RobustnessResult, evaluate_robustness
from equivision.robust.registry import save_head
from equivision.training import TrainConfig, evaluate, train

# --- scales ------------------------------------------------------------------------------
# n: test images of tables 1-2; attack_steps: PGD/MIM/CW/Houdini and adaptive; bpda_steps
# and eot: BPDA+EOT of tables 1-2; adaptive_columns: the defenses attacked adaptively (the
# paper runs the adaptive attack on its own defense only); defense_steps: T of the
# purifiers; sweep_bpda: the BPDA+EOT of the sweeps (tables 4-6, figure 3) on n_sweep
# images; check_n, check_eot: images and EOT draws of the checks. The quick scale aims at
# about 20 minutes for `all --quick` on 2 idle CPU cores (an estimate: measured at a load
# average of 9-14 it took about 55 minutes).
FULL = dict(
    n=500, n_sweep=500, attack_steps=20, bpda_steps=50, eot=8, defense_steps=20,
    adaptive_columns=("Rotation", "Contrastive", "Invariance", "Equivariance"), check_eot=8,
    check_more=dict(steps_factor=2, restarts=2), check_bpda_eps=(2.0, 4.0),
    lambdas=(0.0, 1.0, 10.0, 100.0, 1000.0), sweep_bpda=dict(steps=20, eot_samples=4),
    check_n=200, repeats=8, cls_epochs=40, seg_epochs=30, seg_train=2048, head_epochs=5,
    head_images=None, eps_v_ratios=(0.25, 0.5, 1.0, 1.5, 2.0, 2.5), ks=(1, 2, 4, 8),
    check_tasks=("cls", "seg"), eps_factors=(0.5, 1.0, 2.0, 4.0),
)
QUICK = dict(
    n=64, n_sweep=32, attack_steps=10, bpda_steps=5, eot=2, defense_steps=5,
    adaptive_columns=("Equivariance",), check_eot=4,
    check_more=dict(steps_factor=2, restarts=1), check_bpda_eps=(4.0,),
    lambdas=(0.0, 1000.0), sweep_bpda=dict(steps=5, eot_samples=2),
    check_n=32, repeats=4, cls_epochs=25, seg_epochs=12, seg_train=1024, head_epochs=2,
    head_images=512, eps_v_ratios=(0.5, 1.5, 2.5), ks=(1, 2, 4, 8),
    check_tasks=("cls",), eps_factors=(0.5, 1.0, 2.0, 4.0),
)

# --- tasks -------------------------------------------------------------------------------
# eps: the smallest round value at which 10-step PGD brings the undefended model to ~0
# (digits: 0.02 -> 19 %, 0.03 -> 1 %, 0.05 -> 0 % accuracy on 96 test images; scenes: mean
# per-image mIoU 49 % clean, 16 % at 8/255, 6 % at 16/255; at 4/255 the dataset mIoU only
# falls from 43 % to 23 %); eps_v = 1.5 eps, the
# paper's setting for models that are not adversarially trained (Table 2).
# feature_layer: F of the equivariance / invariance defenses. Classifier logits are
# invariant vectors, on which the two defenses coincide, so the classifier uses its last
# conv map (undone by g^-1 for equivariance, pooled for invariance); the segmenter uses its
# class scores before upsampling, as the released code does.
TASKS: dict[str, dict[str, Any]] = {
    "cls": dict(
        dataset="digits", size=28, model="cnn-small", model_kwargs=dict(width=16),
        eps=0.05, eps_v_ratio=1.5, head_layer="features.relu3", strong="cw", metric="accuracy",
        feature_layer="features.relu3",
        train=dict(lr=3e-3, batch_size=32, optimizer="adam", weight_decay=0.0),
    ),
    "seg": dict(
        dataset="scenes", size=32, model="segmenter", model_kwargs=dict(width=8),
        eps=8 / 255, eps_v_ratio=1.5, head_layer="enc2", strong="houdini", metric="miou",
        feature_layer="logits",
        train=dict(lr=3e-3, batch_size=32, optimizer="adam", weight_decay=0.0),
    ),
}
#: ``--data fashion-mnist``: the classification task on Fashion-MNIST (60k / 10k, 28 px) with
#: cnn7 at padding 1 (any input >= 4 px, so every default view fits; 7 layers, a receptive
#: field that covers a garment, unlike cnn-small's 7x7), trained with ViewAugment (rotations
#: +-15 deg, flips, jitter, resizes 0.3-2x: the defense's views); feature layer: its last
#: odd-kernel spatial map relu6 (14x14; conv7's 4x4 kernel shifts the grid by half a pixel).
#: eps = 0.1, the usual Fashion-MNIST radius and the smallest round value at which 20-step
#: PGD brings the undefended seed-0 model to 0 (the earlier 2-epoch model, 64 test images:
#: clean 67 %, eps 0.02 -> 55 %, 0.05 -> 23 %, 0.1 -> 0 %). Training: 4 epochs on all 60k
#: images (~110 core-s per epoch with channels-last weights; 85.9 % test accuracy, seed 0).
FASHION_CLS: dict[str, Any] = dict(
    dataset="fashion-mnist", size=28, model="cnn7", model_kwargs=dict(padding=1, dropout=0.1),
    eps=0.1, eps_v_ratio=1.5, head_layer="features.relu6", strong="cw", metric="accuracy",
    feature_layer="features.relu6", augment="views", epochs=4, train_n=None, seeds=(0, 1, 2),
    train=dict(lr=2e-3, batch_size=64, optimizer="adam", weight_decay=0.0),
    channels_last=True,
)
DATA_CHOICES = ("digits", "fashion-mnist")
#: the paper's Table 1 columns and their defenses (one mapping, shared with ``worstcase``)
DEFENSE_NAMES = WORST_COLUMNS
COLUMNS = tuple(DEFENSE_NAMES)
#: nested subsets of the default transforms (resize 0.3/0.6/1.4/2, jitter, hflip, rot -15/15)
K_ORDER = (5, 7, 1, 4, 6, 2, 0, 3)
SUBSETS = {"resizes only": (0, 1, 2, 3), "flip only": (5,), "rotations only": (6, 7),
           "jitter only": (4,), "all (K=8)": tuple(range(8))}


class Ctx:
    """Scale, paths and cached models of one run."""

    def __init__(self, quick: bool, root: Path, data: str = "digits") -> None:
        self.quick = quick
        self.scale = QUICK if quick else FULL
        self.scale_name = "quick" if quick else "full"
        self.data_name = data
        #: the task settings of this run (``--data fashion-mnist`` swaps the ``cls`` task)
        self.tasks = dict(TASKS) if data == "digits" else {**TASKS, "cls": FASHION_CLS}
        tag = "" if data == "digits" else "-fashion"
        self.out = root / (f"defense{tag}-quick" if quick else f"defense{tag}")
        self.models_dir = root / "defense-models" / (tag.lstrip("-") + self.scale_name)
        self._cache: dict[str, Any] = {}
        self.suffix = ""
        #: tasks of ``models`` and ``worstcase`` (``--tasks``); heads trained by ``models``
        self.run_tasks: tuple[str, ...] = ("cls", "seg")
        self.heads = data == "digits"
        self.seeds: tuple[int, ...] | None = None
        #: options of ``worstcase`` (attack_size, defense_steps, n, clean_n, columns)
        self.opts: dict[str, Any] = {}

    def data(self, task: str, split: str) -> Any:
        key = f"{task}/{split}"
        if key not in self._cache:
            t = self.tasks[task]
            kw: dict[str, Any] = {}
            if task == "seg" and split == "train":
                kw["n"] = self.scale["seg_train"]
            data = get_dataset(t["dataset"], split=split, size=t["size"], seed=0, **kw)
            if split == "train" and t.get("train_n"):
                data = _subset(data, t["train_n"])
            self._cache[key] = data
        return self._cache[key]

    def model(self, task: str, seed: int = 0) -> nn.Module:
        """The trained model of ``task`` (``seed`` 1: the transfer surrogate)."""
        key = f"model/{task}/{seed}"
        if key not in self._cache:
            self._cache[key] = train_model(self, task, seed)
        return self._cache[key]

    def head(self, task: str, kind: str) -> Path:
        path = self.models_dir / f"{task}-{kind}-head.pt"
        if not path.exists():
            train_head(self, task, kind, path)
        return path

    def eps(self, task: str) -> float:
        return float(self.tasks[task]["eps"])

    def eps_v(self, task: str) -> float:
        return self.tasks[task]["eps_v_ratio"] * self.eps(task)

    def defense_kwargs(self, task: str, kind: str, steps: int) -> dict[str, Any]:
        """Keyword arguments of ``build_defense(kind, model, ...)`` for ``task``: eps_v,
        ``steps`` T and where the purifier reads the model (a head defense its trained
        head's own layer, the others the task's feature layer)."""
        where = dict(head=self.head(task, kind)) if kind in ("rotation", "contrastive") \
            else dict(feature_layer=self.tasks[task]["feature_layer"])
        return dict(eps_v=self.eps_v(task), steps=steps, **where)


# --- models ------------------------------------------------------------------------------


def train_model(ctx: Ctx, task: str, seed: int) -> nn.Module:
    """Train (or reload) the model of ``task``; checkpoints in ``runs/defense-models``."""
    t = ctx.tasks[task]
    run_dir = ctx.models_dir / f"{task}-{t['model']}-seed{seed}"
    ckpt = run_dir / "last.pt"
    epochs = t.get("epochs") or ctx.scale["cls_epochs" if task == "cls" else "seg_epochs"]
    config = TrainConfig(epochs=epochs, seed=seed, device="cpu", **t["train"])
    # channels-last weights: 1.6-1.9x faster convolutions of cnn7 on one CPU thread (same
    # numbers up to rounding), for training and for every purification and attack
    fmt = torch.channels_last if t.get("channels_last") else torch.contiguous_format
    if ckpt.exists():
        model = model_from_checkpoint(ckpt).to(memory_format=fmt)
        if int(torch.load(ckpt, weights_only=True)["epoch"]) >= epochs:
            return model.eval()
    torch.manual_seed(seed)
    in_ch = 1 if task == "cls" else 3
    model = create_model(t["model"], in_channels=in_ch, **t["model_kwargs"]).to(memory_format=fmt)
    augment = ViewAugment() if t.get("augment") == "views" else None
    train(model, ctx.data(task, "train"), config=config, out_dir=run_dir,
          resume=ckpt.exists(), progress=False, augment=augment)
    return model.eval()


def _subset(dataset: Any, n: int | None) -> Any:
    if n is None or n >= len(dataset):
        return dataset
    return torch.utils.data.Subset(dataset, range(n))


def train_head(ctx: Ctx, task: str, kind: str, path: Path) -> None:
    """Train the rotation or contrastive head of ``task`` and save it atomically."""
    model = ctx.model(task)
    layer = ctx.tasks[task]["head_layer"]
    data = _subset(ctx.data(task, "train"), ctx.scale["head_images"])
    trainer = train_rotation_head if kind == "rotation" else train_contrastive_head
    t0 = time.perf_counter()
    head = trainer(model, layer, data, epochs=ctx.scale["head_epochs"], seed=0)
    save_head(path, head, layer)
    # the head's training record (rotation: loss and accuracy per epoch; contrastive: loss)
    print(f"  {task} {kind} head on {layer}, {len(data)} images, "
          f"{time.perf_counter() - t0:.0f} s: {getattr(head, 'history', None)}", flush=True)


def model_seeds(ctx: Ctx, task: str) -> tuple[int, ...]:
    """Seeds of the trained models of ``task`` (seed 1 doubles as the transfer surrogate)."""
    if ctx.seeds is not None:
        return ctx.seeds
    if "seeds" in ctx.tasks[task]:
        return tuple(ctx.tasks[task]["seeds"])
    return (0, 1) if task in ctx.scale["check_tasks"] else (0,)


def cmd_models(ctx: Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task in ctx.run_tasks:
        for seed in model_seeds(ctx, task):
            model = ctx.model(task, seed)
            out[f"{task}-seed{seed}"] = evaluate(model, ctx.data(task, "test"))
            print(f"  {task} seed {seed}: {out[f'{task}-seed{seed}']}", flush=True)
        if not ctx.heads:
            continue
        for kind in ("rotation", "contrastive"):
            out[f"{task}-{kind}-head"] = str(ctx.head(task, kind))
    lines = ["| model | test loss | accuracy | mIoU |", "|---|---|---|---|"]
    for name, m in out.items():
        if isinstance(m, dict):
            lines.append(f"| {name} | {m['loss']:.3f} | {m['accuracy']:.3f} | "
                         f"{m.get('miou', float('nan')):.3f} |")
    return {"results": out, "markdown": "\n".join(lines)}


# --- evaluation --------------------------------------------------------------------------


def run_eval(ctx: Ctx, task: str, column: str | None, attacks: Sequence[Any],
             n: int | None = None, equivariance: bool = False, repeats: int = 1,
             eps: float | None = None, dataset: Any = None, checks: str = "all",
             **defense_kwargs: Any) -> RobustnessResult:
    """One :func:`evaluate_robustness` call with this scale's settings (``checks``: the
    level of its automatic checks)."""
    model = ctx.model(task)
    name = DEFENSE_NAMES.get(column, column) if column else None
    kw = {**ctx.defense_kwargs(task, name, ctx.scale["defense_steps"]), **defense_kwargs} \
        if name else {}
    config = RobustnessConfig(
        eps=ctx.eps(task) if eps is None else eps, steps=ctx.scale["attack_steps"],
        eot_samples=ctx.scale["eot"], lambdas=ctx.scale["lambdas"], repeats=repeats,
        max_images=ctx.scale["n"] if n is None else n, batch_size=32, seed=0,
        equivariance=equivariance, defense_kwargs=kw if name else None, checks=checks)
    return evaluate_robustness(
        model, dataset if dataset is not None else ctx.data(task, "test"), list(attacks),
        name, config)


def metric(result: RobustnessResult, row: str, defended: bool = True) -> float:
    """The headline metric (accuracy or mIoU, in %) of one row."""
    r = result.row(row)
    m = r.defended if defended and r.defended is not None else r.undefended
    return 100.0 * m[result.metric]


def interval(result: RobustnessResult, row: str, defended: bool = True
             ) -> list[float] | None:
    """The 95% interval (in %) of :func:`metric`, None where the result has none."""
    r = result.row(row)
    key = "defended" if defended and r.defended is not None else "undefended"
    lo_hi = r.intervals.get(key, {}).get(result.metric)
    return None if lo_hi is None or None in lo_hi else [100.0 * v for v in lo_hi]


def cell(result: RobustnessResult, row: str, defended: bool = True) -> str:
    """``value [low, high]`` of :func:`metric` and :func:`interval`, in %."""
    ci = interval(result, row, defended)
    value = fmt(metric(result, row, defended))
    return value if ci is None else f"{value} [{ci[0]:.1f}, {ci[1]:.1f}]"


def bpda_spec(ctx: Ctx, label: str = "BPDA+EOT", sweep: bool = False, check: bool = False,
              **extra: Any) -> dict:
    opts = dict(ctx.scale["sweep_bpda"]) if sweep else dict(
        steps=ctx.scale["bpda_steps"],
        eot_samples=ctx.scale["check_eot" if check else "eot"])
    return {"name": "bpda-eot", "label": label, **opts, **extra}


def sweep_note(ctx: Ctx) -> str:
    b, steps = ctx.scale["sweep_bpda"], ctx.scale["defense_steps"]
    return (f"\n\n{n_sweep(ctx)} test images (95% intervals in brackets); PGD: "
            f"{ctx.scale['attack_steps']} steps on the bare model (transferred); BPDA+EOT: "
            f"{b['steps']} steps, EOT {b['eot_samples']}; defense T = {steps}.")


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def md_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def paper_table(ctx: Ctx, task: str) -> dict[str, Any]:
    """Tables 1 (cls) / 2 (seg): rows x defenses, the metric in %."""
    strong = ctx.tasks[task]["strong"]
    std = [{"name": "pgd", "label": "PGD"}, {"name": "mim", "label": "MIM"},
           {"name": strong, "label": strong.upper() if strong == "cw" else "Houdini"}]
    lam = "/".join(f"{v:g}" for v in ctx.scale["lambdas"])
    rows = ["Clean"] + [s["label"] for s in std] + [f"Adaptive ({lam})", "BPDA+EOT"]
    table: dict[str, dict[str, float | None]] = {r: {} for r in rows}
    raw = {}
    for col in COLUMNS:
        attacks: list[Any] = list(std)
        if col in ctx.scale["adaptive_columns"]:
            attacks.append({"name": "adaptive", "label": rows[-2]})
        if col != "Vanilla":
            attacks.append(bpda_spec(ctx))
        res = run_eval(ctx, task, col, attacks)
        raw[col] = res.to_dict()
        table["Clean"][col] = metric(res, "clean")
        for r in rows[1:]:
            table[r][col] = metric(res, r) if r in [x.name for x in res.rows] else None
        print(f"  {task} {col}: {res.seconds:.0f}s", flush=True)
    md = md_table(["attack"] + list(COLUMNS),
                  [[r] + [fmt(table[r].get(c)) for c in COLUMNS] for r in rows])
    sc = ctx.scale
    md += (f"\n\n{ctx.tasks[task]['metric']} (%) on {sc['n']} test images; eps = "
           f"{ctx.eps(task):.4f} (L-inf), eps_v = {ctx.eps_v(task):.4f}, defense T = "
           f"{sc['defense_steps']}; PGD/MIM/{rows[3]}: {sc['attack_steps']} steps on the bare "
           f"model, transferred; Adaptive: {sc['attack_steps']} steps, worst case over "
           f"lambda_e; BPDA+EOT: {sc['bpda_steps']} steps, EOT {sc['eot']}; '-': not run "
           "(Vanilla: the bare model has no purifier; Random: no equivariance loss; adaptive "
           f"attack only on {', '.join(sc['adaptive_columns'])}).")
    return {"table": table, "markdown": md, "eps": ctx.eps(task), "eps_v": ctx.eps_v(task),
            "metric": ctx.tasks[task]["metric"], "raw": raw}


def sweep_suffix(ctx: Ctx) -> str:
    """Output-name suffix of a sweep run on a subset of the tasks (``--tasks``), so that it
    does not overwrite a run on all of them: ``"-cls"``; ``""`` on every task."""
    return "" if set(ctx.run_tasks) == set(TASKS) else "-" + "-".join(ctx.run_tasks)


def n_sweep(ctx: Ctx) -> int:
    """Test images of the sweeps (tables 4-6, figure 3): ``--n`` or the scale's."""
    return ctx.opts.get("n") or ctx.scale["n_sweep"]


def cmd_table4(ctx: Ctx) -> dict[str, Any]:
    out, rows = {}, []
    for task in ctx.run_tasks:
        res = run_eval(ctx, task, "Equivariance",
                       [{"name": "pgd", "label": "PGD"}, bpda_spec(ctx, sweep=True)],
                       n=n_sweep(ctx), equivariance=True)
        out[task] = res.to_dict()
        for row in ("PGD", "BPDA+EOT"):
            r = res.row(row)
            rows.append([task, row, *(_eq_cell(r.equivariance[k], r.intervals["equivariance"][k])
                                      for k in TABLE4_COLUMNS)])
    md = md_table(["task", "attack", *TABLE4_COLUMNS], rows)
    note = ("\n\nMean equivariance score [95 % bootstrap interval over images]; the last two "
            "columns are the paired per-image changes.")
    return {"results": out, "markdown": md + note + sweep_note(ctx)}


#: Table 4's columns: the mean scores, then the paired per-image changes
TABLE4_COLUMNS = ("clean", "attacked", "restored", "attacked - clean", "restored - attacked")


def _eq_cell(value: float, ci: list[float]) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _transforms(task: str, idx: Sequence[int]) -> list:
    gs = default_transforms(3 if task == "seg" else 1)
    return [gs[i] for i in idx]


def sweep(ctx: Ctx, task: str, configs: dict[str, dict[str, Any]], command: str
          ) -> dict[str, Any]:
    """Equivariance defense under each config: clean, PGD (transfer) and the sweep BPDA.

    The automatic checks run at level ``--sweep-checks``: ``first`` (default) runs all of
    them on the first config and the cheap ones (randomness, gradients, results) on the
    others, whose attack curves (eps growth, doubled steps) would cost about three times
    the config itself; ``every`` runs all of them on every config. Each config keeps its
    checks in the JSON. Each finished config is written at once to
    ``<command>-<task>-partial.json`` (a long sweep stopped early keeps the configs it
    finished)."""
    out, rows = {}, []
    partial = ctx.out / f"{command}-{task}-partial.json"
    for i, (label, kw) in enumerate(configs.items()):
        level = "all" if i == 0 or ctx.opts.get("sweep_checks") == "every" else "basic"
        res = run_eval(ctx, task, "Equivariance",
                       [{"name": "pgd", "label": "PGD"}, bpda_spec(ctx, sweep=True)],
                       n=n_sweep(ctx), checks=level, **kw)
        out[label] = {k: metric(res, k) for k in ("clean", "PGD", "BPDA+EOT")}
        out[label]["intervals"] = {k: interval(res, k) for k in ("clean", "PGD", "BPDA+EOT")}
        out[label]["seconds"] = res.seconds
        out[label]["checks"] = {"level": level, "results": res.to_dict()["checks"]}
        raised = [c.name for c in res.checks if c.flagged]
        print(f"  {command} {task} {label}: {res.seconds:.0f}s, checks ({level}) "
              f"{'flagged ' + ', '.join(raised) if raised else 'none flagged'}", flush=True)
        rows.append([label] + [cell(res, k) for k in ("clean", "PGD", "BPDA+EOT")])
        ctx.out.mkdir(parents=True, exist_ok=True)
        write_atomic(partial, json.dumps({"results": out, "rows": rows}, indent=1,
                                         default=str))
    return {"results": out, "rows": rows, "note": _checks_note(out)}


def _checks_note(results: dict[str, dict[str, Any]]) -> str:
    """One line on a sweep's automatic checks: where they ran and which were flagged."""
    flagged = [f"{label}: {c['name']}" for label, r in results.items()
               for c in r["checks"]["results"] if c["flagged"]]
    levels = {label: r["checks"]["level"] for label, r in results.items()}
    where = ("all checks on every config" if set(levels.values()) == {"all"} else
             f"all checks on {next(iter(levels))}, the cheap ones on the others")
    return (f"Automatic checks ({where}): "
            + ("; ".join(flagged) + " flagged (see the JSON)" if flagged else "none flagged")
            + ".")


def cmd_table5(ctx: Ctx) -> dict[str, Any]:
    out, md = {}, []
    for task in ctx.run_tasks:
        s = sweep(ctx, task, {k: {"transforms": _transforms(task, v)}
                              for k, v in SUBSETS.items()}, "table5")
        out[task] = s["results"]
        md.append(f"**{task}** ({ctx.tasks[task]['metric']} %)\n\n"
                  + md_table(["transforms", "clean", "PGD", "BPDA+EOT"], s["rows"])
                  + "\n\n" + s["note"])
    return {"results": out, "markdown": "\n\n".join(md) + sweep_note(ctx)}


def cmd_table6(ctx: Ctx) -> dict[str, Any]:
    out, md = {}, []
    for task in ctx.run_tasks:
        base = run_eval(ctx, task, None, [{"name": "pgd", "label": "PGD"}], n=n_sweep(ctx))
        configs = {f"{r:g} eps": {"eps_v": r * ctx.eps(task)} for r in ctx.scale["eps_v_ratios"]}
        s = sweep(ctx, task, configs, "table6")
        zero = {"clean": metric(base, "clean"), "PGD": metric(base, "PGD"),
                "BPDA+EOT": metric(base, "PGD")}
        out[task] = {"0 (no defense)": zero, **s["results"]}
        rows = [["0 (no defense)"] + [cell(base, k) for k in ("clean", "PGD", "PGD")]]
        md.append(f"**{task}** ({ctx.tasks[task]['metric']} %, eps = {ctx.eps(task):.4f}; "
                  "no defense: BPDA+EOT = white-box PGD)\n\n"
                  + md_table(["eps_v", "clean", "PGD", "BPDA+EOT"], rows + s["rows"])
                  + "\n\n" + s["note"])
    return {"results": out, "markdown": "\n\n".join(md) + sweep_note(ctx)}


def cmd_fig3(ctx: Ctx) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, md = {}, []
    fig, axes = plt.subplots(1, len(ctx.run_tasks), figsize=(4 * len(ctx.run_tasks), 3.2),
                             squeeze=False)
    for ax, task in zip(axes[0], ctx.run_tasks):
        configs = {f"K={k}": {"transforms": _transforms(task, K_ORDER[:k])}
                   for k in ctx.scale["ks"]}
        s = sweep(ctx, task, configs, "fig3")
        out[task] = s["results"]
        md.append(f"**{task}** ({ctx.tasks[task]['metric']} %)\n\n"
                  + md_table(["K", "clean", "PGD", "BPDA+EOT"], s["rows"]) + "\n\n" + s["note"])
        ks = list(ctx.scale["ks"])
        for key in ("clean", "PGD", "BPDA+EOT"):
            ax.plot(ks, [s["results"][f"K={k}"][key] for k in ks], marker="o", label=key)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("number of transformations K")
        ax.set_ylabel(f"{ctx.tasks[task]['metric']} (%)")
        ax.set_title(f"{ctx.tasks[task]['dataset']} ({ctx.tasks[task]['model']})")
    axes[0][0].legend()
    fig.tight_layout()
    ctx.out.mkdir(parents=True, exist_ok=True)
    png = ctx.out / f"fig3{sweep_suffix(ctx)}.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return {"results": out, "markdown": "\n\n".join(md) + sweep_note(ctx)
            + f"\n\n![fig3]({png.name})",
            "png": str(png)}


def cmd_checks(ctx: Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {}
    md = []
    n = ctx.scale["check_n"]
    for task in ctx.scale["check_tasks"]:
        eps = ctx.eps(task)
        facs = ctx.scale["eps_factors"]
        res: dict[str, Any] = {}
        # 1. undefended: PGD at growing eps, more steps + restarts
        pgd = [{"name": "pgd", "label": f"PGD {f:g}eps", "eps": f * eps} for f in facs]
        pgd.append({"name": "pgd", "label": "PGD 2x steps, 2 restarts",
                    "steps": 2 * ctx.scale["attack_steps"], "restarts": 2})
        # (the defended counterpart is set by the scale's check_more)
        base = run_eval(ctx, task, None, pgd, n=n)
        res["undefended"] = base.to_dict()
        # 2. defended (equivariance) under BPDA+EOT: worst case over repeats, growing eps,
        #    more steps + restarts
        main = run_eval(ctx, task, "Equivariance", [bpda_spec(ctx, check=True)], n=n,
                        repeats=ctx.scale["repeats"])
        res["bpda_repeats"] = main.to_dict()
        grow = [bpda_spec(ctx, f"BPDA+EOT {f:g}eps", check=True, eps=f * eps)
                for f in ctx.scale["check_bpda_eps"]]
        more_kw = ctx.scale["check_more"]
        more_label = f"{more_kw['steps_factor']}x steps, {more_kw['restarts']} restarts"
        grow.append(bpda_spec(ctx, "BPDA+EOT " + more_label, check=True,
                              steps=more_kw["steps_factor"] * ctx.scale["bpda_steps"],
                              restarts=more_kw["restarts"]))
        more = run_eval(ctx, task, "Equivariance", grow, n=n)
        res["bpda_more"] = more.to_dict()
        # 3. transfer from an independently trained surrogate vs white-box
        test = ctx.data(task, "test")
        x = torch.stack([test[i][0] for i in range(n)])
        y = torch.as_tensor([int(test[i][1]) for i in range(n)]) if task == "cls" else \
            torch.stack([test[i][1] for i in range(n)])
        adv = PGD(ctx.model(task, seed=1), eps, steps=ctx.scale["attack_steps"], seed=0)(x, y)
        advset = ImageDataset(adv, y, [str(i) for i in range(10)], "transfer") \
            if task == "cls" else type(test)(adv, y, test.classes, "transfer")
        tr_none = run_eval(ctx, task, None, [], n=n, dataset=advset)
        tr_eq = run_eval(ctx, task, "Equivariance", [], n=n, dataset=advset)
        # 4. the released code's preset
        ref = run_eval(ctx, task, "equivariance-reference", [{"name": "pgd", "label": "PGD"}],
                       n=n)
        ours = run_eval(ctx, task, "Equivariance", [{"name": "pgd", "label": "PGD"}], n=n)
        res.update(transfer_undefended=tr_none.to_dict(), transfer_equivariance=tr_eq.to_dict(),
                   reference=ref.to_dict(), ours_pgd=ours.to_dict())
        out[task] = res
        single = main.row("BPDA+EOT").defended_single[main.metric] * 100
        rows = [
            ["clean (undefended / equivariance)", fmt(metric(base, "clean")),
             fmt(metric(main, "clean"))],
            *[[f"eps x{f:g} (PGD / BPDA+EOT)", fmt(metric(base, f"PGD {f:g}eps")),
               fmt(metric(main, "BPDA+EOT")) if f == 1 else
               fmt(metric(more, f"BPDA+EOT {f:g}eps")) if f in ctx.scale["check_bpda_eps"]
               else "-"]
              for f in facs],
            [f"PGD 2x steps, 2 restarts / BPDA+EOT {more_label}",
             fmt(metric(base, "PGD 2x steps, 2 restarts")),
             fmt(metric(more, "BPDA+EOT " + more_label))],
            [f"BPDA+EOT: single prediction / worst of {ctx.scale['repeats']}", "-",
             f"{fmt(single)} / {fmt(metric(main, 'BPDA+EOT'))}"],
            ["transfer PGD from surrogate (seed 1)", fmt(metric(tr_none, "clean")),
             fmt(metric(tr_eq, "clean"))],
            ["white-box PGD / BPDA+EOT", fmt(metric(base, "PGD 1eps")),
             fmt(metric(main, "BPDA+EOT"))],
            ["reference-code preset: clean / PGD", "-",
             " / ".join(fmt(metric(ref, r)) for r in ("clean", "PGD"))],
            ["ours: clean / PGD", "-",
             " / ".join(fmt(metric(ours, r)) for r in ("clean", "PGD"))],
        ]
        md.append(f"**{task}** ({ctx.tasks[task]['metric']} %, {n} images, eps = {eps:.4f}, "
                  f"BPDA+EOT: {ctx.scale['bpda_steps']} steps, EOT {ctx.scale['check_eot']})\n\n"
                  + md_table(["check", "undefended", "equivariance defense"], rows))
    return {"results": out, "markdown": "\n\n".join(md)}


def cmd_worstcase(ctx: Ctx) -> dict[str, Any]:
    """Per-image worst case over an attack cascade and repeated defended predictions
    (:mod:`support.worstcase`), per task in ``ctx.run_tasks`` and model seed."""
    st = {**(WORST_QUICK if ctx.opts.get("attack_size", ctx.scale_name) == "quick"
             else WORST_FULL),
          "defense_steps": ctx.opts.get("defense_steps") or ctx.scale["defense_steps"]}
    st.update({k: ctx.opts[k] for k in ("n", "clean_n", "undefended_n", "offset",
                                        "report_only") if ctx.opts.get(k)})
    columns = ctx.opts.get("columns") or DEFAULT_COLUMNS
    out: dict[str, Any] = {}
    for task in ctx.run_tasks:
        cols = [c for c in columns if task == "cls" or c in ("Vanilla", "Equivariance",
                                                             "Invariance")]
        out.update(worstcase(ctx, st, model_seeds(ctx, task), cols, (task,)))
    md = worstcase_markdown(out)
    saved = [c["settings"] for cols in out.values() for c in cols.values() if "settings" in c]
    steps = sorted({c.get("defense_steps", st["defense_steps"]) for c in saved})
    if st.get("report_only") and saved:  # describe the runs that were made
        st = {**st, **{k: v for k, v in saved[0].items() if k in st}}
    md += (f"\n\neps = {', '.join(f'{t} {ctx.eps(t):.4f}' for t in ctx.run_tasks)}, eps_v = "
           f"1.5 eps, defense T = {'/'.join(map(str, steps))}; stages: {st['steps']}-step "
           f"PGD/MIM/CW (Houdini) on the bare model; Vanilla: APGD-CE {st['apgd_steps']}, "
           f"APGD-T ({st['n_targets']} targets) / APGD-SegPGD, Square {st['queries']} "
           f"queries; defenses: adaptive sweep over lambda_e {list(st['lambdas'])} "
           f"({st['steps']} steps), BPDA+EOT {st['bpda_steps']} steps x {st['eot']} draws, "
           f"APGD-CE through BPDA with the same budget; worst of {st['repeats']} defended "
           "predictions per stage.")
    return {"results": out, "markdown": md, "worst_settings": st}


def cmd_throughput(ctx: Ctx) -> dict[str, Any]:
    """Images per core-second of the equivariance defense's prediction and of one BPDA+EOT
    draw-step on the classifier (an untrained model of the task's architecture: the cost
    does not depend on the weights), batch 1 / 16 / 64, T = 5 / 20 (quick: batch 1 / 4,
    T = 2)."""
    t = ctx.tasks["cls"]
    torch.manual_seed(0)
    model = create_model(t["model"], in_channels=1, **t["model_kwargs"]).eval()
    if t.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    rows = throughput(model, t["feature_layer"], ctx.eps("cls"), ctx.eps_v("cls"),
                      (1, t["size"], t["size"]), batches=(1, 4) if ctx.quick else (1, 16, 64),
                      steps=(2,) if ctx.quick else (5, 20), budget=0.1 if ctx.quick else 2.0)
    lines = ["| T | batch | defended predictions / core-s | BPDA draw-steps / core-s |",
             "|---|---|---|---|"]
    lines += [f"| {r['T']} | {r['batch']} | {r['predict']:.1f} | {r['bpda_step']:.1f} |"
              for r in rows]
    return {"results": rows, "markdown": f"{t['model']} at {t['size']} px, "
            f"{torch.get_num_threads()} thread(s)\n\n" + "\n".join(lines)}


COMMANDS: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "models": cmd_models,
    "table1": lambda ctx: paper_table(ctx, "cls"),
    "table2": lambda ctx: paper_table(ctx, "seg"),
    "table4": cmd_table4,
    "table5": cmd_table5,
    "table6": cmd_table6,
    "fig3": cmd_fig3,
    "checks": cmd_checks,
    "throughput": cmd_throughput,
    "worstcase": cmd_worstcase,
}


#: the sweeps over defense settings; ``--tasks`` and ``--n`` apply to them
SWEEPS = ("table4", "table5", "table6", "fig3")


def run_command(ctx: Ctx, name: str) -> float:
    """Run one sub-command, write its JSON and Markdown; returns its wall time (s)."""
    t0 = time.perf_counter()
    result = COMMANDS[name](ctx)
    seconds = time.perf_counter() - t0
    result.update(command=name, scale=ctx.scale_name, seconds=seconds,
                  settings={"scale": {k: v for k, v in ctx.scale.items()}, "tasks": ctx.tasks,
                            "data": ctx.data_name})
    ctx.out.mkdir(parents=True, exist_ok=True)
    stem = name + (ctx.suffix if name == "checks" else
                   sweep_suffix(ctx) if name in SWEEPS else "")
    write_atomic(ctx.out / f"{stem}.json", json.dumps(result, indent=1, default=str))
    md = f"## {stem} ({ctx.scale_name}, {seconds:.0f} s)\n\n{result['markdown']}\n"
    write_atomic(ctx.out / f"{stem}.md", md)
    print(md, flush=True)
    print(f"[{name}] wall time {seconds:.1f} s", flush=True)
    return seconds


def _task_list(parser: argparse.ArgumentParser, text: str, flag: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    if not tasks or any(t not in TASKS for t in tasks):
        parser.error(f"{flag} must list tasks of {sorted(TASKS)}, got {text!r}")
    return tasks


def _worst_options(parser: argparse.ArgumentParser, args: argparse.Namespace, ctx: Ctx
                   ) -> None:
    """Check and store the options of ``worstcase`` in ``ctx.opts``."""
    if args.columns:
        cols = tuple(c.strip() for c in args.columns.split(",") if c.strip())
        bad = [c for c in cols if c not in WORST_COLUMNS]
        if not cols or bad:
            parser.error(f"--columns must list columns of {list(WORST_COLUMNS)}, got "
                         f"{args.columns!r}")
        ctx.opts["columns"] = cols
    for key in ("n", "clean_n", "undefended_n", "defense_steps"):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {value}")
        ctx.opts[key] = value
    if args.attack_size:
        ctx.opts["attack_size"] = args.attack_size
    if args.offset < 0:
        parser.error(f"--offset must be >= 0, got {args.offset}")
    ctx.opts.update(offset=args.offset, report_only=args.report_only,
                    sweep_checks=args.sweep_checks)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=[*COMMANDS, "all"])
    parser.add_argument("--quick", action="store_true",
                        help="the quick scale (64 test images, few steps; see QUICK)")
    parser.add_argument("--runs", default="runs", help="output root (default runs/)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--data", default="digits", choices=DATA_CHOICES,
                        help="dataset of the classification task (fashion-mnist: cnn7 "
                        "trained with the defense's views; outputs in runs/defense-fashion)")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated model seeds of 'models' and 'worstcase' "
                        "(default: the task's; fashion-mnist 0,1,2)")
    parser.add_argument("--columns", default=None,
                        help=f"comma-separated columns of 'worstcase' ({', '.join(WORST_COLUMNS)}; "
                        f"default {','.join(DEFAULT_COLUMNS)}; Rotation and Contrastive "
                        "train their heads on first use)")
    parser.add_argument("--attack-size", choices=("full", "quick"), default=None,
                        help="attack budget of 'worstcase' (default: the scale's)")
    parser.add_argument("--defense-steps", type=int, default=None,
                        help="purifier steps T of 'worstcase' (default: the scale's)")
    for flag in ("n", "clean-n", "undefended-n"):
        parser.add_argument(f"--{flag}", type=int, default=None,
                            help=f"'worstcase': images of the {flag.replace('-n', '')} "
                            "evaluation" if flag != "n" else "'worstcase': cascade images "
                            "of the defenses; table4-6 / fig3: test images (default: the "
                            "scale's n_sweep)")
    parser.add_argument("--offset", type=int, default=0,
                        help="'worstcase': first cascade image (run slices of the images in "
                        "parallel processes; their parts are joined in the report)")
    parser.add_argument("--report-only", action="store_true",
                        help="'worstcase': rebuild the report from the saved JSON, run "
                        "nothing")
    parser.add_argument("--no-heads", action="store_true",
                        help="'models': skip the rotation / contrastive heads")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated tasks of 'models', 'worstcase' and the sweeps "
                        "table4-6 / fig3 (cls, seg); a sweep's results then go to "
                        "<command>-<tasks>.json/.md")
    parser.add_argument("--sweep-checks", choices=("first", "every"), default="first",
                        help="table5/6 / fig3: run the automatic checks' attack curves on "
                        "the first config only (default; the others get the cheap checks) "
                        "or on every config (about 4x the time)")
    parser.add_argument("--check-tasks", default=None,
                        help="comma-separated tasks of 'checks' (cls, seg; default: the "
                        "scale's); results then go to checks-<tasks>.json/.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = Ctx(args.quick, Path(args.runs), args.data)
    if args.tasks:
        ctx.run_tasks = _task_list(parser, args.tasks, "--tasks")
    _worst_options(parser, args, ctx)
    ctx.heads = ctx.heads and not args.no_heads
    if args.seeds:
        try:
            ctx.seeds = tuple(int(v) for v in args.seeds.split(","))
        except ValueError:
            parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if args.check_tasks:
        tasks = _task_list(parser, args.check_tasks, "--check-tasks")
        ctx.scale = {**ctx.scale, "check_tasks": tasks}
        ctx.suffix = "-" + "-".join(tasks)
    names = [c for c in COMMANDS if c != "throughput"] if args.command == "all" else \
        [args.command]
    times = {name: run_command(ctx, name) for name in names}
    if len(names) > 1:
        print("wall times: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
              + f"; total {sum(times.values()):.0f}s")


if __name__ == "__main__":
    main()
