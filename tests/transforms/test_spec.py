"""One form for transformations: spec strings, Transforms and sequences of both."""

import pytest
import torch

from equivision.registry import Registry, UnknownNameError
from equivision.transforms import Dihedral, Rotation, Translation, hflip, rot90
from equivision.transforms.elements import ElementBatch
from equivision.transforms.spec import NAMES, TRANSFORMATIONS, as_transforms, parse_transforms


def test_spec_string_single_transform_and_mixed_sequence():
    assert as_transforms("rot90:1,hflip") == [rot90(1), hflip()]
    assert as_transforms("shiftx:1-2 shifty:3") == [Translation(1, 0), Translation(2, 0),
                                                     Translation(0, 3)]
    g = Rotation(15.0)
    assert as_transforms(g) == [g]
    assert as_transforms(["rot90:2", g, "hflip"]) == [rot90(2), g, hflip()]
    assert as_transforms((hflip(), hflip())) == [hflip(), hflip()]  # Transforms kept as given
    assert as_transforms(ElementBatch([rot90(1)])) == [rot90(1)]


def test_as_transforms_returns_a_new_list():
    given = [rot90(1)]
    out = as_transforms(given)
    out.append(hflip())
    assert given == [rot90(1)]


@pytest.mark.parametrize("bad", [None, 3, torch.zeros(2), {"rot90": 1}])
def test_non_transforms_are_type_errors(bad):
    with pytest.raises(TypeError, match="spec string"):
        as_transforms(bad)


def test_a_class_instead_of_an_instance_says_so():
    with pytest.raises(TypeError, match=r"instance such as Dihedral\(\.\.\.\)"):
        as_transforms([Dihedral])
    with pytest.raises(TypeError, match="item 1"):
        as_transforms(["rot90", 2.5])


@pytest.mark.parametrize("bad", ["", "  ,", [], ()])
def test_empty_specs_are_value_errors(bad):
    with pytest.raises(ValueError, match="no transformation given"):
        as_transforms(bad)


def test_unknown_names_suggest_close_ones():
    with pytest.raises(UnknownNameError, match="Did you mean 'rot90'") as err:
        as_transforms("rto90")
    assert isinstance(err.value, ValueError) and "valid entries" in str(err.value)
    with pytest.raises(UnknownNameError, match="Did you mean 'hflip'"):
        parse_transforms(["rot90", "hflp"])
    with pytest.raises(ValueError, match="bad argument"):
        as_transforms("rotate:x")
    with pytest.raises(ValueError, match="needs a range"):
        as_transforms("shift")


def test_names_come_from_the_registry():
    assert isinstance(TRANSFORMATIONS, Registry)
    assert len(NAMES) == len(TRANSFORMATIONS)
    assert set(TRANSFORMATIONS.describe().values()) == set(NAMES)
    assert as_transforms("HFLIP") == [hflip()]  # names are case-insensitive
    for name in TRANSFORMATIONS:  # every registered name parses with a sample argument
        arg = {"shift": ":2", "shiftx": ":2", "shifty": ":2", "rotate": ":10",
               "scale": ":1.5", "jitter": ":0.1"}.get(name, "")
        assert as_transforms(name + arg)
