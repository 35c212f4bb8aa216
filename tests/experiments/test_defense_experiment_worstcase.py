"""The defense experiment's per-image worst case (support.cascade, support.worstcase) and
its view-matched training augmentation (support.view_augment), at tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from defense import Ctx
from support.cascade import clean_draws, run_cascade
from support.view_augment import ViewAugment
from support.worstcase import (
    WORST_QUICK,
    _interval,
    build_stages,
    merge_parts,
    paired_counts,
    paired_markdown,
    paired_scores,
    worstcase,
    worstcase_markdown,
)
from torch import Tensor, nn

from equivision.data import ImageDataset
from equivision.metrics import miou_from_confusion
from equivision.models import create_model
from equivision.robust import train_contrastive_head, train_rotation_head
from equivision.robust.registry import build_defense, save_head


def test_segmentation_interval_is_the_library_bootstrap_of_the_mean() -> None:
    lo, hi = _interval([0.1, 0.5, 0.9, 0.3, 0.7] * 4, seg=True)
    assert lo < 0.5 < hi and lo > 0.2 and hi < 0.8
    lo, hi = _interval([1.0] * 5 + [0.0] * 5, seg=False)  # Wilson, 5 of 10
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)


def test_view_augment_shapes_and_range() -> None:
    torch.manual_seed(0)
    aug = ViewAugment(p_resize=1.0)
    sizes = set()
    for _ in range(6):
        out = aug(torch.rand(3, 1, 20, 20))
        assert out.shape[:2] == (3, 1) and out.shape[2] == out.shape[3]
        assert float(out.min()) >= 0 and float(out.max()) <= 1
        sizes.add(out.shape[-1])
    assert len(sizes) > 1 and min(sizes) >= 6 and max(sizes) <= 40
    torch.manual_seed(1)
    a = ViewAugment(p_resize=0.0)(torch.rand(2, 1, 12, 12))
    assert a.shape == (2, 1, 12, 12)
    with pytest.raises(ValueError, match="min_scale"):
        ViewAugment(min_scale=2.0, max_scale=1.0)


class _Flip(nn.Module):
    """A 2-class 'model' that is right exactly when the mean pixel is below 0.5 for
    label 0: a cascade stage that pushes images over 0.5 breaks it."""

    def forward(self, x: Tensor) -> Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([0.5 - m, m - 0.5], 1) * 10


def test_cascade_worst_case_is_per_image() -> None:
    x = torch.full((4, 1, 4, 4), 0.3)
    y = torch.zeros(4, dtype=torch.long)

    def break_first_two(xb: Tensor, yb: Tensor) -> Tensor:
        out = xb.clone()
        out[:2] = 0.9  # ignores the eps ball on purpose: the cascade only merges
        return out

    def break_last(xb: Tensor, yb: Tensor) -> Tensor:
        out = xb.clone()
        out[-1] = 0.9
        return out

    res = run_cascade(_Flip(), [("a", break_first_two), ("b", break_last)], x, y, block=4)
    # a breaks images 0 and 1; b attacks only the images still right (2, 3) and breaks the
    # last of them; image 2 survives both (its worst case is the clean image)
    assert res["score"] == [0.0, 0.0, 1.0, 0.0]
    assert res["broken"] == {"clean": 1, "a": 2, "b": 1}
    assert res["after"] == [1.0, 0.5, 0.25]
    assert [r["index"] for r in res["records"]] == [0, 1, 2, 3]
    # a per-row minimum would say 0.5 (each attack alone leaves two or three images right)
    blocks = run_cascade(_Flip(), [("a", break_first_two)], x, y, block=2)
    assert blocks["score"] == [0.0, 0.0, 0.0, 0.0]  # a breaks the first two of each block


def _tiny() -> tuple[nn.Module, ImageDataset]:
    torch.manual_seed(0)
    model = create_model("cnn-small", in_channels=1, width=4).eval()
    x = torch.rand(6, 1, 12, 12)
    with torch.no_grad():
        y = model(x).argmax(1)  # the model is right on every clean image
    return model, ImageDataset(x, y, [str(i) for i in range(10)], "tiny")


def test_clean_draws_worst_case_of_randomized_defense() -> None:
    model, data = _tiny()
    x, y = data.images, data.labels
    defense = build_defense("random", model, eps_v=0.3, steps=1)
    s = clean_draws(defense, x, y, draws=3, seed=0)
    assert s.shape == (3, 6)
    assert torch.equal(clean_draws(defense, x, y, draws=3, seed=0), s)  # seeded
    assert torch.equal(clean_draws(model, x, y, draws=1, seed=0)[0], torch.ones(6,
                                                                                 dtype=s.dtype))


class _Ctx:
    def __init__(self, model: nn.Module, data: ImageDataset, out: Path) -> None:
        self._model, self._data, self.out = model, data, out
        self.tasks: dict[str, Any] = {"cls": {"feature_layer": "features.relu3"}}

    def model(self, task: str, seed: int = 0) -> nn.Module:
        return self._model

    def data(self, task: str, split: str) -> ImageDataset:
        return self._data

    def eps(self, task: str) -> float:
        return 0.1

    def eps_v(self, task: str) -> float:
        return 0.15

    defense_kwargs = Ctx.defense_kwargs  # the real one: it reads the stand-ins above


def test_stages_of_each_column() -> None:
    model, _ = _tiny()
    st = WORST_QUICK
    names = [n for n, _ in build_stages("cls", model, None, 0.1, st, None)]
    assert names == ["PGD", "MIM", "CW", "APGD-CE", "APGD-T", "Square"]
    eq = build_defense("equivariance", model, eps_v=0.15, steps=1,
                       feature_layer="features.relu3")
    names = [n for n, _ in build_stages("cls", model, eq, 0.1, st, "equivariance")]
    assert names[:3] == ["PGD (transfer)", "MIM (transfer)", "CW (transfer)"]
    assert names[3].startswith("Adaptive") and names[4].startswith("BPDA+EOT 2x2")
    assert "convergence" in names[5]
    rnd = build_defense("random", model, eps_v=0.15, steps=1)
    assert not any(n.startswith("Adaptive") for n, _ in
                   build_stages("cls", model, rnd, 0.1, st, "random"))


class _HeadCtx(_Ctx):
    """A context whose heads are trained on first use, as ``defense.Ctx.head`` does."""

    def head(self, task: str, kind: str) -> Path:
        path = self.out / f"{task}-{kind}-head.pt"
        if not path.exists():
            trainer = train_rotation_head if kind == "rotation" else train_contrastive_head
            save_head(path, trainer(self._model, "features.relu3", self._data, epochs=1),
                      "features.relu3")
        return path


def test_head_columns_are_attacked_through_their_own_loss(tmp_path: Path) -> None:
    model, data = _tiny()
    ctx = _HeadCtx(model, data, tmp_path)
    st = {**WORST_QUICK, "defense_steps": 1, "n": 2, "clean_n": 2, "undefended_n": 2}
    out = worstcase(ctx, st, (0,), ("Rotation", "Contrastive"), ("cls",))["cls-seed0"]
    assert list(out) == ["Rotation", "Contrastive"]
    for col in out.values():
        stages = col["cascade"]["stages"]
        # the adaptive sweep attacks the head's loss; the noise baseline has none to attack
        assert any(s.startswith("Adaptive") for s in stages)
        assert len(col["cascade"]["records"]) == 2
    assert (tmp_path / "cls-rotation-head.pt").exists()
    assert (tmp_path / "cls-contrastive-head.pt").exists()


def test_worstcase_writes_per_image_results_and_resumes(tmp_path: Path) -> None:
    model, data = _tiny()
    ctx = _Ctx(model, data, tmp_path)
    st = {**WORST_QUICK, "defense_steps": 1}
    out = worstcase(ctx, st, (0,), ("Vanilla", "Random"), ("cls",))
    cols = out["cls-seed0"]
    assert set(cols) == {"Vanilla", "Random"}
    van = cols["Vanilla"]
    assert van["clean"]["single"] == 1.0 and van["draws"] == 1
    assert cols["Random"]["draws"] == st["repeats"]
    casc = cols["Random"]["cascade"]
    assert len(casc["records"]) == st["n"] and casc["n"] == st["n"]
    assert casc["score"] == [r["score"] for r in casc["records"]]
    lo, hi = casc["score_ci"]
    assert 0.0 <= lo <= sum(casc["score"]) / casc["n"] <= hi <= 1.0
    saved = {f.name for f in (tmp_path / "worstcase-cls-seed0").iterdir()}
    assert saved == {"Vanilla.json", "Random.json"}
    assert json.loads((tmp_path / "worstcase-cls-seed0" / "Random.json").read_text())[
        "column"] == "Random"
    md = worstcase_markdown(out)
    assert "per-image worst case" in md and "after BPDA+EOT 2x2" in md
    # a second call with the same settings reuses the saved columns
    again = worstcase(ctx, st, (0,), ("Vanilla",), ("cls",))
    assert again["cls-seed0"]["Vanilla"]["cascade"]["seconds"] == van["cascade"]["seconds"]


def test_segmentation_cascade_reports_dataset_miou() -> None:
    torch.manual_seed(0)
    model = create_model("segmenter", in_channels=3, num_classes=3, width=2).eval()
    x = torch.rand(3, 3, 8, 8)
    y = torch.randint(0, 3, (3, 8, 8))
    y[0, 0, 0] = 255  # an ignored pixel
    names = [n for n, _ in build_stages("seg", model, None, 0.05, WORST_QUICK, None)]
    assert names == ["PGD", "MIM", "Houdini", "APGD-CE", "APGD-SegPGD"]
    stages = build_stages("seg", model, None, 0.05, WORST_QUICK, None)[:1]
    res = run_cascade(model, stages, x, y, block=2)
    assert 0.0 <= res["miou"] <= 1.0 and 0.0 <= res["pixel_accuracy"] <= 1.0
    # its confusion (saved so that slices can be joined) gives those figures; the ignored
    # pixel is left out
    conf = torch.tensor(res["confusion"])
    assert int(conf.sum()) == 3 * 64 - 1
    assert res["miou"] == pytest.approx(miou_from_confusion(conf))
    assert len(res["score"]) == 3 and res["after"][1] <= res["after"][0]
    cols = {"Vanilla": {"clean": {"n": 3, "single": 0.5, "single_ci": [0.4, 0.6],
                                  "worst": 0.5, "worst_ci": [0.4, 0.6]}, "cascade":
                        {**res, "score_ci": [0.0, 1.0]}}}
    assert "dataset mIoU" in worstcase_markdown({"seg-seed0": cols})


def test_merge_parts_joins_slices_per_image() -> None:
    def part(scores: list[float], after_a: list[float], off: int) -> dict[str, Any]:
        recs = [{"index": off + i, "score": s, "score_clean": 1.0, "score_a": a,
                 "worst_stage": "a" if s == 0 else "clean"}
                for i, (s, a) in enumerate(zip(scores, after_a))]
        casc = {"stages": ["clean", "a"], "records": recs, "score": scores, "n": len(scores),
                "seconds": 1.0, "after": [1.0, sum(after_a) / len(after_a)],
                "broken": {"clean": scores.count(1.0), "a": scores.count(0.0)},
                "score_ci": [0.0, 1.0]}
        return {"clean": {"n": 9}, "cascade": casc, "offset": off, "seg": False}

    cols = {"Eq": part([1.0, 0.0], [1.0, 0.0], 0), "Eq@2": part([0.0, 0.0], [0.0, 0.0], 2),
            "Van": part([0.0], [0.0], 0)}
    out = merge_parts(cols)
    assert set(out) == {"Eq", "Van"}
    c = out["Eq"]["cascade"]
    assert c["n"] == 4 and c["score"] == [1.0, 0.0, 0.0, 0.0]
    assert c["after"] == [1.0, 0.25] and c["broken"] == {"clean": 1, "a": 3}
    assert [r["index"] for r in c["records"]] == [0, 1, 2, 3]
    assert out["Eq"]["clean"] == {"n": 9}
    assert cols["Eq"]["cascade"]["n"] == 2  # the inputs are left alone


def test_merge_parts_joins_segmentation_confusions() -> None:
    """The joined dataset mIoU comes from the summed confusions of the slices, not from
    the first slice; a slice without its confusion makes it unknown, not guessed."""
    def part(conf: list[list[int]] | None, off: int) -> dict[str, Any]:
        recs = [{"index": off, "score": 0.5, "score_clean": 0.9, "score_a": 0.5,
                 "worst_stage": "a"}]
        casc = {"stages": ["clean", "a"], "records": recs, "score": [0.5], "n": 1,
                "seconds": 1.0, "after": [0.9, 0.5], "broken": {"clean": 0, "a": 1},
                "score_ci": [0.5, 0.5], "miou": 0.123, "pixel_accuracy": 0.456}
        if conf is not None:
            casc["confusion"] = conf
        return {"clean": {"n": 1}, "cascade": casc, "seg": True}

    a, b = [[3, 1], [0, 0]], [[0, 0], [2, 4]]
    c = merge_parts({"Eq": part(a, 0), "Eq@1": part(b, 1)})["Eq"]["cascade"]
    total = torch.tensor(a) + torch.tensor(b)
    assert c["confusion"] == total.tolist()
    assert c["miou"] == pytest.approx(miou_from_confusion(total))
    assert c["pixel_accuracy"] == pytest.approx(7 / 10)
    old = merge_parts({"Eq": part(a, 0), "Eq@1": part(None, 1), "Eq@2": part(b, 2)})
    assert old["Eq"]["cascade"]["miou"] is None  # and stays unknown after a third slice
    assert "- (a joined slice saved no confusion)" in worstcase_markdown({"seg-seed0": old})


def test_paired_segmentation_columns_compare_per_image_miou() -> None:
    def col(scores: list[float], first: int) -> dict[str, Any]:
        recs = [{"index": first + i, "score": v, "score_clean": 0.8}
                for i, v in enumerate(scores)]
        return {"cascade": {"records": recs}, "seg": True}

    eq, van = col([0.3, 0.2, 0.25, 0.1], 0), col([0.1, 0.1, 0.3, 0.1, 0.05], 0)
    ps = paired_scores(eq, van)
    assert ps["n"] == 4 and ps["a_higher"] == 2 and ps["b_higher"] == 1
    assert ps["diff"] == pytest.approx((0.2 + 0.1 - 0.05 + 0.0) / 4)
    assert ps["diff_ci"][0] <= ps["diff"] <= ps["diff_ci"][1] and ps["p"] == 1.0
    md = paired_markdown({"Vanilla": van, "Equivariance": eq})
    assert "| Vanilla vs Equivariance | 4 | 80.0 / 80.0 | -6.2 [" in md
    assert "2 / 1" not in md and "| 1 / 2 |" in md


def _col(kept: list[bool], clean: list[bool], first: int = 0) -> dict[str, Any]:
    recs = [{"index": first + i, "score": float(k), "score_clean": float(c)}
            for i, (k, c) in enumerate(zip(kept, clean))]
    return {"cascade": {"records": recs}, "seg": False}


def test_paired_counts_compare_the_common_images() -> None:
    a = _col([True, True, False, True, False], [True] * 5)
    b = _col([False, True, True], [True, False, True], first=2)  # images 2, 3, 4
    pc = paired_counts(a, b)
    # on images 2..4: a keeps 3, b keeps 3 and 4 -> a only: none, b only: image 4
    assert pc["n"] == 3 and pc["a_only"] == 0 and pc["b_only"] == 1 and pc["both"] == 1
    assert pc["a_clean"] == 3 and pc["b_clean"] == 2
    assert pc["p"] == 1.0  # one discordant image: no evidence
    many = paired_counts(_col([True] * 12, [True] * 12), _col([False] * 12, [True] * 12))
    assert many["a_only"] == 12 and many["p"] < 0.001  # 12 of 12 discordant one way
    md = worstcase_markdown({"cls-seed0": {
        "A": {"clean": {"n": 5, "single": 1.0, "single_ci": [0.5, 1.0], "worst": 1.0,
                        "worst_ci": [0.5, 1.0]},
              "cascade": {"stages": ["clean"], "after": [1.0], "broken": {"clean": 3},
                          "score": [1.0, 1.0, 0.0, 1.0, 0.0], "n": 5, "score_ci": [0, 1],
                          **a["cascade"]}},
        "B": {"clean": {"n": 0, "draws": 4},  # an offset slice: no clean cost of its own
              "cascade": {"stages": ["clean"], "after": [0.67], "broken": {"clean": 2},
                          "score": [0.0, 1.0, 1.0], "n": 3, "score_ci": [0, 1],
                          **b["cascade"]}}}})
    assert "| A vs B | 3 | 3 / 2 | 0 | 1 | 1 | 1 |" in md
    assert "| clean, one prediction | 100.0 [50.0, 100.0] | - |" in md


def test_offset_slice_skips_the_clean_cost(tmp_path: Path) -> None:
    model, data = _tiny()
    ctx = _Ctx(model, data, tmp_path)
    st = {**WORST_QUICK, "defense_steps": 1, "n": 2, "offset": 2}
    out = worstcase(ctx, st, (0,), ("Random",), ("cls",))
    col = out["cls-seed0"]["Random"]
    assert col["clean"]["n"] == 0 and "single" not in col["clean"]
    assert [r["index"] for r in col["cascade"]["records"]] == [2, 3]
