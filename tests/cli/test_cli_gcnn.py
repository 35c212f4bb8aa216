"""``equivision exactness``'s size search: exact sizes, and for models with unconstrained
weights the aligned sizes, marked as the sampling geometry alone."""

from __future__ import annotations

import json

import pytest

from equivision.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_plain_cnn_gets_aligned_sizes_not_exact_ones(tmp_path, capsys):
    out = tmp_path / "ex.json"
    assert main(["exactness", "--model", "cnn7", "--input-size", "29", "--range", "26:30",
                 "--json", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "verdict: not exact"
    assert "exact sizes in 26..30: none" in lines
    aligned = [line for line in lines if line.startswith("aligned sizes in 26..30: 28, 30")]
    assert len(aligned) == 1 and "weights are unconstrained" in aligned[0]
    assert "not exact" in aligned[0]
    nearest = [line for line in lines if line.startswith("nearest aligned sizes to 29")]
    assert nearest and "below 28, above 30" in nearest[0]
    data = json.loads(out.read_text())
    assert data["aligned_sizes"] == [28, 30] and data["exact_sizes"] == []
    assert data["nearest_aligned"] == [28, 30] and data["nearest_exact"] == [None, None]


def test_group_cnn_has_no_aligned_lines(capsys):
    """P4CNN's weights are constrained: its exact sizes are the aligned ones, said once."""
    assert main(["exactness", "--model", "p4cnn", "--input-size", "29", "--range",
                 "28:30"]) == 0
    text = capsys.readouterr().out
    assert "exact sizes in 28..30: 28, 30" in text and "aligned sizes" not in text
