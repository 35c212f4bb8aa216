"""Demo section: the equivariance defense on digits under transfer PGD and BPDA+EOT.

:func:`section_defense` is a ``(ctx: equivision.demo.DemoContext) -> str`` section: it
trains (or reuses, from ``ctx.out / "defense-cnn-small"``) a small CNN on the built-in
digits at 16 px (28 px makes the purifier's views 3x dearer), then evaluates a small test
subset with
:func:`~equivision.robust.evaluate.evaluate_robustness`: clean and PGD accuracy without
and with the equivariance defense, BPDA+EOT and the AutoAttack-style ensemble (its
``rand`` version for the randomized purifier: APGD-CE and APGD-DLR through BPDA with EOT)
with the defense in the loop, the per-image worst case over the attacks and repeats, the
equivariance scores of clean, attacked and restored images, and the automatic checks with
what each flag means.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.data import Subset

from ..checkpoint import load_checkpoint
from ..data import get_dataset
from ..models import create_model
from ..training import TrainConfig, train
from ..utils import model_device, preserve_rng_state, resolve_device
from .defenses import EquivarianceDefense
from .evaluate import RobustnessConfig, evaluate_robustness

__all__ = ["DEMO_SETTINGS", "section_defense"]

#: sizes of the demo run (kept small: the evaluation takes about 40 s on 2 cores)
DEMO_SETTINGS: dict[str, Any] = {
    "size": 16, "width": 12, "epochs": 6, "lr": 0.03, "images": 64, "eps": 0.05, "steps": 5,
    "eps_v": 0.0625, "defense_steps": 5, "eot_samples": 2, "batch_size": 64, "repeats": 2,
    "feature_layer": "features.relu3", "ensemble": "auto", "check_images": 8,
}

#: what the automatic checks look at, for the report
CHECKS_TEXT = (
    "Automatic checks (as AutoAttack's flags; a warning means the numbers above may "
    "overstate robustness): `randomness` (do two passes of the defended model differ? then "
    "EOT and the worst case over repeats are needed), `gradients` (zero or NaN input "
    "gradients: masking or a broken path), `black-box` (did the gradient-free Square "
    "attack fool images the gradient attacks missed?), `transfer` (did attacks made on "
    "the bare model beat those through the defense?), `eps-growth` (does accuracy fall "
    "towards 0 as eps grows 4x and 16x?) and `convergence` (do twice the steps still "
    "lower accuracy?); the last two run on the first few images.")


def _model(ctx: Any, s: dict[str, Any]) -> tuple[torch.nn.Module, Any, bool, float]:
    """cnn-small on digits (``s["size"]`` px), trained with :func:`equivision.training.train`
    or reused from the cached checkpoint; returns ``(model, test set, cached, seconds)``."""
    device = resolve_device(ctx.device)
    train_set = get_dataset("digits", split="train", size=s["size"])
    test_set = get_dataset("digits", split="test", size=s["size"])
    with preserve_rng_state():  # the same initial weights whatever ran before
        torch.manual_seed(0)
        model = create_model("cnn-small", in_channels=1, num_classes=10, width=s["width"])
    run_dir = ctx.out / "defense-cnn-small"
    last = run_dir / "last.pt"
    config = TrainConfig(epochs=s["epochs"], batch_size=64, lr=s["lr"], optimizer="adam",
                         weight_decay=0.0, seed=0, device=str(device))
    t0 = time.time()
    cached = False
    if last.exists():
        state = load_checkpoint(last)
        if int(state.get("epoch", 0)) >= s["epochs"]:
            model.load_state_dict(state["model"])
            cached = True
    if not cached:
        train(model, train_set, None, config, out_dir=run_dir, resume=last.exists(),
              progress=ctx.progress)
    return model.to(device).eval(), test_set, cached, time.time() - t0


def section_defense(ctx: Any) -> str:
    """Markdown section: clean / PGD / BPDA+EOT accuracy of a digits CNN without and with
    the equivariance defense, with equivariance scores; numbers come from this run."""
    s = DEMO_SETTINGS
    model, test_set, cached, train_s = _model(ctx, s)
    data = Subset(test_set, range(min(s["images"], len(test_set))))
    defense = EquivarianceDefense(model, eps_v=s["eps_v"], steps=s["defense_steps"],
                                  feature_layer=s["feature_layer"])
    t0 = time.time()
    config = RobustnessConfig(eps=s["eps"], steps=s["steps"], eot_samples=s["eot_samples"],
                              batch_size=s["batch_size"], seed=0, repeats=s["repeats"],
                              feature_layer=s["feature_layer"], device=model_device(model),
                              progress=ctx.progress, ensemble=s["ensemble"],
                              check_images=s["check_images"])
    res = evaluate_robustness(model, data, ["pgd", "bpda-eot"], defense, config)
    eval_s = time.time() - t0
    ensemble = next(r for r in res.rows if r.name.startswith("autoattack"))
    ctx.artifacts["defense_result"] = res
    clean, pgd, bpda = res.row("clean"), res.row("pgd"), res.row("bpda-eot")
    assert res.worst_case is not None
    acc = {name: (r.undefended["accuracy"], r.defended["accuracy"])  # type: ignore[index]
           for name, r in (("clean", clean), ("pgd", pgd), ("bpda", bpda),
                           ("worst", res.worst_case))}
    how = "reused the cached checkpoint" if cached else \
        f"trained for {s['epochs']} epochs in {train_s:.0f} s"
    lines = [
        "## Equivariance defense under attack",
        "",
        f"A small CNN (`cnn-small`, width {s['width']}) {how} on the built-in digits at "
        f"{s['size']} px "
        f"(test accuracy {clean.undefended['accuracy']:.3f} on the subset). "
        f"The first {res.n_images} test images are attacked with L-inf eps = {s['eps']:g} "
        f"(pixel range [0, 1]), {s['steps']} PGD steps; the equivariance defense "
        f"(Algorithm 1) purifies with eps_v = {s['eps_v']:g}, T = {s['defense_steps']} "
        f"steps, K = {len(res.meta['score_views'])} views on the last conv map "
        f"`{s['feature_layer']}` (on the logits, which are vectors, the equivariance loss "
        "would be the invariance loss). `pgd` is generated "
        "on the undefended model and transferred (attack target `model`); `bpda-eot` "
        f"attacks the defended model (BPDA with {s['eot_samples']} EOT draws per step); "
        f"`{ensemble.name}` is the AutoAttack-style ensemble for randomized defenses "
        f"(APGD-CE then APGD-DLR through BPDA, {s['steps']} steps, each on the images still "
        "right). The defended prediction is the worst of "
        f"{res.meta['repeats_used']} purifications; `worst-case` is the per-image worst "
        "case over all attacks and repeats (an image counts only if it survives every one). "
        f"Brackets: 95% Wilson intervals over the {res.n_images} images. "
        f"Evaluation took {eval_s:.0f} s.",
        "",
        res.table(worst_case=True),
        "",
        _verdict(acc),
        "",
        CHECKS_TEXT,
        "",
        "```",
        res.checks_summary(),
        "```",
        "",
        "All numbers are from this run, on one small model and "
        f"{res.n_images} images: they are a smoke test of the pipeline, not a benchmark.",
    ]
    return "\n".join(lines)


def _verdict(acc: dict[str, tuple[float, float]]) -> str:
    """Honest sentences comparing the defended and undefended accuracies."""
    (c_u, c_d), (p_u, p_d), (_, b_d) = acc["clean"], acc["pgd"], acc["bpda"]
    w_d = acc["worst"][1]
    cost = "costs" if c_d < c_u - 0.02 else "keeps"
    first = (f"The defense {cost} clean accuracy ({c_u:.3f} undefended, {c_d:.3f} defended); "
             f"against PGD transferred from the undefended model it moves accuracy from "
             f"{p_u:.3f} to {p_d:.3f}. ")
    if b_d > p_u + 0.05:
        second = (f"Under BPDA+EOT, with the purifier in the loop, the defended accuracy is "
                  f"{b_d:.3f}: above the undefended model's {p_u:.3f} under PGD, but well "
                  "below the clean accuracy, and no stronger adaptive attack was tried here. ")
    else:
        second = (f"Under BPDA+EOT, with the purifier in the loop, the defended accuracy is "
                  f"{b_d:.3f} (undefended under PGD: {p_u:.3f}): against an attacker who "
                  "knows the defense it does not help here. ")
    third = (f"The per-image worst case over every attack and repeat leaves {w_d:.3f} "
             "defended accuracy: the figure to quote, since an attacker picks the attack "
             "that works on each image.")
    return first + second + third
