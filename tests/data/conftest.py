"""Fixtures of the data tests."""

import pytest

from equivision.data import real


@pytest.fixture
def no_default_data(tmp_path, monkeypatch):
    """No dataset in any default location: $EQUIVISION_DATA unset, the system folder and
    the home folder point into an empty temporary folder."""
    empty = tmp_path / "nowhere"
    empty.mkdir()
    monkeypatch.delenv(real.DATA_ENV, raising=False)
    monkeypatch.setattr(real, "SYSTEM_DATA_DIR", empty / "system")
    monkeypatch.setenv("HOME", str(empty / "home"))
    return empty
