"""Every name lookup goes through one Registry type: models, datasets, attacks, defenses
and SSL methods give did-you-mean errors that are ValueErrors and KeyErrors."""

import pytest

from equivision.data import DATASETS, get_dataset, register_dataset
from equivision.models import MODELS, create_model
from equivision.registry import Registry, UnknownNameError
from equivision.robust import ATTACKS, DEFENSES, RandomNoiseDefense, build_defense, parse_attack
from equivision.ssl import SSL_METHODS, MoCoV3, SERConfig, SSLViT, build_method


@pytest.mark.parametrize("registry", [MODELS, DATASETS, ATTACKS, DEFENSES, SSL_METHODS])
def test_every_lookup_is_a_registry(registry):
    assert isinstance(registry, Registry) and len(registry) >= 3
    assert set(registry.describe()) == set(registry.list())


@pytest.mark.parametrize("lookup, message", [
    (lambda: create_model("cnn-smal"), "unknown model 'cnn-smal'. Did you mean 'cnn-small'"),
    (lambda: get_dataset("digit"), "unknown dataset 'digit'. Did you mean 'digits'"),
    (lambda: parse_attack("bpda-eat"), "unknown attack 'bpda-eat'. Did you mean 'bpda-eot'"),
    (lambda: build_defense("equivarance", create_model("cnn-small", width=4)),
     "unknown defense 'equivarance'. Did you mean 'equivariance'"),
    (lambda: build_method("din", SSLViT(image_size=8, patch_size=4, dim=16, depth=2,
                                        heads=2, cls_layer=1)),
     "unknown SSL method 'din'. Did you mean 'dino'"),
])
def test_unknown_names_suggest_and_list(lookup, message):
    with pytest.raises(UnknownNameError) as err:
        lookup()
    assert message in str(err.value) and "Valid names:" in str(err.value)
    assert isinstance(err.value, ValueError) and isinstance(err.value, KeyError)


def test_dataset_registration_and_descriptions():
    assert "sklearn digits" in DATASETS.describe()["digits"]
    with pytest.raises(ValueError, match="dataset 'digits' is already registered"):
        register_dataset("digits", lambda **kw: None)


def test_defense_registry_builds_by_name():
    model = create_model("cnn-small", width=4)
    assert build_defense("none", model) is None
    noise = build_defense("random", model, eps_v=0.25)
    assert isinstance(noise, RandomNoiseDefense) and noise.eps_v == 0.25
    assert build_defense(noise, model) is noise


def test_ssl_method_names_and_ser_defaults():
    vit = SSLViT(image_size=8, patch_size=4, dim=16, depth=2, heads=2, cls_layer=1)
    assert isinstance(build_method("MoCo-v3", vit), MoCoV3)  # case and dashes are ignored
    assert SSL_METHODS.list() == ["barlow", "dino", "mocov3"]
    ser = SERConfig.paper("dino", weight=None, tau=None, layer=2)
    assert (ser.weight, ser.tau, ser.layer, ser.variant) == (0.5, 0.5, 2, "ser")
    assert SERConfig.default_ratio(ser) == SERConfig.RATIO == 0.25
    assert SERConfig.default_ratio(None) == 0.0
