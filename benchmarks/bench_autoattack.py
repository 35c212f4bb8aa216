"""Our APGD, APGD-T, Square and AutoAttack-style ensemble against torchattacks' APGD, APGDT,
Square and AutoAttack: robust accuracy side by side and the time ratio.

Same model, images, eps and budget for both sides. The model is ``cnn-small`` (width 16)
trained on the 1x28x28 digits, as in ``bench_attacks.py``. Targets: our robust accuracy
equal to or lower than torchattacks' (a difference of one image or less counts as equal:
the random starts differ) and our time / theirs printed per attack. torchattacks'
AutoAttack also runs FAB, which our ensemble leaves out.

torchattacks is not a dependency of equivision. It is imported from the environment, else
from the site-packages of a scratch venv (``--torchattacks-venv``, default ``/tmp/ta``:
``python -m venv /tmp/ta && /tmp/ta/bin/pip install torch==2.13.0 && /tmp/ta/bin/pip
install --no-deps torchattacks``), whose directory is appended to ``sys.path`` so that
this environment's torch is the one used; torchattacks needs numpy and scipy, not
torchvision. Without it the script prints a message and exits 0.

Run: ``python benchmarks/bench_autoattack.py [--batch 256] [--eps 0.02] [--steps 100]
[--queries 5000] [--threads 1] [--device cpu] [--skip-autoattack]``.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from equivision.data import get_dataset
from equivision.models import create_model
from equivision.robust.apgd import APGD, APGDT
from equivision.robust.attacks import PGD
from equivision.robust.ensemble import AutoAttackEnsemble
from equivision.robust.square import Square
from equivision.training import TrainConfig, evaluate, train


def import_torchattacks(venv: str) -> ModuleType | None:
    """torchattacks from this environment or from ``venv``'s site-packages, else None."""
    try:
        return importlib.import_module("torchattacks")
    except ImportError:
        pass
    for site in glob.glob(f"{venv}/lib/python3*/site-packages"):
        sys.path.append(site)
        try:
            return importlib.import_module("torchattacks")
        except ImportError as err:
            print(f"torchattacks in {site} does not import: {err}")
            sys.path.remove(site)
    return None


def timed(attack: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor,
          device: torch.device) -> tuple[float, Tensor]:
    """Seconds and adversarial images of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    adv = attack(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, adv


def robust_accuracy(model: nn.Module, adv: Tensor, x: Tensor, y: Tensor, eps: float,
                    norm: str = "linf") -> float:
    """Accuracy on ``adv (B, C, H, W)`` after checking the eps ball and [0, 1]."""
    adv = adv.detach()
    d = (adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert float(size.max()) <= eps + 1e-4, "outside the eps ball"
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1, "outside [0, 1]"
    with torch.no_grad():
        return float((model(adv).argmax(1) == y).float().mean())


def pairs(ta: ModuleType, model: nn.Module, args: argparse.Namespace) -> list[tuple[str, Any, Any]]:
    """``(name, ours, theirs)`` attacks at equal budget."""
    eps, steps, k = args.eps, args.steps, 10
    out = [
        ("APGD-CE", APGD(model, eps, steps=steps, loss="ce"),
         ta.APGD(model, norm="Linf", eps=eps, steps=steps, loss="ce", seed=0)),
        ("APGD-DLR", APGD(model, eps, steps=steps, loss="dlr"),
         ta.APGD(model, norm="Linf", eps=eps, steps=steps, loss="dlr", seed=0)),
        ("APGD-T", APGDT(model, eps, steps=steps, n_targets=k - 1),
         ta.APGDT(model, norm="Linf", eps=eps, steps=steps, n_classes=k, seed=0)),
        ("Square", Square(model, eps, queries=args.queries),
         ta.Square(model, norm="Linf", eps=eps, n_queries=args.queries, seed=0)),
    ]
    if args.l2_eps > 0:
        l2 = args.l2_eps
        out += [
            ("APGD-CE L2", APGD(model, l2, steps=steps, loss="ce", norm="l2"),
             ta.APGD(model, norm="L2", eps=l2, steps=steps, loss="ce", seed=0)),
            ("Square L2", Square(model, l2, queries=args.queries, norm="l2"),
             ta.Square(model, norm="L2", eps=l2, n_queries=args.queries, seed=0)),
        ]
    if not args.skip_autoattack:
        ours = AutoAttackEnsemble(model, eps, steps=steps, n_targets=k - 1, queries=args.queries)
        out.append(("ensemble/AutoAttack", lambda x, y: ours(x, y).images,
                    ta.AutoAttack(model, norm="Linf", eps=eps, n_classes=k, seed=0)))
    return out


_OPTIONS: tuple[tuple[str, type, Any, str], ...] = (
    ("--batch", int, 256, "test images attacked"),
    ("--eps", float, 0.02, "L-inf radius"),
    ("--l2-eps", float, 0.5, "L2 radius of the L2 pairs (0: skip them)"),
    ("--steps", int, 100, "APGD iterations"),
    ("--queries", int, 5000, "Square queries"),
    ("--epochs", int, 10, "training epochs of the model"),
    ("--threads", int, 1, "torch threads"),
    ("--device", str, "cpu", "torch device"),
    ("--torchattacks-venv", str, "/tmp/ta", "scratch venv holding torchattacks"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, kind, default, text in _OPTIONS:
        parser.add_argument(flag, type=kind, default=default, help=f"{text} ({default})")
    parser.add_argument("--skip-autoattack", action="store_true",
                        help="leave out the full ensembles (the slowest pair)")
    return parser.parse_args(argv)


def digits_model(epochs: int, device: str) -> tuple[nn.Module, float, Any]:
    """``cnn-small`` (width 16) trained on the digits: ``(model, clean accuracy, test set)``."""
    torch.manual_seed(0)
    train_set, test_set = (get_dataset("digits", split=s) for s in ("train", "test"))
    model = create_model("cnn-small", in_channels=1, num_classes=10, width=16)
    train(model, train_set, None, TrainConfig(epochs=epochs, batch_size=32, lr=0.003,
                                              optimizer="adam", weight_decay=0.0,
                                              device=device), progress=False)
    model.eval()
    return model, evaluate(model, test_set, 256)["accuracy"], test_set


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ta = import_torchattacks(args.torchattacks_venv)
    if ta is None:
        print("torchattacks is not importable (here or in the scratch venv "
              f"{args.torchattacks_venv}); skipping")
        return 0
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, clean, test_set = digits_model(args.epochs, args.device)
    x = test_set.images[: args.batch].to(device)
    y = test_set.labels[: args.batch].to(device)
    print(f"cnn-small (width 16) on digits, clean test accuracy {clean:.3f}; "
          f"L-inf eps={args.eps}, {args.steps} steps, {args.queries} Square queries, "
          f"batch {args.batch}, {args.threads} thread(s), {device}, torchattacks "
          f"{getattr(ta, '__version__', '?')}")
    t_pgd, adv = timed(PGD(model, args.eps, steps=args.steps), x, y, device)
    print(f"{'PGD-' + str(args.steps):>20}: ours {robust_accuracy(model, adv, x, y, args.eps):.4f}"
          f" ({t_pgd:.2f} s)")
    ok = True
    for name, ours, theirs in pairs(ta, model, args):
        t_a, adv_a = timed(ours, x, y, device)
        t_b, adv_b = timed(theirs, x, y, device)
        norm, eps = ("l2", args.l2_eps) if name.endswith("L2") else ("linf", args.eps)
        acc_a = robust_accuracy(model, adv_a, x, y, eps, norm)
        acc_b = robust_accuracy(model, adv_b, x, y, eps, norm)
        good = acc_a <= acc_b + 1.0 / args.batch + 1e-9
        ok &= good
        print(f"{name:>20}: ours {acc_a:.4f} torchattacks {acc_b:.4f} "
              f"({'ok' if good else 'WEAKER'}); time ours {t_a:.2f} s, theirs {t_b:.2f} s, "
              f"ratio {t_a / max(t_b, 1e-9):.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
