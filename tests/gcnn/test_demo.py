"""The demo's group-CNN section (:func:`equivision.gcnn.demo.section_exactness`) at a tiny
size: the two-part verdict for P4CNN and cnn7, the measured errors, the export."""

from __future__ import annotations

import re

import pytest

from equivision.demo import SECTIONS, DemoContext
from equivision.gcnn.demo import ExactnessDemoSizes, section_exactness

pytestmark = pytest.mark.usefixtures("one_thread")


def _row(text: str, model: str, size: int) -> list[str]:
    line = next(x for x in text.splitlines() if x.startswith(f"| {model} | {size}x{size} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_section_exactness_tiny(tmp_path):
    sizes = ExactnessDemoSizes(width=2, sizes=(28, 29), search=(27, 29), images=4, repeats=1)
    ctx = DemoContext(out=tmp_path, device="cpu", progress=False)
    text = section_exactness(ctx, sizes)
    p4_ok, p4_bad = _row(text, "P4CNN", 28), _row(text, "P4CNN", 29)
    plain_ok, plain_bad = _row(text, "cnn7", 28), _row(text, "cnn7", 29)
    assert p4_ok[2:5] == ["aligned", "constrained", "**exact**"]
    assert p4_bad[2:5] == ["misaligned", "constrained", "**not exact**"]
    assert "features.maxpool2" in p4_bad[5]
    assert plain_ok[2:5] == ["aligned", "unconstrained", "**not exact**"]
    assert plain_bad[2:4] == ["misaligned", "unconstrained"] and "weights:" in plain_bad[5]
    # the measured error agrees with each verdict
    assert float(p4_ok[6]) < 1e-9
    assert min(float(p4_bad[6]), float(plain_ok[6]), float(plain_bad[6])) > 1e-4
    assert "- P4CNN, sizes 27..29: exact 28; aligned 28" in text
    assert "- cnn7, sizes 27..29: exact none; aligned 28" in text
    assert ctx.artifacts["exactness"]["export_max_diff"] < 1e-5
    for name in ("original", "exported"):
        assert re.search(rf"\| P4CNN {name} \| 1 \| [0-9.]+ \|", text)
        assert re.search(rf"\| P4CNN {name} \| 4 \| [0-9.]+ \|", text)


def test_section_is_in_the_demo():
    assert section_exactness in SECTIONS
