"""Our PGD against torchattacks' PGD: same model, same inputs, same (no) random start.

Targets:
* the adversarial images agree to max |difference| <= 1e-6 (ours with
  ``best_iterate=False``: torchattacks returns the last iterate; with best-iterate
  tracking, the default, ours may return an earlier, stronger iterate);
* our time / torchattacks' time <= 1.0 (median of interleaved repeats), for our default
  (best-iterate tracking on) and for the last-iterate variant.

Besides the wall-clock ratio it prints each attack's user and system CPU time and minor
page faults per call: on Linux with glibc a large part of the wall time is page faults of
the model's activations (freed heap memory goes back to the system and is faulted in again
at the next step), which varies with the allocator's state from run to run; the user-CPU
ratio compares the arithmetic alone.

The model is ``cnn-small`` (width 16) trained for a few epochs on the 1x28x28 digits (torchattacks
does not need 3 channels). Both attacks run with ``random_start=False`` (torchattacks draws
its start from the global RNG, so a random start cannot be matched); the L-inf step
``alpha``, ``eps`` and ``steps`` are equal.

torchattacks is not a dependency of equivision; install it into the venv with
``/tmp/tv/bin/pip install --no-deps torchattacks``. Without it the script prints a message
and exits 0.

Run: ``python benchmarks/bench_attacks.py [--batch 256] [--steps 10] [--repeats 7]
[--threads 1] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch

from equivision.data import get_dataset
from equivision.models import create_model
from equivision.robust.attacks import PGD
from equivision.training import TrainConfig, evaluate, train


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--alpha", type=float, default=0.02)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of the model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        import torchattacks
    except ImportError:
        print("torchattacks is not installed; skipping (install it with "
              "/tmp/tv/bin/pip install --no-deps torchattacks)")
        return 0
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    train_set = get_dataset("digits", split="train")
    test_set = get_dataset("digits", split="test")
    model = create_model("cnn-small", in_channels=1, num_classes=10, width=16)
    config = TrainConfig(epochs=args.epochs, batch_size=32, lr=0.003, optimizer="adam",
                         weight_decay=0.0, device=args.device)
    train(model, train_set, None, config, progress=False)
    model.eval()
    clean = evaluate(model, test_set, 256)
    x = test_set.images[: args.batch].to(device)
    y = test_set.labels[: args.batch].to(device)

    ours = PGD(model, args.eps, alpha=args.alpha, steps=args.steps, random_start=False)
    last = PGD(model, args.eps, alpha=args.alpha, steps=args.steps, random_start=False,
               best_iterate=False)
    theirs = torchattacks.PGD(model, eps=args.eps, alpha=args.alpha, steps=args.steps,
                              random_start=False)

    cpu: dict[str, list[tuple[float, float, int]]] = {"ours": [], "last": [], "theirs": []}

    def timed(attack, name: str) -> tuple[float, torch.Tensor]:
        _sync(device)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        adv = attack(x, y)
        _sync(device)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu[name].append((r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime,
                          r1.ru_minflt - r0.ru_minflt))
        return wall, adv

    timed(ours, "ours"), timed(last, "last"), timed(theirs, "theirs")  # warm-up
    for v in cpu.values():
        v.clear()
    t_ours, t_last, t_theirs = [], [], []
    diff = 0.0
    for _ in range(args.repeats):  # interleaved so that machine load hits all alike
        a, adv_a = timed(ours, "ours")
        c, adv_c = timed(last, "last")
        b, adv_b = timed(theirs, "theirs")
        t_ours.append(a)
        t_last.append(c)
        t_theirs.append(b)
        diff = max(diff, float((adv_c - adv_b).abs().max()))
    with torch.no_grad():
        acc = float((model(adv_a).argmax(1) == y).float().mean())
        acc_last = float((model(adv_c).argmax(1) == y).float().mean())
    m_ours, m_last = statistics.median(t_ours), statistics.median(t_last)
    m_theirs = statistics.median(t_theirs)
    ratio, ratio_last = m_ours / m_theirs, m_last / m_theirs
    print(f"model cnn-small (width 16) on digits, clean test accuracy {clean['accuracy']:.3f}; "
          f"PGD eps={args.eps} alpha={args.alpha} steps={args.steps}, batch {args.batch}, "
          f"{args.threads} thread(s), {device}")
    print(f"accuracy under PGD: {acc:.3f} (best iterate), {acc_last:.3f} (last iterate)")
    print(f"max |ours (last iterate) - torchattacks|: {diff:.3g}  (target <= 1e-6: "
          f"{'ok' if diff <= 1e-6 else 'MISSED'})")
    print(f"median time ours {m_ours * 1e3:.1f} ms (last iterate {m_last * 1e3:.1f} ms), "
          f"torchattacks {m_theirs * 1e3:.1f} ms, ratio ours/theirs {ratio:.3f} (last "
          f"iterate {ratio_last:.3f})  (target <= 1.0: "
          f"{'ok' if max(ratio, ratio_last) <= 1.0 else 'MISSED'})")
    user = {k: statistics.median(u for u, _, _ in v) for k, v in cpu.items()}
    print("median CPU time per call (user / system) and minor page faults: " + ", ".join(
        f"{k} {user[k] * 1e3:.0f} / {statistics.median(s for _, s, _ in v) * 1e3:.0f} ms, "
        f"{statistics.median(f for _, _, f in v):.0f}" for k, v in cpu.items()))
    print(f"user-CPU ratio ours/theirs {user['ours'] / user['theirs']:.3f} (last iterate "
          f"{user['last'] / user['theirs']:.3f}); system time is mostly page faults of the "
          "model's activations, which depend on the allocator's state (glibc returns freed "
          "heap memory to the system), not on the attack's code")
    return 0 if diff <= 1e-6 and max(ratio, ratio_last) <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
