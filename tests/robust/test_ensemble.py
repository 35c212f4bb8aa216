"""The AutoAttack-style ensemble: per-image AND over stages, versions, segmentation."""

import pytest
import torch
from conftest import accuracy, seg_batch, segmenter
from torch import Tensor, nn

from equivision.models import create_model
from equivision.robust.apgd import APGD
from equivision.robust.defenses import EquivarianceDefense, RandomNoiseDefense, default_transforms
from equivision.robust.ensemble import AutoAttackEnsemble

pytestmark = pytest.mark.usefixtures("one_thread")


class TwoPixel(nn.Module):
    """Logits ``(x[:, 0], x[:, 1], 0)`` of images ``(B, 3, 1, 1)``; channel 2 holds an id."""

    def forward(self, x: Tensor) -> Tensor:
        z = x.flatten(1)
        return torch.stack([z[:, 0], z[:, 1], torch.zeros_like(z[:, 0])], 1)


class SwapSome:
    """A stand-in attack that fools exactly the images whose id is in ``ids`` and records
    the ids it was given."""

    def __init__(self, ids: set[int]) -> None:
        self.ids, self.seen = ids, []

    def __call__(self, x: Tensor, labels: Tensor) -> Tensor:
        ids = (x[:, 2, 0, 0] * 100).round().long().tolist()
        self.seen.append(ids)
        out = x.clone()
        hit = torch.tensor([i in self.ids for i in ids])
        out[hit, 0], out[hit, 1] = x[hit, 1], x[hit, 0]
        return out


def id_images(n: int = 10) -> tuple[Tensor, Tensor]:
    x = torch.zeros(n, 3, 1, 1)
    x[:, 0], x[:, 1] = 0.6, 0.4
    x[:, 2, 0, 0] = torch.arange(n) / 100
    return x, torch.zeros(n, dtype=torch.long)


def test_worst_case_is_the_and_over_stages():
    x, y = id_images()
    stages = [SwapSome({1, 2}), SwapSome({2, 3, 4}), SwapSome({7})]
    ens = AutoAttackEnsemble(TwoPixel(), 0.5, attacks=[(f"s{i}", a) for i, a in
                                                       enumerate(stages)])
    result = ens(x, y)
    fooled = {1, 2, 3, 4, 7}
    assert result.robust.tolist() == [i not in fooled for i in range(10)]
    assert stages[1].seen == [[0, 3, 4, 5, 6, 7, 8, 9]]  # only the images still correct
    assert stages[2].seen == [[0, 5, 6, 7, 8, 9]]
    assert [s.robust for s in result.stages] == [1.0, 0.8, 0.6, 0.5]
    assert [s.attacked for s in result.stages] == [0, 10, 8, 6]
    assert result.worst_stage.tolist() == [0, 1, 1, 2, 2, 0, 0, 3, 0, 0]
    assert result.robust_accuracy() == 0.5
    assert torch.equal(result.predictions != 0, ~result.robust)
    assert "s2" in result.summary()
    rows = result.records()
    assert len(rows) == 10 and rows[3] == {"index": 3, "score": 0.0, "robust": False,
                                           "worst_stage": "s1", "score_clean": 1.0,
                                           "score_s0": 1.0, "score_s1": 0.0, "score_s2": 0.0}
    assert rows[0]["worst_stage"] == "clean" and rows[0]["robust"]


def test_clean_errors_are_not_attacked():
    x, y = id_images(4)
    y[1] = 1  # wrong label: misclassified already
    stage = SwapSome(set())
    result = AutoAttackEnsemble(TwoPixel(), 0.5, attacks=[("none", stage)])(x, y)
    assert stage.seen == [[0, 2, 3]]
    assert result.robust.tolist() == [True, False, True, True]


def test_standard_ensemble_beats_each_stage(trained):
    model, x, y = trained
    ens = AutoAttackEnsemble(model, 0.12, steps=10, n_targets=2, queries=50)
    assert [name for name, _ in ens.attacks] == ["apgd-ce", "apgd-t", "square"]
    result = ens(x, y)
    apgd = accuracy(model, APGD(model, 0.12, steps=10)(x, y), y)
    assert result.robust_accuracy() <= apgd
    assert accuracy(model, result.images, y) == result.robust_accuracy()
    assert (result.images - x).abs().max() <= 0.12 + 1e-6
    scores = [s.robust for s in result.stages]
    assert scores == sorted(scores, reverse=True)


def test_l2_ensemble_stays_in_the_ball(trained):
    model, x, y = trained
    result = AutoAttackEnsemble(model, 1.0, norm="l2", steps=5, n_targets=1, queries=20)(x, y)
    assert [s.name for s in result.stages] == ["clean", "apgd-ce", "apgd-t", "square"]
    assert bool(((result.images - x).flatten(1).norm(dim=1) <= 1.0 + 1e-4).all())
    assert result.robust_accuracy() < accuracy(model, x, y)


def test_rand_version_uses_eot_and_restarts():
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 4)).eval()
    defense = RandomNoiseDefense(model)
    ens = AutoAttackEnsemble(defense, 0.1, version="rand", steps=3, eot_samples=2,
                             through="bpda", eval_draws=2)
    assert [name for name, _ in ens.attacks] == ["apgd-ce", "apgd-dlr"]
    assert all(a.eot_samples == 2 and a.restarts == 2 for _, a in ens.attacks)
    x = torch.rand(4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    result = ens(x, torch.tensor([0, 1, 2, 3]))
    again = ens(x, torch.tensor([0, 1, 2, 3]))
    assert torch.equal(result.images, again.images)
    assert result.score.shape == (4,)


def test_seg_version_reports_miou():
    model = segmenter()
    x, labels = seg_batch(model)
    result = AutoAttackEnsemble(model, 0.1, version="seg", steps=5, n_targets=2,
                                queries=20)(x, labels)
    assert [s.name for s in result.stages] == ["clean", "apgd-ce", "apgd-segpgd", "apgd-t",
                                               "square"]
    assert result.segmentation and result.stages[0].robust == 1.0
    assert result.robust_accuracy() < 1.0
    assert 0.0 <= result.dataset_miou() < 1.0 and 0.0 <= result.pixel_accuracy() < 1.0
    assert "dataset mIoU" in result.summary()


def test_bad_settings():
    with pytest.raises(ValueError, match="version"):
        AutoAttackEnsemble(nn.Linear(2, 3), 0.1, version="plus")
    with pytest.raises(ValueError, match="eval_draws"):
        AutoAttackEnsemble(nn.Linear(2, 3), 0.1, eval_draws=0)


def test_ensemble_leaves_a_training_model_as_found(trained):
    _, x, y = trained
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 5))
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    AutoAttackEnsemble(model, 0.1, steps=2, n_targets=1, queries=5)(x, y)
    assert model.training and model[2].training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("through", ["bpda", "full", "model"])
def test_ensemble_through_an_equivariance_defense(through):
    torch.manual_seed(0)
    model = create_model("cnn-small", in_channels=1, num_classes=5, width=4).eval()
    defense = EquivarianceDefense(model, eps_v=0.03, steps=2, noise=0.5, seed=0,
                                  transforms=default_transforms(1, 4),
                                  feature_layer="features.relu2")
    x = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    ens = AutoAttackEnsemble(defense, 0.05, version="rand", steps=2, eot_samples=2,
                             restarts=1, through=through,
                             lambda_e=1.0 if through == "model" else 0.0)
    result = ens(x, y)
    assert result.score.shape == (2,) and (result.images - x).abs().max() <= 0.05 + 1e-6
    assert [s.attacked for s in result.stages][1] == int((result.stages[0].score > 0).sum())
