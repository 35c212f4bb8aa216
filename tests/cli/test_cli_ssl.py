"""`equivision pretrain` / `equivision probe` end to end on tiny sizes, the methods'
recorded constructor arguments, and the SER demo section at a tiny size."""

import json
import math

import pytest
import torch

from equivision.checkpoint import load_checkpoint
from equivision.cli import CLIError, main
from equivision.ssl import SSLViT, build_method
from equivision.ssl.pretrain import load_method

TINY = ["--image-size", "16", "--patch-size", "4", "--dim", "32", "--depth", "3", "--heads",
        "2", "--cls-layer", "1", "--images", "32", "--batch-size", "16", "--epochs", "1",
        "--method-args", "proj_dim=16,hidden=32", "--no-progress"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli-ssl") / "run"
    rc = main(["pretrain", "--method", "mocov3", "--ser", "--ser-weight", "0.7", "--ratio",
               "0.5", "--out", str(run), *TINY])
    assert rc == 0
    return run


@pytest.mark.parametrize("sub", ["pretrain", "probe"])
def test_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0
    assert "usage: equivision " + sub in capsys.readouterr().out


def test_pretrain_writes_a_checkpoint_that_round_trips(pretrained):
    for name in ("last.pt", "log.csv", "steps.csv"):
        assert (pretrained / name).exists()
    ckpt = load_checkpoint(pretrained / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["method_name"] == "mocov3"
    assert ckpt["ser_config"]["weight"] == pytest.approx(0.7)
    assert ckpt["config"]["ratio"] == pytest.approx(0.5)
    assert ckpt["encoder_config"]["dim"] == 32 and ckpt["encoder_config"]["cls_layer"] == 1
    # every constructor argument is recorded, so no method_kwargs= is needed to rebuild it
    assert ckpt["method_kwargs"] == {"proj_dim": 16, "hidden": 32, "tau": 0.2,
                                     "momentum": 0.99}
    method, info = load_method(pretrained / "last.pt")
    state = method.state_dict()
    assert state.keys() == ckpt["model"].keys()
    assert all(torch.equal(state[k], ckpt["model"][k]) for k in state)
    assert method.projector[0].out_features == 32


def test_probe_prints_a_table_and_writes_json(pretrained, tmp_path, capsys):
    out = tmp_path / "probe.json"
    rc = main(["probe", "--checkpoint", str(pretrained / "last.pt"), "--data", "digits",
               "--probes", "linear,knn,equivariance", "--images", "48", "--test-images",
               "24", "--steps", "10", "--json", str(out), "--device", "cpu"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "mocov3 + SER, epoch 1" in text
    assert "knn top1 / top5" in text and "equivariance (centred) rot90 (blocks 1..3)" in text
    d = json.loads(out.read_text())
    assert d["n_train"] == 48 and d["n_test"] == 24 and d["method"] == "mocov3"
    for name in ("linear", "knn"):
        assert 0.0 <= d["probes"][name]["top1"] <= d["probes"][name]["top5"] <= 1.0
    scores = d["probes"]["equivariance"]["scores"]
    assert set(scores) == {"rot90", "hflip", "scale"}
    assert all(len(v) == 3 and all(-1.0 <= s <= 1.0 for s in v) for v in scores.values())
    assert not list(tmp_path.glob(".probe.json.*"))  # no temporary file left behind
    # the baselines stand beside the trained numbers
    for row in ("linear top1 / top5, random-init encoder", "k-NN top1 / top5, raw pixels",
                "equivariance (centred) rot90, random-init encoder"):
        assert row in text
    base = d["probes"]["baselines"]
    assert 0.0 <= base["raw_pixels"]["knn"]["top1"] <= 1.0
    assert len(base["random_init"]["equivariance"]["centred"]["rot90"]) == 3


def test_resume_refuses_a_changed_config(pretrained, capsys):
    rc = main(["pretrain", "--method", "mocov3", "--ser", "--ser-weight", "0.7", "--ratio",
               "0.5", "--out", str(pretrained), "--resume", *TINY, "--lr", "0.01"])
    assert rc == 2
    err = _one_error_line(capsys)
    assert err.startswith("equivision pretrain: error:") and "config.lr" in err


def test_existing_run_without_resume_is_refused(pretrained, capsys):
    before = (pretrained / "last.pt").stat().st_mtime_ns
    assert main(["pretrain", "--method", "mocov3", "--out", str(pretrained), *TINY]) == 2
    assert "--resume" in _one_error_line(capsys)
    assert (pretrained / "last.pt").stat().st_mtime_ns == before


@pytest.mark.parametrize("argv, needle", [
    (["--image-size", "18"], "not a multiple of --patch-size 4"),
    (["--ser-weight", "2"], "need --ser"),
    (["--ser", "--ratio", "0"], "--ratio > 0"),
    (["--local-crops", "2", "--local-size", "6"], "--local-size 6 is not a multiple"),
])
def test_bad_pretrain_options_give_one_line(tmp_path, capsys, argv, needle):
    rc = main(["pretrain", "--method", "dino", "--out", str(tmp_path / "x"), *TINY, *argv])
    assert rc == 2
    assert needle in _one_error_line(capsys)
    assert not (tmp_path / "x").exists()


def test_probe_errors(tmp_path, capsys):
    assert main(["probe", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "no checkpoint" in _one_error_line(capsys)
    assert main(["probe", "--checkpoint", str(tmp_path), "--probes", "linear,magic"]) == 2
    assert "magic" in _one_error_line(capsys)


@pytest.mark.parametrize("name, kwargs", [
    ("mocov3", {"proj_dim": 8, "hidden": 16}),
    ("dino", {"out_dim": 12, "hidden": 16, "bottleneck": 8}),
    ("barlow", {"proj_dim": 8, "hidden": 16, "lambd": 0.01}),
])
def test_methods_record_their_kwargs(name, kwargs):
    enc = SSLViT(image_size=8, patch_size=4, dim=8, depth=2, heads=1, cls_layer=1)
    method = build_method(name, enc, **kwargs)
    assert kwargs.items() <= method.method_kwargs.items()
    twin = build_method(name, SSLViT(image_size=8, patch_size=4, dim=8, depth=2, heads=1,
                                     cls_layer=1), **method.method_kwargs)
    assert twin.method_kwargs == method.method_kwargs
    assert [p.shape for p in twin.parameters()] == [p.shape for p in method.parameters()]


def test_section_ser_tiny(tmp_path):
    from equivision.demo import DemoContext
    from equivision.ssl.baselines import random_init_like
    from equivision.ssl.demo import SERDemoSizes, section_ser

    sizes = SERDemoSizes(image_size=8, patch_size=4, dim=16, depth=2, heads=2, cls_layer=1,
                         images=32, epochs=1, batch_size=16, probe_train=40, probe_test=20,
                         probe_steps=20, eq_images=8)
    ctx = DemoContext(out=tmp_path, device="cpu", progress=False)
    text = section_ser(ctx, sizes)
    # in-domain: SER beside the lambda = 0 control and both baselines (issue 15; the
    # pretrained baseline row was "MoCo-v3", a run without any SER config)
    for row in ("| MoCo-v3 (lambda = 0 control) |", "| MoCo-v3 + SER |",
                "| random init (no pretraining) |", "| raw pixels |"):
        assert row in text
    assert "Pretrained under" in text and "in-domain" in text
    runs = sorted(p.name for p in (tmp_path / "ser-demo").iterdir())
    assert len(runs) == 2 and runs[0].endswith("-control") and runs[1].endswith("-ser")
    res = ctx.artifacts["ser"]["results"]
    control, ser = res["MoCo-v3 (lambda = 0 control)"], res["MoCo-v3 + SER"]
    # the control computes and reports the SER term but does not train on it
    assert math.isfinite(control["loss_equiv"]) and control["loss_equiv"] > 0
    assert math.isfinite(ser["loss_equiv"]) and ser["loss_equiv"] > 0
    assert res["raw pixels"]["equivariance"] is None
    for r in res.values():
        assert 0.0 <= r["linear"]["top1"] <= 1.0 and 0.0 <= r["knn"]["top1"] <= 1.0
    # the random-init row is the encoder both runs start from
    start = random_init_like(SSLViT(image_size=8, patch_size=4, dim=16, depth=2, heads=2,
                                    cls_layer=1), seed=0)
    torch.manual_seed(0)
    assert torch.equal(start.pos_embed, SSLViT(image_size=8, patch_size=4, dim=16, depth=2,
                                               heads=2, cls_layer=1).pos_embed)
    # a second run reuses both checkpoints and gives the same numbers
    again = section_ser(ctx, sizes)
    assert "Reused the cached checkpoints" in again
    res2 = ctx.artifacts["ser"]["results"]
    for name in res:
        assert res2[name]["knn"] == res[name]["knn"]


def test_default_baseline_is_the_lambda_zero_control():
    """Without --ser the run keeps SER's views and ratio with lambda = 0 (the control that
    isolates SER); --plain is the base method without equivariant views."""
    from equivision.cli.main import make_parser
    from equivision.cli.ssl import _ser_config
    from equivision.ssl import SERConfig

    parser = make_parser()
    base = ["pretrain", "--method", "mocov3", "--out", "unused"]
    control = _ser_config(parser.parse_args(base))
    assert control is not None and control.weight == 0.0
    assert SERConfig.default_ratio(control) == SERConfig.default_ratio(
        _ser_config(parser.parse_args(base + ["--ser"])))
    assert _ser_config(parser.parse_args(base + ["--plain"])) is None
    with pytest.raises(CLIError, match="exclude each other"):
        _ser_config(parser.parse_args(base + ["--plain", "--ser"]))


def test_pretrain_knn_every_writes_the_online_curve_across_a_resume(tmp_path, capsys):
    run = tmp_path / "knn"
    argv = ["pretrain", "--method", "mocov3", "--out", str(run), "--knn-every", "1",
            "--knn-images", "12", *TINY, "--warmup-epochs", "1"]
    assert main(argv) == 0
    assert "online 20-NN top-1 on 12 held-out images" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="stretched"):  # the later --epochs wins
        assert main([*argv, "--epochs", "2", "--resume"]) == 0
    rows = (run / "knn.csv").read_text().split()
    assert rows[0] == "step,knn_top1"
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3, 4]  # 2 steps per epoch
    assert all(0.0 <= float(r.split(",")[1]) <= 1.0 for r in rows[1:])


def test_pretrain_local_crops_reach_the_views(tmp_path):
    run = tmp_path / "multicrop"
    assert main(["pretrain", "--method", "dino", "--ser", "--out", str(run), *TINY,
                 "--method-args", "out_dim=16,hidden=16,bottleneck=8", "--local-crops", "2",
                 "--local-size", "8"]) == 0
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["config"]["local_crops"] == 2 and ckpt["config"]["local_size"] == 8
    assert math.isfinite(ckpt["history"]["loss"][-1])


def test_pretrain_and_probe_a_folder_of_images_of_many_sizes(tmp_path, capsys):
    """A user's class-per-folder images, each of its own size and mode (RGB, grey,
    palette): read at the encoder's size by pretrain and probe. The probe's default
    table has no equivariance rows (that probe did not run), not even the baseline's."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "pics" / cls).mkdir(parents=True)
        for i in range(14):
            h, w = (int(v) for v in rng.integers(10, 40, 2))
            im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            im.convert(("RGB", "L", "P")[i % 3]).save(tmp_path / "pics" / cls / f"{i}.png")
    run = tmp_path / "run"
    assert main(["pretrain", "--method", "mocov3", "--data", str(tmp_path / "pics"),
                 "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    assert main(["probe", "--checkpoint", str(run), "--data", str(tmp_path / "pics"),
                 "--steps", "5", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "linear top1 / top5, raw pixels" in text and "equivariance" not in text
