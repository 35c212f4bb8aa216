"""Soft Equivariance Regularization (SER) experiments at CPU scale.

Pretraining: patches of the built-in photographs (``equivision.data.photos``); probing:
the built-in digits fitted to the encoder's input (``--probe-data digits``, 10 classes,
out-of-domain like the paper's 3DIEBench) or photograph identity (``photos``, 8 classes).

    table2       MoCo-v3 / DINO / Barlow Twins, each as the baseline (the lambda = 0
                 control with the same r, so baseline and SER differ only in the SER
                 term) and with SER (Tables 2, 3):
                 linear (concatenated [CLS] of the last blocks), k-NN, MLP probes and
                 accuracy under generated corruptions (Tables 12, 13 in spirit)
    lambda0      the control of Table 5: plain MoCo-v3 (no T_eq, r = 0), SER with
                 lambda = 0 (the baseline of the other studies), SER with lambda 0.5
    layers       the SER layer from first to last block (Table 4 / figure 3): linear
                 accuracy, per-block equivariance scores, transformation prediction (Table 7)
    sensitivity  partition ratio r and loss weight lambda (Table 8)
    elements     removing group elements from T_eq: rot90, hflip, scale (Table 9)
    everylayer   SER on the [CLS]-insertion layer vs on every block (Table 10)
    arms         the comparison of issue 15, in-domain: per method (``--methods``), the
                 baseline (lambda = 0 control, same r), SER, and the plain method (no
                 T_eq); linear / 20-NN probes beside the raw-pixel and random-init
                 baselines, centred equivariance per block, geometric corruptions

``--data NAME`` pretrains and probes in-domain on one dataset (e.g. ``fashion-mnist``:
train split for pretraining and the probes' training set / memory, test split for the
queries); without it the built-in photographs are pretrained on and ``--probe-data`` probed.
Every probe result carries its baselines (raw pixels, random-init encoder).

``--preset gpu`` (the default with ``--device cuda``): GPU-size runs of the paper's best
rows: Fashion-MNIST in-domain, ViT-S-like encoder (dim 384, depth 12, 6 heads) at 32 px
with 4 px patches, 2 global + 4 local 16 px views (multi-crop), batch 1024, r = 0.04 (41
SER images per batch, as r = 0.01 of the paper's 4096), 100 epochs, bf16 autocast, three
seeds; ``--tiny`` shrinks any preset to a few seconds on the CPU through the same code
(tests run ``--preset gpu --tiny --device cpu``).

``--preset cpu``: the arms of issue 15 at CPU scale: Fashion-MNIST in-domain at 16 px
(4 px patches), a 48-wide 4-block encoder, 256 steps of batch 128 (r = 0.05, 6 SER images a
batch), three seeds; about 2 min a run on one loaded core
(``python experiments/ser.py arms --preset cpu --device cpu``).

``--preset cpu-large``: the same arms at the largest size that fits about 45 core-minutes
for three seeds: 28 px (4 px patches, 7x7 tokens, 10 T_eq canvases), the 48-wide 4-block
encoder, 768 steps of batch 64 (r = 0.1, 6 SER images a batch); about 4 core-minutes a
run, 37 for the nine (``python experiments/ser.py arms --preset cpu-large --device cpu``).

``--preset cpu-hour``: issue 15's "about an hour per arm on CPU" (the three seeds of an
arm), ~23 core-minutes a run (measured): cpu-large's encoder, images and probes with 5x its
optimizer steps (3840 of batch 64 over 30720 images, 8 epochs); about 3.5 hours of one core
for the nine runs (measured 207 core-minutes), so it resumes run by run (below).

Every study runs seed by seed (all configurations of seed 0, then of seed 1, ...) and
rewrites its results after each seed, so that a run stopped part-way leaves paired seeds.
A rerun of the same command resumes run by run: a finished (configuration, seed) is read
back from its ``probes.json`` (written with the settings it came from; other settings
probe it again), a pretraining stopped part-way resumes from its last epoch's checkpoint.

``--quick`` = a tiny encoder, few images and epochs, one seed (checks that it runs; the
numbers mean little; about 20 s of CPU per configuration). ``--size N`` overrides the image
size of the preset. T_eq resizes whole images to patch-aligned canvases (token area 0.7-1.3
of N, aspect 3/4-4/3; at 32 px / 4 px patches 13 canvases from 24 to 40 px a side, at 16 px
five), so ``--quick --size 16`` (about half the cost) scales too.
Results: ``runs/ser[-quick][-SIZEpx]/<study>.json`` and ``.md`` (for ``arms`` with the
arms paired by seed, :mod:`support.ser_tables`, which also joins the ``arms.json`` of
seeds run in separate processes); checkpoints
under ``runs/ser[-quick]/<study>/<run>/`` (an existing finished run is reused).
Example: ``python experiments/ser.py lambda0 --quick``; on several processes:
``torchrun --nproc_per_node 4 experiments/ser.py table2`` (the batch is sharded); on a GPU:
``python experiments/ser.py arms --device cuda`` (``--methods mocov3,dino,barlow``).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

from support.ser_tables import tables as arms_tables
from support.ser_tables import value_at
from support.studies import mean_std

from equivision.data import get_dataset, photos
from equivision.measure import write_atomic
from equivision.ssl import (
    BasePolicy,
    EquivariantPolicy,
    SERConfig,
    SSLViT,
    ViewSampler,
    build_method,
    rank_and_world,
)
from equivision.ssl.data import load_images
from equivision.ssl.pretrain import PretrainConfig, pretrain
from equivision.ssl.probe import fit_dataset, run_probes
from equivision.ssl.views import local_policy
from equivision.utils import seed_everything

# --- scales ------------------------------------------------------------------------------
FULL = {
    "encoder": dict(image_size=32, patch_size=4, dim=192, depth=6, heads=3, cls_layer=3),
    "patches_per_image": 400, "seeds": (0, 1, 2),
    "pretrain": dict(epochs=100, batch_size=256, lr=5e-4, warmup_epochs=10, ratio=0.01),
    "ratios": (0.0, 0.005, 0.01, 0.02), "severities": (1, 2, 3, 4, 5),
    "probe_steps": 500,
}
QUICK = {
    # 32 px: 13 T_eq canvases with 4 px patches (16 px, ``--size 16``, has 5)
    "encoder": dict(image_size=32, patch_size=4, dim=32, depth=3, heads=2, cls_layer=1),
    "patches_per_image": 24, "seeds": (0,),
    "pretrain": dict(epochs=2, batch_size=64, lr=1e-3, warmup_epochs=1, ratio=0.05),
    "ratios": (0.0, 0.03, 0.06), "severities": (3,),
    "probe_steps": 100, "pretrain_images": 1536, "probe_train": 2000, "probe_test": 1000,
}
GPU = {
    # the paper's best rows (2 + 4 views) at a size an H100/H200 trains in ~15 min a run
    "encoder": dict(image_size=32, patch_size=4, dim=384, depth=12, heads=6, cls_layer=6),
    "data": "fashion-mnist", "patches_per_image": 400, "seeds": (0, 1, 2),
    "pretrain": dict(epochs=100, batch_size=1024, lr=6e-4, warmup_epochs=10, ratio=0.04,
                     local_crops=4, local_size=16),
    "ratios": (0.0, 0.02, 0.04, 0.08), "severities": (1, 2, 3, 4, 5),
    "probe_steps": 1000, "probe_train": None, "probe_test": None,
}
CPU = {
    # issue 15's three arms in-domain at CPU scale (~2-3 min a run on one loaded core):
    # 16 px Fashion-MNIST, 4 px patches (5 T_eq canvases), 4 blocks, 3 seeds
    "encoder": dict(image_size=16, patch_size=4, dim=48, depth=4, heads=3, cls_layer=2),
    "data": "fashion-mnist", "patches_per_image": 24, "seeds": (0, 1, 2),
    "pretrain": dict(epochs=4, batch_size=128, lr=1e-3, warmup_epochs=1, ratio=0.05),
    "ratios": (0.0, 0.03, 0.06), "severities": (3,),
    "probe_steps": 200, "pretrain_images": 8192, "probe_train": 4000, "probe_test": 2000,
}
CPU_LARGE = {
    # issue 15's arms at the largest size three seeds x three arms fit in ~45 core-minutes
    # (measured: 37 for the nine runs): 28 px with 4 px patches (7x7 tokens, 10 T_eq
    # canvases instead of 5), 768 steps of batch 64 (3x the cpu preset's steps), r = 0.1
    # (6 SER images a batch, as in the cpu preset), 16384 pretraining images
    "encoder": dict(image_size=28, patch_size=4, dim=48, depth=4, heads=3, cls_layer=2),
    "data": "fashion-mnist", "patches_per_image": 24, "seeds": (0, 1, 2),
    "pretrain": dict(epochs=3, batch_size=64, lr=1e-3, warmup_epochs=0.5, ratio=0.1),
    "ratios": (0.0, 0.05, 0.1), "severities": (3,),
    "probe_steps": 200, "pretrain_images": 16384, "probe_train": 4000, "probe_test": 2000,
}
CPU_HOUR = {
    # issue 15's "about an hour per arm on CPU" (an arm = its three seeds, so ~20
    # core-minutes a run planned; 23 measured, docs/results.md Part 3): cpu-large's
    # encoder and probes, 5x its optimizer steps (3840 of batch 64) over 30720 images.
    # A short trial (one thread, online 20-NN on 2000 / 1000 held-out images) chose
    # steps over size: at 400 steps 48-wide x 4 blocks reached 0.66 at 0.33 CPU-s a
    # step, 64-wide x 6 blocks 0.61 at 0.60 CPU-s a step
    **CPU_LARGE,
    "pretrain": {**CPU_LARGE["pretrain"], "epochs": 8},
    "pretrain_images": 30720,
}
PRESETS = {"quick": QUICK, "full": FULL, "gpu": GPU, "cpu": CPU, "cpu-large": CPU_LARGE,
           "cpu-hour": CPU_HOUR}
#: presets whose methods get the small projection heads (:data:`SMALL_HEADS`)
SMALL_PRESETS = ("quick", "cpu", "cpu-large", "cpu-hour")
#: where each preset writes by default (``runs/<name>``)
OUT_NAMES = {"quick": "ser-quick", "full": "ser", "gpu": "ser-gpu", "cpu": "ser-cpu",
             "cpu-large": "ser-cpu-large", "cpu-hour": "ser-cpu-hour"}


def tiny(scale: dict) -> dict:
    """``scale`` shrunk to seconds on a CPU, every feature kept (multi-crop, the data, the
    probes): a 16 px, 16-wide, 2-block encoder, one seed, one epoch of 32 images."""
    enc = dict(image_size=16, patch_size=4, dim=16, depth=2, heads=2, cls_layer=1)
    pre = {**scale["pretrain"], "epochs": 1, "batch_size": 16, "warmup_epochs": 0}
    if pre.get("local_crops"):
        pre.update(local_crops=2, local_size=8)
    return {**scale, "encoder": enc, "seeds": (0,), "pretrain": pre, "patches_per_image": 4,
            "severities": (3,), "probe_steps": 5, "probe_train": 32, "probe_test": 16,
            "pretrain_images": 32, "tiny": True}


SMALL_HEADS = {"mocov3": dict(proj_dim=64, hidden=256), "barlow": dict(proj_dim=128, hidden=256),
               "dino": dict(out_dim=256, hidden=256, bottleneck=64)}
TAU = {"mocov3": 0.3, "barlow": 0.3, "dino": 0.5}  # the paper's SER temperatures
LAMBDAS = (0.0, 0.5, 1.0, 5.0, 10.0)
#: the baseline arm of every study: the lambda = 0 control (SERConfig.control) with the
#: same ratio r as SER, so that the comparison isolates the SER term (``ser=None`` is the
#: plain method without T_eq, kept in ``lambda0``)
BASELINE = {"weight": 0.0}


def run(args, scale: dict, study: str, label: str, method: str = "mocov3",
        ser: dict | None = None, ratio: float | None = None, views: dict | None = None,
        which=("linear", "knn"), loaded: tuple[Any, Any, Any] | None = None) -> dict[str, Any]:
    """Pretrain one configuration for every seed and probe it; returns per-seed results.
    ``loaded``: the study's :func:`datasets`, if already loaded.

    Resumes run by run: a seed whose ``probes.json`` holds the same settings is read back
    (neither pretrained nor probed again); a seed with a ``last.pt`` but no matching
    ``probes.json`` resumes pretraining from its last epoch's checkpoint (a finished one
    trains nothing) and is probed."""
    enc_cfg = scale["encoder"]
    data, tr, te = loaded if loaded is not None else datasets(args, scale)
    if ser is None and ratio is None:
        ratio = 0.0  # the plain baseline: every image gets the base policy T
    p_cfg = {**scale["pretrain"], **({} if ratio is None else {"ratio": ratio})}
    kw = SMALL_HEADS[method] if args.preset in SMALL_PRESETS or scale.get("tiny") else {}
    options = {"linear": {"steps": scale["probe_steps"]},
               "mlp": {"steps": scale["probe_steps"]},
               "transform_prediction": {"steps": scale["probe_steps"]},
               "corruptions": {"steps": scale["probe_steps"],
                               "severities": list(scale["severities"])}}
    options = {k: v for k, v in options.items() if k in which}
    per_seed = []
    for seed in scale["seeds"]:
        out = args.out / study / f"{label}-seed{seed}".replace(" ", "_")
        settings = run_settings(args, scale, seed, method=method, kwargs=kw,
                                ser=None if ser is None else {"tau": TAU[method], **ser},
                                pretrain=p_cfg, views=views, which=which, options=options)
        done = finished(out, settings)
        if done is not None:
            per_seed.append(done)
            continue
        seed_everything(seed)
        encoder = SSLViT(**enc_cfg)
        ser_cfg = None if ser is None else SERConfig(**{"tau": TAU[method], **ser})
        m = build_method(method, encoder, ser_cfg, **kw)
        sampler = None
        if views is not None:
            eq = EquivariantPolicy(enc_cfg["image_size"], enc_cfg["patch_size"], **views)
            n_local = p_cfg.get("local_crops", 0)
            local = local_policy(p_cfg["local_size"], enc_cfg["patch_size"]) if n_local \
                else None
            sampler = ViewSampler(BasePolicy(), eq, p_cfg["ratio"], local, n_local)
        config = PretrainConfig(**p_cfg, seed=seed, device=args.device)
        history = pretrain(m, data, config, out_dir=out,
                           resume=(out / "last.pt").exists(), views=sampler,
                           progress=not args.quiet, method_kwargs=kw)
        if rank_and_world()[0] != 0:  # under torchrun only rank 0 probes and writes
            continue
        probes = run_probes(m.backbone, tr, te, which=which, device=args.device,
                            options=options, baselines=True)
        result = {"seed": seed, "final_loss": history["loss"][-1], **probes}
        write_atomic(out / PROBES_NAME, json.dumps({"settings": settings, "result": result}))
        per_seed.append(result)
    return {"label": label, "method": method, "ser": ser, "ratio": p_cfg["ratio"],
            "views": views, "runs": per_seed}


#: the file in a run's folder that holds its probe results and the settings they came from
PROBES_NAME = "probes.json"


def run_settings(args, scale: dict, seed: int, **config: Any) -> dict[str, Any]:
    """Everything one (configuration, seed) run's results depend on, as plain JSON values:
    the encoder, the data (name and sizes), the seed and ``config`` (method, SER, heads,
    pretraining settings, views, probes and their options)."""
    data = {"data": args.data or scale.get("data"), "probe_data": args.probe_data,
            **{k: scale.get(k) for k in ("pretrain_images", "probe_train", "probe_test",
                                         "patches_per_image")}}
    settings = {"encoder": scale["encoder"], "seed": seed, **data, **config}
    return json.loads(json.dumps(settings))


def finished(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The saved result of the run in ``out`` when its ``probes.json`` was written with the
    same ``settings`` and its checkpoint is there; else None (the run is (re)done)."""
    path = out / PROBES_NAME
    if not path.exists() or not (out / "last.pt").exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("settings") != settings:
        return None
    return saved.get("result")


def datasets(args, scale: dict) -> tuple[Any, Any, Any]:
    """``(pretraining images, probe train, probe test)``: one dataset in-domain with
    ``--data`` (or the preset's ``data``), else photograph patches and ``--probe-data``."""
    size = scale["encoder"]["image_size"]
    name = args.data or scale.get("data")
    if name:
        n = scale.get("pretrain_images")
        return (load_images(name, "train", size, n, seed=0),
                load_images(name, "train", size, scale.get("probe_train"), seed=1),
                load_images(name, "test", size, scale.get("probe_test"), seed=1))
    data = photos("train", size=size, patches_per_image=scale["patches_per_image"], seed=0)
    if args.probe_data == "digits":
        return (data, fit_dataset(get_dataset("digits", split="train"), size),
                fit_dataset(get_dataset("digits", split="test"), size))
    return (data, photos("train", size=size, patches_per_image=40, seed=1),
            photos("test", size=size, patches_per_image=20, seed=1))


def summary(entry: dict[str, Any]) -> dict[str, tuple[float | None, float | None]]:
    """Mean and std over seeds of the headline numbers of one configuration."""
    keys = {"linear top1": "linear/top1", "linear top5": "linear/top5", "20-NN top1": "knn/top1",
            "MLP top1": "mlp/top1", "corrupt appearance": "corruptions/mean_appearance",
            "corrupt geometric": "corruptions/mean_geometric",
            "linear top1 (random init)": "baselines/random_init/linear/top1",
            "20-NN top1 (random init)": "baselines/random_init/knn/top1",
            "linear top1 (raw pixels)": "baselines/raw_pixels/linear/top1",
            "20-NN top1 (raw pixels)": "baselines/raw_pixels/knn/top1"}
    out = {name: mean_std([value_at(r, path) for r in entry["runs"]])
           for name, path in keys.items()}
    for g in ("rot90", "hflip", "scale"):
        vals = [(r.get("equivariance") or {}).get("centred", {}).get(g, [None])[-1]
                for r in entry["runs"]]
        out[f"equiv {g} (last block)"] = mean_std(vals)
    for task in ("rotation", "flip"):
        vals = [(r.get("transform_prediction") or {}).get(task, {}).get("cls")
                for r in entry["runs"]]
        out[f"predict {task} ([CLS])"] = mean_std(vals)
    return {k: v for k, v in out.items() if v[0] is not None}


def write(args, study: str, entries: list[dict[str, Any]]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / f"{study}.json", json.dumps(
        {"study": study, "preset": args.preset, "tiny": args.tiny, "quick": args.quick,
         "data": args.data, "probe_data": args.probe_data, "entries": entries}, indent=1))
    rows = [(e["label"], summary(e)) for e in entries]
    cols = list(dict.fromkeys(c for _, s in rows for c in s))
    lines = [f"# SER {study} ({args.preset}{', tiny' if args.tiny else ''})", "",
             "| run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, s in rows:
        cells = [f"{s[c][0]:.4f} ± {s[c][1]:.4f}" if c in s else "" for c in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if study == "arms":  # the arms paired by seed, with intervals (support.ser_tables)
        lines += ["", arms_tables([{"entries": entries}])]
    write_atomic(args.out / f"{study}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def study_runs(args, scale: dict) -> list[tuple[str, dict[str, Any]]]:
    """(label, keyword arguments of :func:`run`) of every configuration of the study."""
    ser = {"weight": 0.5}
    base = BASELINE
    depth = scale["encoder"]["depth"]
    s = args.study
    if s == "table2":
        which = ("linear", "knn", "mlp", "corruptions")
        return [(f"{m}{' + SER' if on else ' (lambda=0)'}", dict(method=m, ser=ser if on else base,
                                                                   which=which))
                for m in ("mocov3", "dino", "barlow") for on in (False, True)]
    if s == "arms":
        which = ("linear", "knn", "equivariance", "corruptions")
        arms = {"baseline (lambda=0)": base, "SER": ser, "plain (no T_eq)": None}
        return [(f"{m} {arm}", dict(method=m, ser=cfg, which=which))
                for m in args.methods for arm, cfg in arms.items()]
    if s == "lambda0":
        return [("MoCo-v3 (plain, r=0)", dict(ser=None)), ("SER lambda=0", dict(ser=BASELINE)),
                ("SER lambda=0.5", dict(ser=ser))]
    if s == "layers":
        which = ("linear", "knn", "equivariance", "transform_prediction")
        return [("MoCo-v3 (lambda=0)", dict(ser=base, which=which))] + [
            (f"SER layer {layer}", dict(ser={**ser, "layer": layer}, which=which))
            for layer in range(1, depth + 1)]
    if s == "sensitivity":
        return [(f"r={r}", dict(ser=ser if r else None, ratio=r)) for r in scale["ratios"]] + [
            (f"lambda={lam}", dict(ser={"weight": lam})) for lam in LAMBDAS]
    if s == "elements":
        return [("SER (full)", dict(ser=ser, views={})),
                ("- rot90", dict(ser=ser, views={"rotations": False})),
                ("- rot90 - hflip", dict(ser=ser, views={"rotations": False, "flip_p": 0.0})),
                ("- rot90 - scale", dict(ser=ser, views={"rotations": False, "scales": [1.0]}))]
    return [("MoCo-v3 (lambda=0)", dict(ser=base)), ("SER ([CLS] layer)", dict(ser=ser)),
            ("SER (all layers)", dict(ser={**ser, "layer": "all"}))]


def seed_list(text: str) -> tuple[int, ...]:
    """``"3,4,5"`` -> ``(3, 4, 5)`` (the ``--seeds`` argument)."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds takes comma-separated integers such as 3,4,5, got {text!r}") from None


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=["table2", "lambda0", "layers", "sensitivity", "elements",
                                     "everylayer", "arms"])
    p.add_argument("--quick", action="store_true", help="the quick preset (--preset quick)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="sizes (default: gpu with --device cuda, else full; quick with "
                   "--quick)")
    p.add_argument("--tiny", action="store_true",
                   help="shrink the preset to seconds on a CPU (tests; the same code path)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--data", default=None, help="pretrain and probe in-domain on this "
                   "dataset (e.g. fashion-mnist, digits; default: the preset's, else photos)")
    p.add_argument("--probe-data", choices=["digits", "photos"], default="digits")
    p.add_argument("--methods", type=lambda t: t.split(","), default=["mocov3"],
                   help="methods of the arms study, e.g. mocov3,dino,barlow")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--seeds", type=seed_list, default=None,
                   help="seeds instead of the preset's, e.g. 3,4,5")
    p.add_argument("--size", type=int, default=None,
                   help="image size instead of the preset's (a multiple of its patch size)")
    args = p.parse_args(argv)
    args.preset = args.preset or ("quick" if args.quick else "gpu"
                                  if args.device.startswith("cuda") else "full")
    args.quick = args.preset == "quick"
    bad = [m for m in args.methods if m not in SMALL_HEADS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {', '.join(SMALL_HEADS)}")
    scale = PRESETS[args.preset]
    if args.size is not None:
        patch = scale["encoder"]["patch_size"]
        if args.size <= 0 or args.size % patch:
            p.error(f"--size must be a positive multiple of the patch size {patch}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    name = OUT_NAMES[args.preset] + ("-tiny" if args.tiny else "") + \
        (f"-{args.size}px" if args.size else "")
    args.out = args.out or Path("runs") / name
    scale = tiny(PRESETS[args.preset]) if args.tiny else PRESETS[args.preset]
    if args.size is not None:
        scale = {**scale, "encoder": {**scale["encoder"], "image_size": args.size}}
    if args.seeds is not None:
        scale = {**scale, "seeds": args.seeds}
    with warnings.catch_warnings():
        if args.size is not None and args.size < 32:  # no patch-aligned scale at 16 px
            warnings.filterwarnings("ignore", message="no patch-aligned scale")
        run_seed_major(args, scale)


def run_seed_major(args, scale: dict) -> list[dict[str, Any]]:
    """Run every configuration of the study seed by seed (all configurations of the first
    seed, then of the next), writing the results after each seed, so that a run stopped
    part-way still leaves paired seeds on disk; returns the entries (one per configuration,
    its ``runs`` in seed order)."""
    entries: dict[str, dict[str, Any]] = {}
    loaded = datasets(args, scale)  # the same images for every seed and configuration
    for seed in scale["seeds"]:
        for label, kw in study_runs(args, scale):
            entry = run(args, {**scale, "seeds": (seed,)}, args.study, label, loaded=loaded,
                        **kw)
            if label in entries:
                entries[label]["runs"].extend(entry["runs"])
            else:
                entries[label] = entry
        if rank_and_world()[0] == 0:
            write(args, args.study, list(entries.values()))
    return list(entries.values())


if __name__ == "__main__":
    main()
