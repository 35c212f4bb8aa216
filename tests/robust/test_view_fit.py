"""Views the model can take, the last spatial map as the default feature layer, and the
refusal of vector features by the equivariance defense (issue 14, bug 5)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from equivision.models import create_model
from equivision.robust import EquivarianceDefense, evaluate_robustness
from equivision.robust.defenses import default_transforms, equivariance_score
from equivision.robust.view_fit import check_views, fitting_views, min_input_size, parse_views
from equivision.robust.views import FeatureExtractor, last_spatial_layer
from equivision.transforms import Resize, hflip

pytestmark = pytest.mark.usefixtures("one_thread")


class NeedsSixteen(nn.Module):
    """Written the way others write models: functional ops, a size check that raises,
    in-place ReLU, a global pool; takes images of at least 16 px."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if min(x.shape[-2:]) < 16:
            raise ValueError(f"NeedsSixteen needs 16 px, got {tuple(x.shape[-2:])}")
        x = self.act(self.conv1(x))
        x = F.max_pool2d(x, 2)
        x = self.act(self.conv2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.fixture(scope="module")
def needs16():
    torch.manual_seed(0)
    return NeedsSixteen().eval()


def test_min_input_size_by_trying(needs16):
    assert min_input_size(needs16, torch.rand(1, 1, 20, 20)) == 16
    assert min_input_size(needs16, torch.rand(1, 1, 12, 12)) == 13  # takes none


def test_fitting_views_drop_or_replace_shrinking_resizes(needs16):
    x = torch.rand(2, 1, 20, 20)
    views = fitting_views(needs16, default_transforms(1), x)
    shrink = [g for g in views if isinstance(g, Resize) and g.factor < 1]
    # 0.3x and 0.6x (6 and 12 px) do not fit: one replacement that reaches 16 px
    assert len(shrink) == 1 and shrink[0].apply_image(x).shape[-1] == 16
    assert {repr(g) for g in views} >= {"resize(1.4)", "resize(2)", "hflip"}
    with pytest.raises(ValueError, match="takes none of the views"):
        fitting_views(needs16, [Resize(0.3)], torch.rand(1, 1, 16, 16))


def test_a_view_the_model_cannot_take_is_one_clear_error(needs16):
    x = torch.rand(2, 1, 20, 20)
    with pytest.raises(ValueError, match=r"cannot take the view resize\(0.5\).*10x10.*"
                                         r"minimum input size is 16 px"):
        check_views(needs16, [hflip(), Resize(0.5)], x)
    d = EquivarianceDefense(needs16, steps=1, transforms="resize:0.5,hflip")
    with pytest.raises(ValueError, match="minimum input size is 16 px"):
        d.purify(x)
    data = TensorDataset(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"resize\(0.6\)"):
        evaluate_robustness(needs16, data, [], score_transforms=[Resize(0.6)], checks="none")


def test_default_layer_is_the_last_spatial_map(needs16):
    x = torch.rand(2, 1, 20, 20)
    # the shared in-place ReLU is captured at its first call (after conv1): the last map
    # a name can capture is conv2's
    assert last_spatial_layer(needs16, x) == "conv2"
    ext = FeatureExtractor(needs16, "auto")
    assert ext(x).shape == (2, 4, 7, 7) and ext.feature_layer == "conv2"
    cnn = create_model("cnn-small", in_channels=1, num_classes=3, width=4).eval()
    assert last_spatial_layer(cnn, torch.rand(1, 1, 12, 12)) == "features"
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with pytest.raises(ValueError, match="no submodule that returns a spatial map"):
        last_spatial_layer(mlp, torch.rand(1, 1, 4, 4))
    assert FeatureExtractor(mlp, "auto").resolve(torch.rand(1, 1, 4, 4)) == "output"


def test_defense_defaults_fit_and_use_the_last_map(needs16):
    x = torch.rand(2, 1, 20, 20)
    d = EquivarianceDefense(needs16, steps=1, noise=0.0)
    out = d.purify(x)
    assert out.shape == x.shape and d.feature_layer == "conv2"
    assert all(g.apply_image(x).shape[-1] >= 16 for g in d.transforms)
    s = equivariance_score(needs16, x)
    assert s.shape == (2,) and bool((s <= 1).all())


def test_evaluate_records_the_resolved_layer_and_views(needs16):
    x = torch.rand(4, 1, 20, 20)
    data = TensorDataset(x, torch.tensor([0, 1, 2, 0]))
    res = evaluate_robustness(needs16, data, [], "equivariance", checks="none",
                              defense_kwargs={"steps": 1})
    assert res.meta["feature_layer"] == "conv2"
    assert "resize(0.3)" not in res.meta["score_views"]
    with pytest.raises(ValueError, match="gives vectors"):
        evaluate_robustness(needs16, data, [], "equivariance", checks="none",
                            defense_kwargs={"steps": 1, "feature_layer": "logits"})
    res = evaluate_robustness(needs16, data, [], "invariance", checks="none",
                              defense_kwargs={"steps": 1, "feature_layer": "logits"})
    assert res.meta["feature_layer"] == "logits"


def test_views_spec_reads_resizes_and_the_transformation_grammar():
    views = parse_views("resize:1.4, rot90:1,3 resize:0.5,hflip")
    assert [repr(g) for g in views][:1] == ["resize(1.4)"]
    assert [repr(g) for g in views][-2:] == ["resize(0.5)", "hflip"] and len(views) == 5
    assert parse_views([Resize(2.0), "hflip"])[1] == hflip()
    with pytest.raises(ValueError, match="resize takes a factor"):
        parse_views("resize:big")
    with pytest.raises(ValueError, match="resize takes a factor"):
        parse_views("resize:-1")
    with pytest.raises(ValueError, match="no view given"):
        parse_views(" , ")
    with pytest.raises(ValueError, match="unknown transformation"):
        parse_views("resize:2,rotat:3")
