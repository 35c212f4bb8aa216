"""Model registry and the paper's CNNs."""

import pytest
import torch
from torch import nn

from equivision.models import create_model, list_models, model_defaults, register_model
from equivision.models.cnn import CNN7, GlobalAvgPool


def test_registry_lists_models():
    names = list_models()
    assert "cnn7" in names and "cnn-small" in names
    assert names == sorted(names)


def test_cnn7_shapes_at_28():
    model = create_model("cnn7").eval()
    assert isinstance(model, CNN7)
    assert model.min_size == 28
    sizes = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
        for name, m in model.named_modules()
        if name.startswith("features.conv") or name == "features.maxpool2"
    ]
    out = model(torch.randn(3, 1, 28, 28))
    for h in hooks:
        h.remove()
    assert out.shape == (3, 10)
    assert sizes == [26, 24, 12, 10, 8, 6, 4, 1]
    assert model.pool(torch.randn(2, 20, 1, 1)).shape == (2, 20)


def test_cnn7_structure_and_names():
    model = create_model("cnn7")
    names = dict(model.named_modules())
    for i in range(1, 8):
        conv = names[f"features.conv{i}"]
        assert isinstance(conv, nn.Conv2d)
        assert conv.kernel_size == ((4, 4) if i == 7 else (3, 3))
        assert conv.out_channels == 20 and conv.padding == (0, 0)
        assert isinstance(names[f"features.bn{i}"], nn.BatchNorm2d)
        assert isinstance(names[f"features.relu{i}"], nn.ReLU)
        assert names[f"features.drop{i}"].p == pytest.approx(0.3)
    assert isinstance(names["features.maxpool2"], nn.MaxPool2d)
    assert isinstance(names["pool"], nn.AdaptiveAvgPool2d)
    assert isinstance(names["pool"], GlobalAvgPool)
    assert isinstance(names["fc"], nn.Linear) and names["fc"].in_features == 20
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 7


def test_cnn7_kwargs():
    model = create_model("cnn7", in_channels=3, num_classes=5, width=8, padding=1, dropout=0.0)
    assert model.equivision_name == "cnn7"
    assert model.equivision_kwargs == {
        "in_channels": 3, "num_classes": 5, "width": 8, "padding": 1, "dropout": 0.0,
        "order": "bn-relu", "dropout_layers": 7,
    }
    assert model.fc.out_features == 5 and model.features.conv3.out_channels == 8
    assert model.min_size == 4
    assert model.eval()(torch.randn(2, 3, 28, 28)).shape == (2, 5)
    assert model(torch.randn(1, 3, 4, 4)).shape == (1, 5)
    assert create_model("cnn7").equivision_kwargs["width"] == 20


def test_cnn7_too_small_input():
    model = create_model("cnn7").eval()
    with pytest.raises(ValueError, match="at least 28x28"):
        model(torch.randn(1, 1, 27, 27))
    with pytest.raises(ValueError, match="got 28x20"):
        model(torch.randn(1, 1, 28, 20))
    with pytest.raises(ValueError, match="input channel"):
        model(torch.randn(1, 3, 28, 28))
    with pytest.raises(ValueError, match="N, C, H, W"):
        model(torch.randn(1, 28, 28))
    with pytest.raises(ValueError, match="at least 4x4"):
        create_model("cnn7", padding=1).eval()(torch.randn(1, 1, 3, 3))


def test_cnn_small():
    model = create_model("cnn-small", in_channels=3, num_classes=4)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 3
    assert model.features.conv1.out_channels == 8
    assert model(torch.randn(2, 3, 5, 7)).shape == (2, 4)
    assert model(torch.randn(2, 3, 1, 1)).shape == (2, 4)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'cnn8'") as info:
        create_model("cnn8")
    assert "cnn7" in str(info.value) and "cnn-small" in str(info.value)
    assert "Did you mean" in str(info.value)


def test_bad_kwargs_name_model_and_arguments():
    with pytest.raises(TypeError, match="model 'cnn7' got unexpected argument") as info:
        create_model("cnn7", depth=3)
    assert "'depth'" in str(info.value) and "width=20" in str(info.value)
    with pytest.raises(ValueError, match="cnn7: width"):
        create_model("cnn7", width=0)
    with pytest.raises(ValueError, match="cnn-small: dropout"):
        create_model("cnn-small", dropout=1.5)
    with pytest.raises(ValueError, match="padding"):
        create_model("cnn7", padding=-1)


def test_register_model_extension(monkeypatch):
    from equivision.models import registry
    from equivision.registry import Registry

    monkeypatch.setattr(registry, "MODELS", Registry("model"))  # leave the real one alone

    @register_model("test-linear")
    def linear(in_features: int = 4, num_classes: int = 2) -> nn.Module:
        return nn.Linear(in_features, num_classes)

    assert "test-linear" in list_models()
    m = create_model("test-linear", num_classes=3)
    assert m.out_features == 3 and m.equivision_kwargs == {"in_features": 4, "num_classes": 3}
    assert model_defaults("test-linear") == {"in_features": 4, "num_classes": 2}
    with pytest.raises(ValueError, match="already registered"):
        register_model("test-linear")(lambda: nn.Identity())
    with pytest.raises(ValueError, match="name"):
        register_model("")

    @register_model("test-not-module")
    def not_module() -> int:
        return 3

    with pytest.raises(TypeError, match="not an nn.Module"):
        create_model("test-not-module")


def test_create_model_from_checkpoint(tmp_path):
    from equivision.checkpoint import CheckpointError, save_checkpoint

    src = create_model("cnn-small", in_channels=3, num_classes=4)
    path = save_checkpoint(tmp_path / "ck.pt", {
        "model": src.state_dict(), "model_name": "cnn-small",
        "model_kwargs": src.equivision_kwargs})
    again = create_model("cnn-small", checkpoint=path)  # the arguments come from the file
    assert again.equivision_kwargs == src.equivision_kwargs
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(again.eval()(x), src.eval()(x))
    bare = tmp_path / "bare.pt"
    torch.save(src.state_dict(), bare)
    loaded = create_model("cnn-small", checkpoint=bare, in_channels=3, num_classes=4)
    assert torch.equal(loaded.eval()(x), src(x))
    with pytest.raises(CheckpointError, match="does not fit"):
        create_model("cnn-small", checkpoint=bare)  # 1 channel, 10 classes by default


def test_create_model_module_attr():
    m = create_model("torch.nn:Linear", in_features=3, out_features=2)
    assert isinstance(m, nn.Linear) and m.out_features == 2
    with pytest.raises(ValueError, match="cannot load model 'no_such_module:thing'"):
        create_model("no_such_module:thing")
    with pytest.raises(TypeError, match="not an nn.Module"):
        create_model("collections:OrderedDict")


@pytest.mark.parametrize("name", ["z2cnn", "p4cnn"])
def test_checkpoint_from_before_the_layout_option_keeps_its_layout(tmp_path, name):
    """A z2cnn / p4cnn checkpoint whose arguments predate ``order`` / ``dropout_layers``
    was trained in the old layout; it must not load silently into the new default."""
    from equivision.checkpoint import save_checkpoint
    from equivision.models import model_from_checkpoint

    old = create_model(name, order="bn-relu", dropout_layers=7).eval()
    kwargs = {k: v for k, v in old.equivision_kwargs.items()
              if k not in ("order", "dropout_layers")}  # as written before the options
    path = save_checkpoint(tmp_path / "old.pt", {
        "model": old.state_dict(), "model_name": name, "model_kwargs": kwargs})
    x = torch.rand(2, 1, 28, 28)
    for again in (model_from_checkpoint(path), create_model(name, checkpoint=path).eval()):
        assert again.equivision_kwargs["order"] == "bn-relu"
        assert again.equivision_kwargs["dropout_layers"] == 7
        assert torch.equal(again(x), old(x))
    new = create_model(name)  # without a checkpoint: today's default, the paper's layout
    assert new.equivision_kwargs["order"] == "relu-bn"
