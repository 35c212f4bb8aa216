"""One pool of trained models shared by the augmentation, width, architecture, Spearman
and cosine studies of the learned-equivariance paper (section 4), on any dataset.

Every model is trained once (:func:`support.studies.train_run`, reused when finished),
measured once under :data:`POOL_TRANSFORMS` beside the same architecture at random
initialisation (``random_init=True``, seeded with the run's seed), and its record is
appended to ``records.jsonl`` as soon as it finishes, so an interrupted pool resumes
where it stopped. The studies then only read the saved reports (:mod:`support.pool_studies`).

Experiment support, not library API (imported as ``support.pool``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from equivision.io import write_atomic
from equivision.measure import Report, measure
from support.studies import RunSpec, measure_path, train_run

#: Transformations every pool model is measured under, in one pass: 90° rotations (the
#: rotation and cosine studies), the mirror, diagonal whole-pixel shifts 1-4 px (valid
#: region only) and a diagonal half-pixel bilinear shift.
POOL_TRANSFORMS = "rot90,hflip,shift:1-4,subshift:0.5"

#: The augmentations of the augmentation study (section 4.4), label -> spec.
POOL_AUGMENTS = {"none": "none", "random crops": "crop", "horizontal flips": "flip",
                 "CutMix": "cutmix:1:1", "RandAugment": "randaugment"}

#: Extra widths of cnn7 (its default is 20 channels) for the width study (section 4.5).
POOL_WIDTHS = (10, 40)


def pool_specs(data: str, seeds: Sequence[int], epochs: int, train_images: int | None,
               test_images: int | None, transformer: dict[str, int] | None = None
               ) -> dict[str, list[RunSpec]]:
    """The pool's runs per group label, one per seed: cnn7 (width 20) with each of
    :data:`POOL_AUGMENTS` (``"cnn7 <augmentation>"``), cnn7 at each of
    :data:`POOL_WIDTHS` without augmentation (``"cnn7 width <w>"``), and ``"ViT"`` /
    ``"MLP-Mixer"`` (patch 4, ``transformer`` sizes, AdamW), all at 28 px on ``data``."""
    def spec(model: str, seed: int, **kw: Any) -> RunSpec:
        return RunSpec(model, data, seed=seed, size=28, epochs=epochs,
                       train_images=train_images, test_images=test_images, **kw)

    small = dict(transformer or {"dim": 64, "depth": 4})
    groups = {f"cnn7 {label}": [spec("cnn7", s, augment=a) for s in seeds]
              for label, a in POOL_AUGMENTS.items()}
    for w in POOL_WIDTHS:
        groups[f"cnn7 width {w}"] = [spec("cnn7", s, model_kwargs={"width": w}) for s in seeds]
    for label, model in (("ViT", "vit-small"), ("MLP-Mixer", "mixer-small")):
        groups[label] = [spec(model, s, optimizer="adamw", lr=1e-3, weight_decay=0.05,
                              model_kwargs=small) for s in seeds]
    return groups


def seed_major(groups: dict[str, list[RunSpec]]) -> list[tuple[str, RunSpec]]:
    """``(label, spec)`` pairs ordered seed by seed (every group's first seed, then every
    group's second, ...), so a pool stopped early has whole seeds of every group."""
    depth = max(len(v) for v in groups.values())
    return [(label, specs[i]) for i in range(depth) for label, specs in groups.items()
            if i < len(specs)]


def report_path(root: Path, spec: RunSpec, transforms: str = POOL_TRANSFORMS) -> Path:
    """Where the pool keeps ``spec``'s measurement (with its random-init baseline)."""
    return measure_path(root, spec, transforms, random_init=True)


def pool_record(label: str, spec: RunSpec, root: Path, max_images: int,
                device: str = "auto", transforms: str = POOL_TRANSFORMS) -> dict[str, Any]:
    """Train (or reuse) and measure under ``transforms`` (or reuse the saved report of)
    one pool model.

    Returns ``{"label", "spec", "accuracy", "report", "train_seconds",
    "measure_seconds", "train_cpu_seconds", "measure_cpu_seconds"}`` (wall and process
    CPU time; near 0 for reused steps)."""
    t0, c0 = time.time(), time.process_time()
    path = report_path(root, spec, transforms)
    model, test_set, acc = train_run(spec, root, device)
    t1, c1 = time.time(), time.process_time()
    if not path.exists():
        rep = measure(model, test_set, transforms, max_images=max_images,
                      progress=False, model_name=spec.name, random_init=True,
                      init_seed=spec.seed)
        rep.save_json(path)
    return {"label": label, "spec": asdict(spec), "accuracy": acc, "report": str(path),
            "train_seconds": t1 - t0, "measure_seconds": time.time() - t1,
            "train_cpu_seconds": c1 - c0, "measure_cpu_seconds": time.process_time() - c1}


def run_pool(groups: dict[str, list[RunSpec]], root: Path, out: Path, max_images: int,
             device: str = "auto", transforms: str = POOL_TRANSFORMS
             ) -> list[dict[str, Any]]:
    """Train and measure every model of ``groups`` under ``transforms`` (seed-major),
    appending each record to ``out/records.jsonl`` as it finishes; a model already
    logged there with its report (of these transformations) is not touched again and
    keeps its logged record (and times). Returns the records, in seed-major order."""
    out.mkdir(parents=True, exist_ok=True)
    logged = _logged_records(out)
    records = []
    for label, spec in seed_major(groups):
        old = logged.get(spec.name)
        if old is not None and old["report"] == str(report_path(root, spec, transforms)):
            records.append(old)
            continue
        rec = pool_record(label, spec, root, max_images, device, transforms)
        records.append(rec)
        with open(out / "records.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(f"{label} seed {spec.seed}: accuracy {rec['accuracy']:.3f}, train "
              f"{rec['train_seconds']:.0f} s, measure {rec['measure_seconds']:.0f} s",
              flush=True)
    write_atomic(out / "pool.json", json.dumps(records, indent=1))
    return records


def _logged_records(out: Path) -> dict[str, dict[str, Any]]:
    """The records of ``out/records.jsonl`` whose report exists, the last per model,
    keyed by the run's name."""
    seen: dict[str, dict[str, Any]] = {}
    log = out / "records.jsonl"
    if log.exists():
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if Path(rec["report"]).exists():
                seen[RunSpec(**rec["spec"]).name] = rec
    return seen


def finished_records(groups: dict[str, list[RunSpec]], root: Path, out: Path
                     ) -> list[dict[str, Any]]:
    """The records of ``out/records.jsonl`` whose report exists, the last per model, in
    seed-major order (for summarising a pool that is still running or was stopped)."""
    seen = _logged_records(out)
    return [seen[spec.name] for _, spec in seed_major(groups) if spec.name in seen]


def load_reports(records: Sequence[dict[str, Any]]) -> list[Report]:
    """The saved reports of ``records``, in order."""
    return [Report.load_json(r["report"]) for r in records]


__all__ = ["POOL_AUGMENTS", "POOL_TRANSFORMS", "POOL_WIDTHS", "finished_records",
           "load_reports", "pool_record", "pool_specs", "report_path", "run_pool",
           "seed_major"]
