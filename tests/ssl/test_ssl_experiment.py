"""experiments/ser.py: the GPU preset runs through the same code on the CPU at a tiny
size (in-domain data, multi-crop, the three arms, probes with their baselines)."""

from __future__ import annotations

import json

import pytest
import ser as experiment

from equivision.checkpoint import load_checkpoint
from equivision.ssl import EquivariantPolicy

pytestmark = pytest.mark.usefixtures("one_thread")


def test_device_cuda_selects_the_gpu_preset():
    assert experiment.parse(["arms", "--device", "cuda"]).preset == "gpu"
    assert experiment.parse(["arms", "--device", "cpu"]).preset == "full"
    assert experiment.parse(["arms", "--quick"]).preset == "quick"
    gpu = experiment.PRESETS["gpu"]
    assert gpu["pretrain"]["local_crops"] == 4 and gpu["data"] == "fashion-mnist"
    small = experiment.tiny(gpu)
    assert small["pretrain"]["local_crops"] == 2 and small["data"] == "fashion-mnist"
    with pytest.raises(SystemExit):
        experiment.parse(["arms", "--methods", "simclr"])


def test_gpu_preset_runs_tiny_on_the_cpu(tmp_path, capsys):
    experiment.main(["arms", "--preset", "gpu", "--tiny", "--device", "cpu", "--data",
                     "digits", "--out", str(tmp_path), "--quiet"])
    result = json.loads((tmp_path / "arms.json").read_text())
    assert result["preset"] == "gpu" and result["tiny"]
    labels = [e["label"] for e in result["entries"]]
    assert labels == ["mocov3 baseline (lambda=0)", "mocov3 SER", "mocov3 plain (no T_eq)"]
    assert [e["ratio"] for e in result["entries"]] == [0.04, 0.04, 0.0]
    run = result["entries"][1]["runs"][0]
    for key in ("linear", "knn", "equivariance", "corruptions", "baselines"):
        assert key in run
    assert set(run["baselines"]) == {"raw_pixels", "random_init"}
    ckpt = load_checkpoint(tmp_path / "arms" / "mocov3_SER-seed0" / "last.pt")
    assert ckpt["config"]["local_crops"] == 2 and ckpt["config"]["device"] == "cpu"
    table = (tmp_path / "arms.md").read_text()
    assert "20-NN top1 (raw pixels)" in table and "linear top1 (random init)" in table


def test_cpu_preset_is_the_three_arms_in_domain_with_three_seeds():
    """``--preset cpu``: issue 15's arms on Fashion-MNIST at CPU scale, three seeds, the
    small projection heads, and at least one SER image per batch."""
    args = experiment.parse(["arms", "--preset", "cpu"])
    assert args.preset == "cpu" and not args.quick
    cpu = experiment.PRESETS["cpu"]
    assert cpu["data"] == "fashion-mnist" and len(cpu["seeds"]) == 3
    assert cpu["pretrain"]["batch_size"] * cpu["pretrain"]["ratio"] >= 1
    assert cpu["encoder"]["image_size"] % cpu["encoder"]["patch_size"] == 0


def test_seeds_override_the_presets(tmp_path):
    assert experiment.parse(["arms", "--preset", "cpu", "--seeds", "3,4,5"]).seeds == (3, 4, 5)
    assert experiment.parse(["arms"]).seeds is None
    with pytest.raises(SystemExit):
        experiment.parse(["arms", "--seeds", "one"])
    experiment.main(["arms", "--preset", "gpu", "--tiny", "--device", "cpu", "--data",
                     "digits", "--out", str(tmp_path), "--quiet", "--seeds", "7"])
    result = json.loads((tmp_path / "arms.json").read_text())
    assert [r["seed"] for r in result["entries"][0]["runs"]] == [7]


def test_cpu_large_preset_trains_longer_on_more_canvases():
    """``--preset cpu-large``: the same arms with more optimizer steps than ``cpu`` at
    28 px, where T_eq has more patch-aligned canvases than the five at 16 px."""
    cpu, large = experiment.PRESETS["cpu"], experiment.PRESETS["cpu-large"]

    def steps(scale: dict) -> int:
        pre = scale["pretrain"]
        return pre["epochs"] * (scale["pretrain_images"] // pre["batch_size"])

    assert steps(large) >= 2 * steps(cpu)
    assert large["data"] == "fashion-mnist" and len(large["seeds"]) == 3
    enc = large["encoder"]
    assert enc["image_size"] % enc["patch_size"] == 0
    assert large["pretrain"]["batch_size"] * large["pretrain"]["ratio"] >= 1
    at_16px = EquivariantPolicy(16, 4).grids
    assert len(EquivariantPolicy(enc["image_size"], enc["patch_size"]).grids) > len(at_16px)
    assert experiment.parse(["arms", "--preset", "cpu-large"]).preset == "cpu-large"


def test_cpu_large_runs_seed_major_at_its_image_size(tmp_path, monkeypatch):
    """The preset's code path (28 px, small heads, in-domain data) at a tiny width, two
    seeds: every arm of seed 0 runs before seed 1, and the results are written after each
    seed, so a run stopped part-way still leaves paired seeds."""
    order, written = [], []
    real_run, real_write = experiment.run, experiment.write

    def spy_run(args, scale, study, label, **kw):
        order.append((scale["seeds"], label))
        return real_run(args, scale, study, label, **kw)

    def spy_write(args, study, entries):
        written.append([[r["seed"] for r in e["runs"]] for e in entries])
        real_write(args, study, entries)

    monkeypatch.setattr(experiment, "run", spy_run)
    monkeypatch.setattr(experiment, "write", spy_write)
    experiment.main(["arms", "--preset", "cpu-large", "--tiny", "--size", "28", "--device",
                     "cpu", "--data", "digits", "--out", str(tmp_path), "--quiet",
                     "--seeds", "0,1"])
    assert [seeds for seeds, _ in order] == [(0,)] * 3 + [(1,)] * 3
    assert written == [[[0]] * 3, [[0, 1]] * 3]
    result = json.loads((tmp_path / "arms.json").read_text())
    assert result["preset"] == "cpu-large"
    assert [e["ratio"] for e in result["entries"]] == [0.1, 0.1, 0.0]
    ckpt = load_checkpoint(tmp_path / "arms" / "mocov3_SER-seed1" / "last.pt")
    assert ckpt["encoder_config"]["image_size"] == 28
    assert ckpt["method_kwargs"]["proj_dim"] == experiment.SMALL_HEADS["mocov3"]["proj_dim"]


def test_cpu_hour_preset_trains_longest_on_the_cpu_large_probes():
    """``--preset cpu-hour``: the arms at 28 px with several times cpu-large's optimizer
    steps, on the same probe data (so cpu-large's baselines stay valid), three seeds."""
    large, hour = experiment.PRESETS["cpu-large"], experiment.PRESETS["cpu-hour"]

    def steps(scale: dict) -> int:
        pre = scale["pretrain"]
        return pre["epochs"] * (scale["pretrain_images"] // pre["batch_size"])

    assert steps(hour) >= 3 * steps(large)
    assert hour["encoder"]["image_size"] == large["encoder"]["image_size"] == 28
    assert {k: hour[k] for k in ("data", "probe_train", "probe_test", "probe_steps")} == \
        {k: large[k] for k in ("data", "probe_train", "probe_test", "probe_steps")}
    assert hour["seeds"] == (0, 1, 2)
    assert hour["pretrain"]["batch_size"] * hour["pretrain"]["ratio"] >= 1
    assert experiment.parse(["arms", "--preset", "cpu-hour"]).preset == "cpu-hour"
    assert "cpu-hour" in experiment.SMALL_PRESETS


def _two_epochs(real_tiny):
    def tiny(scale: dict) -> dict:
        small = real_tiny(scale)
        return {**small, "pretrain": {**small["pretrain"], "epochs": 2}}
    return tiny


class _Stopped(Exception):
    pass


def test_a_stopped_study_resumes_run_by_run(tmp_path, monkeypatch):
    """The cpu-hour code path (28 px, tiny width, two epochs): a finished (arm, seed) is
    read back from its ``probes.json`` (neither pretrained nor probed again), a run
    stopped after its first epoch resumes from that checkpoint, and the study ends with
    the results of an uninterrupted one."""
    monkeypatch.setattr(experiment, "tiny", _two_epochs(experiment.tiny))
    argv = ["arms", "--preset", "cpu-hour", "--tiny", "--size", "28", "--device", "cpu",
            "--data", "digits", "--quiet", "--seeds", "0", "--out"]
    experiment.main(argv + [str(tmp_path / "straight")])
    real_pretrain, real_probes = experiment.pretrain, experiment.run_probes

    def stop_in_ser(method, data, config, out_dir, **kw):
        if "SER" in str(out_dir):
            real_pretrain(method, data, config, out_dir=out_dir, stop_after=1, **kw)
            raise _Stopped
        return real_pretrain(method, data, config, out_dir=out_dir, **kw)

    monkeypatch.setattr(experiment, "pretrain", stop_in_ser)
    stopped = tmp_path / "stopped"
    with pytest.raises(_Stopped):
        experiment.main(argv + [str(stopped)])
    runs = stopped / "arms"
    ser_dir = runs / "mocov3_SER-seed0"
    assert (runs / "mocov3_baseline_(lambda=0)-seed0" / "probes.json").exists()
    assert load_checkpoint(ser_dir / "last.pt")["epoch"] == 1
    assert not (ser_dir / "probes.json").exists()

    calls, probed = [], []

    def spy_pretrain(method, data, config, out_dir, resume, **kw):
        epoch = load_checkpoint(out_dir / "last.pt")["epoch"] if resume else 0
        calls.append((out_dir.name, epoch))
        return real_pretrain(method, data, config, out_dir=out_dir, resume=resume, **kw)

    def spy_probes(*a, **kw):
        probed.append(1)
        return real_probes(*a, **kw)

    monkeypatch.setattr(experiment, "pretrain", spy_pretrain)
    monkeypatch.setattr(experiment, "run_probes", spy_probes)
    experiment.main(argv + [str(stopped)])
    assert calls == [("mocov3_SER-seed0", 1), ("mocov3_plain_(no_T_eq)-seed0", 0)]
    assert len(probed) == 2
    assert load_checkpoint(ser_dir / "last.pt")["epoch"] == 2

    def entries(root):
        return json.loads((root / "arms.json").read_text())["entries"]

    assert entries(stopped) == entries(tmp_path / "straight")
    experiment.main(argv + [str(stopped)])  # everything finished: nothing runs again
    assert len(calls) == 2 and len(probed) == 2
    assert entries(stopped) == entries(tmp_path / "straight")


@pytest.mark.filterwarnings("ignore:.*nothing to do")
def test_changed_probe_settings_probe_a_finished_run_again(tmp_path, monkeypatch):
    """``probes.json`` is read back only with the same settings: other probe options
    probe the finished checkpoint again without pretraining it again."""
    argv = ["arms", "--preset", "cpu-hour", "--tiny", "--device", "cpu", "--data",
            "digits", "--quiet", "--seeds", "0", "--out", str(tmp_path)]
    experiment.main(argv)
    stamp = (tmp_path / "arms" / "mocov3_SER-seed0" / "last.pt").stat().st_mtime_ns
    real_tiny, probed = experiment.tiny, []
    monkeypatch.setattr(experiment, "tiny", lambda s: {**real_tiny(s), "probe_steps": 6})
    real_probes = experiment.run_probes
    monkeypatch.setattr(experiment, "run_probes",
                        lambda *a, **kw: probed.append(kw["options"]) or real_probes(*a, **kw))
    experiment.main(argv)
    assert len(probed) == 3 and probed[0]["linear"] == {"steps": 6}
    assert (tmp_path / "arms" / "mocov3_SER-seed0" / "last.pt").stat().st_mtime_ns == stamp
