"""Bad input to the group layers, the exactness analyzer and export: an input size the
model cannot take, a model the tracer cannot run, a group the layer does not know. Each
gives one line naming the layer (or model) and what to do."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from equivision.gcnn import (
    GroupBatchNorm2d,
    GroupConv2d,
    P4ConvP4,
    P4ConvZ2,
    analyze_exactness,
    analyze_translation,
    empirical_equivariance_error,
    export,
    restrict,
)
from equivision.gcnn.exactness import TraceError
from equivision.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text.strip() == text, text
    return text


# ---- an input size the model cannot take ----------------------------------------------------
def test_too_small_for_a_layer_names_the_layer():
    net = nn.Sequential(P4ConvZ2(1, 2, 5), P4ConvP4(2, 2, 5))
    with pytest.raises(TraceError) as err:
        analyze_exactness(net, 7)          # the second conv gets a 3x3 map
    text = one_line(err)
    assert "layer '1' failed" in text and "P4ConvP4(p4): input of 3x3 pixels is too small" in text
    assert "try another input size" in text
    with pytest.raises(TraceError, match="layer '1' failed"):
        analyze_translation(net, 7)


def test_too_small_for_the_model_names_the_model():
    net = create_model("p4cnn", width=2)
    with pytest.raises(TraceError) as err:
        analyze_exactness(net, 20)
    assert "p4cnn needs inputs of at least 28x28 pixels, got 20x20" in one_line(err)
    with pytest.raises(ValueError, match="p4cnn needs inputs of at least 28x28") as err:
        export(net, torch.rand(1, 1, 20, 20))
    one_line(err)


def test_cli_size_the_model_cannot_take(capsys):
    from equivision.cli import main

    assert main(["exactness", "--model", "p4cnn", "--input-size", "20"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert "p4cnn needs inputs of at least 28x28" in err[0] and "input size" in err[0]


# ---- a model the tracer cannot run ----------------------------------------------------------
class ShapeBug(nn.Module):
    """A head sized for another input: the linear layer fails."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(10, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x).flatten(1))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.conv(x) * mask


class NoTensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: Tensor) -> dict[str, float]:
        return {"score": float(self.conv(x).mean())}


def test_failing_layer_is_named():
    with pytest.raises(TraceError) as err:
        analyze_exactness(ShapeBug(), 12)
    text = one_line(err)
    assert "cannot trace ShapeBug at input 12x12 with in_channels=3" in text
    assert "layer 'fc' failed (RuntimeError" in text


def test_forward_with_another_signature():
    with pytest.raises(TraceError) as err:
        analyze_exactness(TwoInputs(), 12)
    text = one_line(err)
    assert "layer 'model' failed (TypeError" in text
    assert "forward must take one image batch (B, C, H, W)" in text and "wrap" in text


def test_model_returning_no_tensor_is_not_called_exact():
    """It used to get "exact" (no spatial layer found): nothing was compared."""
    with pytest.raises(TraceError) as err:
        analyze_exactness(NoTensor(), 12)
    assert "returned dict, no tensor" in one_line(err)
    with pytest.raises(TraceError, match="no tensor"):
        analyze_translation(NoTensor(), 12)


def test_modes_are_restored_after_a_failure():
    net = ShapeBug().train()
    with pytest.raises(TraceError):
        analyze_exactness(net, 12)
    assert all(m.training for m in net.modules())


# ---- a group the layer does not know ---------------------------------------------------------
@pytest.mark.parametrize("build,who", [
    (lambda: GroupConv2d(3, 2, 3, group="p6"), "GroupConv2d"),
    (lambda: GroupConv2d(3, 2, 3, group="so2", in_group=None), "GroupConv2d"),
    (lambda: GroupBatchNorm2d(4, "c8"), "GroupBatchNorm2d"),
])
def test_unknown_group_names_the_layer(build, who):
    with pytest.raises(ValueError) as err:
        build()
    text = one_line(err)
    assert text.startswith(f"{who}: unknown group") and "choose 'p4'" in text


def test_group_map_of_another_group_names_the_layer():
    with pytest.raises(ValueError) as err:
        P4ConvP4(2, 2, 3)(torch.randn(1, 2, 8, 5, 5))   # a p4m map into a p4 layer
    assert "P4ConvP4(p4) expects a group feature map (B, 2, G=4, H, W)" in one_line(err)
    with pytest.raises(ValueError) as err:
        GroupBatchNorm2d(2, "p4m")(torch.randn(2, 2, 4, 3, 3))
    assert "GroupBatchNorm2d(p4m)" in one_line(err) and "G=8" in str(err.value)
    with pytest.raises(ValueError) as err:
        restrict(torch.randn(1, 2, 8, 3, 3), "p8", "p4")
    assert "restrict: can restrict 'p4m' to 'p4'" in one_line(err)


def test_unknown_group_in_the_analyzer_and_the_cli(capsys):
    from equivision.cli import main

    net = create_model("p4cnn", width=2)
    for fn in (analyze_exactness, empirical_equivariance_error):
        with pytest.raises(ValueError) as err:
            fn(net, 28, group="p6")
        assert "unknown group 'p6'; choose one of p4, p4m, flip" in one_line(err)
    with pytest.raises(SystemExit) as bad:
        main(["exactness", "--model", "p4cnn", "--input-size", "28", "--group", "p6"])
    assert bad.value.code == 2
    assert "--group" in capsys.readouterr().err.strip().splitlines()[-1]
