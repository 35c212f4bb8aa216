"""Robustness evaluation of a model, with or without an inference-time defense.

API
---
``evaluate_robustness(model, dataset, attacks=("pgd",), defense=None, config=None,
**overrides) -> RobustnessResult``, with the settings in a :class:`RobustnessConfig`
(``eps``, ``steps``, ``alpha``, ``norm``, ``restarts``, ``targeted``, ``eot_samples``,
``lambdas``, ``repeats``, ``max_images``, ``batch_size``, ``seed``, ``device``,
``progress``, ``ignore_index``, ``equivariance``, ``feature_layer``,
``score_transforms``, ``defense_kwargs``, ``ensemble``, ``ensemble_queries``, ``checks``,
``check_images``); keyword ``overrides`` replace its fields.

* ``model``: the undefended classifier ``(B, C, H, W) -> (B, K)`` or segmenter
  ``-> (B, K, H, W)``, images in [0, 1] (normalize inside the model).
* ``dataset``: items ``(image (C, H, W), label)`` (int, or a mask ``(H, W)`` int64 for
  segmentation); the first ``max_images`` are used.
* ``attacks``: names or specs of :mod:`equivision.robust.registry` (``"pgd"``,
  ``"bpda-eot"``, ``"adaptive:0/1/10"``, ``{"name": "pgd", "steps": 50, "label": ...}``).
* ``defense``: None, a registry name (built with ``defense_kwargs``, see
  :func:`~equivision.robust.registry.build_defense`) or a
  :class:`~equivision.robust.defenses.Defense` wrapping ``model``.

The result (:class:`~equivision.robust.results.RobustnessResult`) has one row for the
clean images and one per attack; :mod:`equivision.robust.results` says what each row
holds (undefended and defended metrics, the attack target, equivariance scores, time and
95% intervals) and what the result holds beyond the rows (the per-image worst case, the
per-image scores, the automatic checks).

``config.ensemble`` (``"standard"``, ``"rand"``, ``"seg"`` or ``"auto"``: ``seg`` for a
segmenter, ``rand`` for a randomized defense, else ``standard``) adds the row
``autoattack-<version>``: the AutoAttack-style ensemble
(:class:`~equivision.robust.ensemble.AutoAttackEnsemble`; through a defense with BPDA and
EOT) with ``steps`` APGD iterations and ``ensemble_queries`` Square queries. The spec
``"autoattack"`` adds it as any other attack.

Sharding and seeding
--------------------
The images are cut into consecutive *blocks* of ``batch_size`` (block ``b`` holds global
images ``b * batch_size ...``). Under an initialised ``torch.distributed`` process group,
process ``rank`` evaluates the blocks ``rank, rank + world, ...``; every accumulator is a
tensor (confusion matrices, score sums) summed with ``all_reduce``, so every process
returns the numbers of one process on all images. All random draws (attack starts, EOT
draws, the defense's noise per repeat) come from generators seeded with
``(seed, row, first global image index of the block, repeat)``: they depend on which
images are in a block, never on the process or the batch's local position. (The attacks
and purifiers draw noise for a whole batch from one generator, so the draws are per block,
not per image: results depend on ``batch_size``; ``batch_size=1`` gives per-image draws.)

Example::

    config = RobustnessConfig(eps=4 / 255, steps=20,
                              defense_kwargs={"eps_v": 8 / 255, "steps": 20})
    result = evaluate_robustness(model, test_set, ["pgd", "bpda-eot", "adaptive"],
                                 "equivariance", config)
    print(result.table()); json.dump(result.to_dict(), fh)
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate
from tqdm.auto import tqdm

from ..metrics import IGNORE_INDEX, check_output_labels, per_image_score
from ..training.distributed import gather_objects
from ..transforms import Transform
from ..utils import model_device, model_dtype, resolve_device
from .attacks import _derived_seed, sweep_lambda
from .checks import CheckResult
from .defenses import Defense, EquivarianceDefense, default_transforms, equivariance_score
from .ensemble import VERSIONS, EnsembleAttack
from .evaluation_checks import LEVELS, basic_checks, curve_checks, result_checks
from .per_image import EQ_DIFFS, EQ_KINDS, KEYS, WORST_CASE, PerImageResults
from .registry import AttackSpec, build_attack, build_defense, parse_attack
from .results import RobustnessResult, RowResult
from .view_fit import check_views, fitting_views, parse_views
from .views import AUTO_LAYER, FeatureExtractor

__all__ = ["RobustnessConfig", "RobustnessResult", "RowResult", "evaluate_robustness"]


# ----------------------------------------------------------------------------- helpers


def _check_number(name: str, value: Any, positive: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, "
                         f"got {value!r}")
    return float(value)


def _check_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _batch(dataset: Dataset, start: int, stop: int) -> tuple[Tensor, Tensor]:
    items = [dataset[i] for i in range(start, stop)]
    if not isinstance(items[0], (tuple, list)) or len(items[0]) < 2:
        raise TypeError("the dataset must yield (image, label) pairs")
    x, y = default_collate([(it[0], it[1]) for it in items])
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"images must be float tensors (C, H, W), got a batch of "
                         f"{tuple(getattr(x, 'shape', ()))}")
    lo, hi = float(x.min()), float(x.max())
    if not (0.0 <= lo and hi <= 1.0) or not bool(torch.isfinite(x).all()):
        raise ValueError(f"images must lie in [0, 1], got values in [{lo:g}, {hi:g}] (images "
                         f"{start}..{stop - 1}); evaluate unnormalized images and put the "
                         "normalization inside the model (equivision.robust.Normalize)")
    return x, y


def _check_output(out: Any, labels: Tensor, ignore_index: int, what: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise ValueError(f"the model must return a tensor of logits, got "
                         f"{type(out).__name__}; pick them with --output-key KEY (Python: "
                         "equivision.robust.select_output(model, KEY))")
    check_output_labels(out, labels, ignore_index)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"the model returned NaN or infinite logits on {what}; check the "
                         "model and its input range (images in [0, 1])")
    return out


def _generator(device: torch.device, *parts: Any) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_derived_seed(*parts))


# ----------------------------------------------------------------------------- config


@dataclass
class RobustnessConfig:
    """Settings of :func:`evaluate_robustness`.

    Attributes:
        eps, steps, alpha, norm, restarts, targeted: attack settings
            (:class:`~equivision.robust.attacks.IterativeAttack`). ``targeted`` aims at
            ``(label + 1) mod K`` (ignored pixels stay ignored); metrics stay those of the
            true labels.
        eot_samples: EOT draws of ``bpda-eot`` and ``full`` (1 for a deterministic defense).
        lambdas: the ``lambda_e`` sweep of ``adaptive`` (worst case per image).
        repeats: defended predictions per image for a randomized defense (worst case
            reported; a deterministic defense is run once).
        max_images: evaluate the first ``max_images`` images (None: all).
        batch_size: images per block (see "Sharding and seeding").
        seed: base seed of every random draw.
        device: None (where the model is), ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        progress: tqdm bar over this process's blocks (rank 0 only).
        ignore_index: ignored label of segmentation masks.
        equivariance: compute the equivariance scores.
        feature_layer: feature layer of the scores when the defense has none (default
            ``"auto"``: the model's last spatial map).
        score_transforms: views of the scores when the defense has none (default: the
            :func:`default_transforms` the model can take; given views are checked).
        defense_kwargs: keyword arguments of :func:`build_defense` for a named defense.
        ensemble: None, or the version of the AutoAttack-style ensemble row
            (``"standard"``, ``"rand"``, ``"seg"``, ``"auto"``).
        ensemble_queries: Square's query budget in the ensemble.
        checks: ``"all"``, ``"basic"`` or ``"none"``
            (:mod:`~equivision.robust.evaluation_checks`).
        check_images: images (the first ones) the checks run on.
    """

    eps: float = 8 / 255
    steps: int = 10
    alpha: float | None = None
    norm: str = "linf"
    restarts: int = 1
    targeted: bool = False
    eot_samples: int = 4
    lambdas: Sequence[float] = (0.0, 1.0, 10.0)
    repeats: int = 1
    max_images: int | None = None
    batch_size: int = 32
    seed: int = 0
    device: str | torch.device | None = None
    progress: bool = False
    ignore_index: int = IGNORE_INDEX
    equivariance: bool = True
    feature_layer: str = AUTO_LAYER
    score_transforms: Sequence[Transform] | str | None = None
    defense_kwargs: Mapping[str, Any] | None = None
    ensemble: str | None = None
    ensemble_queries: int = 1000
    checks: str = "all"
    check_images: int = 8

    def checked(self) -> RobustnessConfig:
        """A copy with validated numbers (``lambdas`` as a list of floats).

        Raises:
            ValueError: a non-positive or non-finite ``eps``, counts below 1, negative or
                no ``lambdas``.
        """
        lambdas = [_check_number("lambda_e", lam, positive=False) for lam in self.lambdas]
        if not lambdas:
            raise ValueError("lambdas must hold at least one value")
        if self.ensemble is not None and self.ensemble not in VERSIONS + ("auto",):
            raise ValueError(f"ensemble must be None or one of {VERSIONS + ('auto',)}, got "
                             f"{self.ensemble!r}")
        if self.checks not in LEVELS:
            raise ValueError(f"checks must be one of {LEVELS}, got {self.checks!r}")
        _check_int("ensemble_queries", self.ensemble_queries)
        _check_int("check_images", self.check_images)
        return replace(
            self, eps=_check_number("eps", self.eps), steps=_check_int("steps", self.steps),
            repeats=_check_int("repeats", self.repeats),
            batch_size=_check_int("batch_size", self.batch_size),
            eot_samples=_check_int("eot_samples", self.eot_samples),
            max_images=None if self.max_images is None
            else _check_int("max_images", self.max_images),
            lambdas=lambdas)


@dataclass
class _Setup:
    """What one evaluation needs besides the config: checked inputs and the probe of the
    model's output."""

    model: nn.Module
    dataset: Dataset
    specs: list[AttackSpec]
    defense: Defense | None
    device: torch.device
    n: int
    seg: bool
    k: int
    feature_layer: str
    pairing: str
    views: list[Transform]
    draws: int
    rank: int
    world: int
    per_image: PerImageResults
    # robust images (N,) before / after the ensemble's Square stage, and whether it ran
    square: Tensor

    @property
    def names(self) -> list[str]:
        """Row names: ``clean`` then the attack labels."""
        return ["clean"] + [s.label for s in self.specs]


# ----------------------------------------------------------------------------- main


def evaluate_robustness(
    model: nn.Module,
    dataset: Dataset,
    attacks: Sequence[str | Mapping[str, Any] | AttackSpec] = ("pgd",),
    defense: str | Defense | None = None,
    config: RobustnessConfig | None = None,
    **overrides: Any,
) -> RobustnessResult:
    """Clean and adversarial task metrics of ``model``, undefended and defended; see the
    module docstring.

    Args:
        model: classifier or segmenter, images in [0, 1]; put in eval mode (and moved to
            ``config.device``).
        dataset: ``(image (C, H, W), label)`` items, images in [0, 1].
        attacks: attack specs (registry names); an empty list gives the clean row only.
        defense: None, a registry name or a :class:`Defense` around ``model``.
        config: the settings (default :class:`RobustnessConfig()`).
        **overrides: fields of :class:`RobustnessConfig` that replace ``config``'s
            (``evaluate_robustness(model, data, ["pgd"], eps=0.1, steps=3)``).

    Returns:
        :class:`RobustnessResult`, identical on every process.

    Raises:
        ValueError: bad settings, unknown attack/defense/layer names (listed), images
            outside [0, 1], labels that do not fit the output, non-finite model output.
        TypeError: an override that is no field of :class:`RobustnessConfig`.
    """
    t_start = time.perf_counter()
    cfg = _config(config, overrides).checked()
    setup = _setup(model, dataset, attacks, defense, cfg)
    seconds = dict.fromkeys(setup.names, 0.0)
    attack_repr = _run_blocks(setup, cfg, seconds)
    if setup.world > 1:  # a process without blocks built no attack: take the others'
        attack_repr = {k: v for part in gather_objects(attack_repr) for k, v in part.items()}
    _all_reduce(setup, seconds)
    results = _row_results(setup, seconds, attack_repr, cfg.seed)
    worst = _worst_case(setup, cfg.seed) if len(setup.names) > 1 else None
    checks = _checks(setup, cfg, {r.name: r.attack_target for r in results})
    return RobustnessResult("segmentation" if setup.seg else "classification", setup.n,
                            results, _meta(setup, cfg), time.perf_counter() - t_start,
                            worst_case=worst, checks=checks, per_image=setup.per_image)


def _config(config: RobustnessConfig | None, overrides: dict[str, Any]) -> RobustnessConfig:
    """``config`` (or the defaults) with ``overrides`` applied."""
    config = config if config is not None else RobustnessConfig()
    known = {f.name for f in fields(RobustnessConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise TypeError(f"evaluate_robustness got unknown setting(s) {bad}; the settings are "
                        f"the fields of RobustnessConfig: {', '.join(sorted(known))}")
    return replace(config, **overrides)


def _setup(model: nn.Module, dataset: Dataset,
           attacks: Sequence[str | Mapping[str, Any] | AttackSpec],
           defense: str | Defense | None, cfg: RobustnessConfig) -> _Setup:
    """Check the inputs, build the defense and probe the model on image 0 (on every
    process, so that the accumulators match)."""
    specs = [parse_attack(a) for a in attacks]
    if cfg.ensemble is not None:
        specs.append(AttackSpec("autoattack", f"autoattack-{cfg.ensemble}",
                                {"version": cfg.ensemble}))
    labels_seen = [s.label for s in specs]
    if "clean" in labels_seen or len(set(labels_seen)) != len(labels_seen):
        raise ValueError(f"attack labels must be unique and not 'clean', got {labels_seen}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if model_dtype(model) != torch.float32:  # steps of 1/255 vanish in bfloat16 pixels
        raise ValueError(f"the model's parameters are {model_dtype(model)}; attacks and "
                         "defenses work on float32 images in [0, 1]: evaluate a float32 copy "
                         "(model.float())")
    dev = model_device(model) if cfg.device is None else resolve_device(cfg.device)
    model.to(dev).eval()
    defense_obj = build_defense(defense, model, **dict(cfg.defense_kwargs or {}))
    if defense_obj is not None:
        if defense_obj.model is not model:
            raise ValueError("the defense must wrap the evaluated model (defense.model is "
                             "model)")
        defense_obj.to(dev).eval()
    n_total = len(dataset)  # type: ignore[arg-type]
    if n_total == 0:
        raise ValueError("the dataset is empty")
    x0, y0 = _batch(dataset, 0, 1)
    with torch.no_grad():
        out0 = _check_output(model(x0.to(dev)), y0.to(dev), cfg.ignore_index, "image 0")
    layer, views = _layer_and_views(model, defense_obj, cfg, x0.to(dev))
    randomized = bool(getattr(defense_obj, "randomized", False))
    use_dist = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if use_dist else (0, 1)
    seg, n = out0.dim() == 4, n_total if cfg.max_images is None else min(cfg.max_images,
                                                                          n_total)
    specs = [_resolve_ensemble(s, seg, randomized, cfg.ensemble_queries) for s in specs]
    names = ["clean"] + [s.label for s in specs]
    return _Setup(
        model=model, dataset=dataset, specs=specs, defense=defense_obj, device=dev,
        n=n, seg=seg, k=int(out0.shape[1]), feature_layer=layer,
        pairing=str(getattr(defense_obj, "pairing", "identity")),
        views=views,
        draws=cfg.repeats if randomized else 1, rank=rank, world=world,
        per_image=PerImageResults(names, n, int(out0.shape[1]), seg, dev, cfg.ignore_index),
        square=torch.zeros(3, n, dtype=torch.float64, device=dev))


def _layer_and_views(model: nn.Module, defense: Defense | None, cfg: RobustnessConfig,
                     x0: Tensor) -> tuple[str, list[Transform]]:
    """The feature layer (``"auto"`` resolved) and the views of the equivariance scores,
    checked on image ``x0 (1, C, H, W)``: the defense's when it has them (a defense
    without views gets the defaults that fit the model), else the config's."""
    # the defense's layer when its loss is the equivariance score; a head-based defense
    # reads its head's layer, which the scores do not use
    if isinstance(defense, EquivarianceDefense):
        layer = defense.extractor.resolve(x0)
    else:  # unknown layer names fail here, with the list
        layer = FeatureExtractor(model, cfg.feature_layer).resolve(x0)
    if isinstance(defense, EquivarianceDefense):
        return layer, defense.views(x0)
    views = getattr(defense, "transforms", None) or cfg.score_transforms
    if views is None:
        return layer, fitting_views(model, default_transforms(x0.shape[1]), x0)
    views = parse_views(views)
    check_views(model, views, x0)
    return layer, views


def _resolve_ensemble(spec: AttackSpec, seg: bool, randomized: bool,
                      queries: int) -> AttackSpec:
    """An ``autoattack`` spec made concrete: ``version="auto"`` (or none) becomes ``seg``
    for a segmenter, ``rand`` for a randomized defense, else ``standard``; Square's budget
    is ``queries`` unless the spec gives one."""
    if spec.name != "autoattack":
        return spec
    version = spec.options.get("version", "auto")
    label = spec.label
    if version == "auto":
        version = "seg" if seg else "rand" if randomized else "standard"
        if label in ("autoattack", "autoattack-auto"):
            label = f"autoattack-{version}"
    return AttackSpec(spec.name, label, {"queries": queries, **spec.options,
                                         "version": version})


def _run_blocks(setup: _Setup, cfg: RobustnessConfig, seconds: dict[str, float]
                ) -> dict[str, str]:
    """Evaluate this process's blocks into ``setup.per_image`` (each row's time into
    ``seconds``); returns each attack's repr."""
    blocks = list(range(setup.rank, math.ceil(setup.n / cfg.batch_size), setup.world))
    bar = None
    if cfg.progress and setup.rank == 0:
        bar = tqdm(total=len(blocks), desc="robustness", unit="batch")
    attack_repr: dict[str, str] = {}
    model = setup.model
    was_training = model.training
    try:
        for b in blocks:
            start, stop = b * cfg.batch_size, min(setup.n, (b + 1) * cfg.batch_size)
            attack_repr.update(_run_block(setup, cfg, seconds, start, stop))
            if bar is not None:
                bar.update(1)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return attack_repr


def _run_block(setup: _Setup, cfg: RobustnessConfig, seconds: dict[str, float],
               start: int, stop: int) -> dict[str, str]:
    """Every row of the images ``start..stop-1``: attack, undefended and defended
    predictions, equivariance scores. Returns each attack's repr."""
    model, dev, ignore = setup.model, setup.device, cfg.ignore_index
    x, y = _batch(setup.dataset, start, stop)
    x, y = x.to(dev), y.to(dev)
    settings = dict(alpha=cfg.alpha, steps=cfg.steps, norm=cfg.norm, restarts=cfg.restarts,
                    targeted=cfg.targeted, ignore_index=ignore, eot_samples=cfg.eot_samples)
    attack_repr: dict[str, str] = {}
    clean_score = None
    for row_i, name in enumerate(setup.names):
        t0 = time.perf_counter()
        adv = x
        if name != "clean":
            adv, _, attack_repr[name], atk = _attack(
                setup.specs[row_i - 1], model, setup.defense, x, y, setup.k, setup.seg,
                cfg.eps, settings, list(cfg.lambdas), cfg.seed, start, ignore)
            _record_square(setup, atk, start)
        with torch.no_grad():
            out = _check_output(model(adv), y, ignore, f"images {start}..{stop - 1} ({name})")
        setup.per_image.record(name, "undefended", start, per_image_score(out, y, ignore),
                               out.argmax(1), y)
        restored = None
        if setup.defense is not None:
            restored = _defended(setup, adv, y, cfg.seed, name, start, ignore)
        if cfg.equivariance:
            if clean_score is None:
                clean_score = _score(setup, x)
            eq = setup.per_image.record_equivariance
            eq(name, "clean", start, clean_score)
            eq(name, "attacked", start, clean_score if adv is x else _score(setup, adv))
            if restored is not None:
                eq(name, "restored", start, _score(setup, restored))
        seconds[name] += time.perf_counter() - t0
    return attack_repr


def _record_square(setup: _Setup, attack: Any, start: int) -> None:
    """Keep the robust images before and after the ensemble's Square stage (the first
    ensemble row with one) for the black-box check."""
    last = getattr(attack, "last", None)
    if not isinstance(attack, EnsembleAttack) or last is None:
        return
    names = [st.name for st in last.stages]
    if "square" not in names or bool(setup.square[2, start] == 1):
        return  # no Square stage, or an earlier ensemble row recorded these images
    i = names.index("square")
    stop = start + last.score.shape[0]
    setup.square[0, start:stop] = last.stages[i - 1].score.double()
    setup.square[1, start:stop] = last.stages[i].score.double()
    setup.square[2, start:stop] = 1.0


def _checks(setup: _Setup, cfg: RobustnessConfig, targets: dict[str, str | None]
            ) -> list[CheckResult]:
    """The automatic checks of level ``cfg.checks`` (the same on every process)."""
    if cfg.checks == "none":
        return []
    m = max(1, min(setup.n, cfg.check_images))
    x, y = _batch(setup.dataset, 0, m)
    x, y = x.to(setup.device), y.to(setup.device)
    model, defense, ignore = setup.model, setup.defense, cfg.ignore_index
    out = basic_checks(model, defense, x, y, ignore)
    ran = bool(setup.square[2].all())
    out += result_checks(setup.per_image, targets,
                         (setup.square[0], setup.square[1]) if ran else None)
    if cfg.checks == "all" and setup.specs:
        spec = next((s for s in setup.specs if s.in_loop and defense is not None),
                    setup.specs[0])
        settings = dict(alpha=None, norm=cfg.norm, restarts=cfg.restarts,
                        targeted=cfg.targeted, ignore_index=ignore,
                        eot_samples=cfg.eot_samples)

        def run(eps: float, steps: int) -> Tensor:
            return _attack(spec, model, defense, x, y, setup.k, setup.seg, eps,
                           {**settings, "steps": steps}, list(cfg.lambdas), cfg.seed,
                           -1, ignore)[0]

        system = defense if defense is not None and spec.in_loop else model
        out += curve_checks(system, run, x, y, cfg.eps, cfg.steps, cfg.norm, ignore)
    return out


def _score(setup: _Setup, images: Tensor) -> Tensor:
    """Per-image equivariance scores ``(B,)`` of ``images`` ``(B, C, H, W)``."""
    return equivariance_score(setup.model, images, setup.views, setup.feature_layer,
                              setup.pairing)


def _all_reduce(setup: _Setup, seconds: dict[str, float]) -> None:
    """Sum the per-image states over processes; each row's time becomes the slowest
    process's."""
    if setup.world <= 1:
        return
    for t in [setup.square, *setup.per_image.tensors()]:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    names = setup.names
    secs = torch.tensor([seconds[nm] for nm in names], dtype=torch.float64,
                        device=setup.device)
    dist.all_reduce(secs, op=dist.ReduceOp.MAX)
    seconds.update(zip(names, secs.tolist()))


def _metrics(setup: _Setup, name: str, seed: int
             ) -> tuple[dict[str, dict[str, float] | None], dict[str, dict[str, list[float]]]]:
    """Metrics and 95% intervals of the row ``name`` per prediction kind (None for the
    defended kinds without a defense)."""
    pi = setup.per_image
    metrics: dict[str, dict[str, float] | None] = {}
    intervals = {}
    for key in KEYS:
        if key != "undefended" and setup.defense is None:
            metrics[key] = None
            continue
        metrics[key] = pi.metrics(name, key)
        intervals[key] = pi.intervals(name, key, seed)
    return metrics, intervals


def _worst_case(setup: _Setup, seed: int) -> RowResult:
    """The per-image worst case over the attack rows."""
    metrics, intervals = _metrics(setup, WORST_CASE, seed)
    return RowResult(name=WORST_CASE, attack_target=None, undefended=metrics["undefended"]
                     or {}, defended=metrics["defended"],
                     defended_single=metrics["defended_single"],
                     equivariance=dict.fromkeys(
                         list(EQ_KINDS) + [d[0] for d in EQ_DIFFS]),
                     seconds=0.0, attack="per-image worst case over the attack rows",
                     intervals=intervals)


def _row_results(setup: _Setup, seconds: dict[str, float], attack_repr: dict[str, str],
                 seed: int = 0) -> list[RowResult]:
    """The rows of the result, from the (reduced) per-image states."""
    defended = setup.defense is not None
    results = []
    for name in setup.names:
        eq, eq_intervals = setup.per_image.equivariance(name, seed)
        target = None
        if name != "clean":  # the same whichever process ran the attack
            spec = setup.specs[setup.names.index(name) - 1]
            target = "defense" if spec.in_loop and defended else "model"
        metrics, intervals = _metrics(setup, name, seed)
        if eq_intervals:
            intervals["equivariance"] = eq_intervals
        results.append(RowResult(
            name=name, attack_target=target, undefended=metrics["undefended"] or {},
            defended=metrics["defended"], defended_single=metrics["defended_single"],
            equivariance=eq, seconds=seconds[name], attack=attack_repr.get(name),
            intervals=intervals))
    return results


def _meta(setup: _Setup, cfg: RobustnessConfig) -> dict[str, Any]:
    """The settings recorded with the result."""
    defense = setup.defense
    return {
        "eps": cfg.eps, "steps": cfg.steps, "alpha": cfg.alpha, "norm": cfg.norm,
        "restarts": cfg.restarts, "targeted": cfg.targeted,
        "target_rule": "(label + 1) mod K" if cfg.targeted else None,
        "eot_samples": cfg.eot_samples, "lambdas": list(cfg.lambdas), "repeats": cfg.repeats,
        "repeats_used": setup.draws, "batch_size": cfg.batch_size, "seed": cfg.seed,
        "defense": None if defense is None else type(defense).__name__,
        "defense_settings": _defense_settings(defense),
        "defense_randomized": bool(getattr(defense, "randomized", False)),
        "feature_layer": setup.feature_layer, "score_pairing": setup.pairing,
        "score_views": [repr(g) for g in setup.views], "world_size": setup.world,
        "num_classes": setup.k, "ignore_index": cfg.ignore_index if setup.seg else None,
        "device": str(setup.device), "ensemble": cfg.ensemble,
        "ensemble_queries": cfg.ensemble_queries, "checks": cfg.checks,
        "check_images": cfg.check_images,
    }


def _defense_settings(defense: Defense | None) -> dict[str, Any]:
    if defense is None:
        return {}
    keys = ("eps_v", "eta", "steps", "noise", "feature_layer", "pairing", "grad_norm", "update",
            "kind")
    return {k: getattr(defense, k) for k in keys if hasattr(defense, k)}


def _attack(spec: AttackSpec, model: nn.Module, defense: Defense | None, x: Tensor, y: Tensor,
            k: int, seg: bool, eps: float, settings: dict[str, Any], lambdas: list[float],
            seed: int, start: int, ignore_index: int) -> tuple[Tensor, str, str, Any]:
    """Adversarial images ``(B, C, H, W)`` of one block, the target, the attack's repr and
    the attack object (None for a lambda sweep)."""
    block_seed = _derived_seed(seed, "attack", spec.label, start)
    kw = {**settings, "eps": eps, "seed": block_seed}
    labels = y
    if spec.name != "autoattack" and (kw.get("targeted") or spec.options.get("targeted")):
        shifted = (y + 1) % k
        labels = torch.where(y == ignore_index, y, shifted) if seg else shifted
    sweep = None
    if spec.name == "adaptive":  # an explicit lambda_e beats the sweep
        sweep = [spec.options["lambda_e"]] if "lambda_e" in spec.options else \
            spec.options.get("lambdas", lambdas)
    if sweep is not None and defense is not None and len(sweep) > 1:
        atk, target = build_attack(spec, model, defense, **kw, lambda_e=float(sweep[0]))
        opts = {**kw, **{o: v for o, v in spec.options.items() if o != "lambdas"}}
        opts.pop("eot_samples", None)
        eps_run = opts.pop("eps")
        result = sweep_lambda(defense, x, labels, lambdas=[float(v) for v in sweep],
                              eps=eps_run, **opts)
        return result.images, target, f"sweep_lambda({list(sweep)}) of {atk!r}", None
    if sweep is not None:
        kw["lambda_e"] = float(sweep[0])
        spec = AttackSpec(spec.name, spec.label, {o: v for o, v in spec.options.items()
                                                  if o not in ("lambdas", "lambda_e")})
    atk, target = build_attack(spec, model, defense, **kw)
    return atk(x, labels), target, repr(atk), atk


def _defended(setup: _Setup, adv: Tensor, y: Tensor, seed: int, name: str, start: int,
              ignore_index: int) -> Tensor:
    """Purify ``adv`` ``setup.draws`` times, record the worst draw per image (and the first
    draw) in the per-image results; returns the first draw's purified images."""
    defense, model, draws = setup.defense, setup.model, setup.draws
    assert defense is not None
    first: Tensor | None = None
    worst_pred: Tensor | None = None
    worst_score: Tensor | None = None
    for r in range(draws):
        gen = _generator(adv.device, seed, "defense", name, start, r)
        purified = defense.purify(adv, generator=gen)
        with torch.no_grad():
            out = _check_output(model(purified), y, ignore_index, f"purified images ({name})")
        pred = out.argmax(1)
        score = per_image_score(out, y, ignore_index)
        if first is None:
            first = purified
            setup.per_image.record(name, "defended_single", start, score, pred, y)
            worst_pred, worst_score = pred, score
            continue
        assert worst_pred is not None and worst_score is not None
        worse = score < worst_score
        worst_pred = torch.where(worse.view((-1,) + (1,) * (pred.dim() - 1)), pred, worst_pred)
        worst_score = torch.where(worse, score, worst_score)
    assert first is not None and worst_pred is not None and worst_score is not None
    setup.per_image.record(name, "defended", start, worst_score, worst_pred, y)
    return first
