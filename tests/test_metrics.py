"""Tests of :mod:`equivision.metrics` beyond those the attack tests make."""

from __future__ import annotations

import torch

from equivision.metrics import IGNORE_INDEX, per_image_score


def test_targeted_score_on_classifier_logits():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    targets = torch.tensor([0, 2, 2])  # hit, miss, hit
    score = per_image_score(logits, targets, targeted=True)
    assert score.shape == (3,) and score.dtype == torch.float64
    assert score.tolist() == [0.0, 1.0, 0.0]
    assert per_image_score(logits, targets).tolist() == [1.0, 0.0, 1.0]


def test_targeted_score_on_segmentation_counts_valid_pixels_only():
    out = torch.zeros(2, 3, 2, 2)
    out[:, 1] = 1.0  # every pixel predicts class 1
    targets = torch.tensor([[[1, 1], [0, IGNORE_INDEX]],
                            [[IGNORE_INDEX] * 2, [IGNORE_INDEX] * 2]])
    score = per_image_score(out, targets, targeted=True)
    # image 0: 2 of its 3 valid pixels hit; image 1: no valid pixel, nothing hit
    assert torch.allclose(score, torch.tensor([1 - 2 / 3, 1.0], dtype=torch.float64))
