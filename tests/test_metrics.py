"""Metrics: AUPRO against a plain threshold-by-threshold reference; AUROC/F1 sanity."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from detect.metrics import aupro, auroc, evaluate, f1_max


def reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Straightforward PRO curve: for every distinct score as threshold, average overlap per region."""
    regions = []
    for index in range(len(masks)):
        labeled, count = ndimage.label(masks[index], structure=np.ones((3, 3)))
        regions += [(index, labeled == r) for r in range(1, count + 1)]
    normal = ~masks
    thresholds = np.unique(maps)[::-1]
    fprs, pros = [0.0], [0.0]
    for t in thresholds:
        predicted = maps >= t
        fprs.append((predicted & normal).sum() / normal.sum())
        pros.append(np.mean([predicted[i][region].mean() for i, region in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    # Integrate up to the limit with linear interpolation at the limit.
    grid_x, grid_y = [0.0], [0.0]
    for k in range(1, len(fprs)):
        if fprs[k] <= fpr_limit:
            grid_x.append(fprs[k])
            grid_y.append(pros[k])
        else:
            x0, x1, y0, y1 = fprs[k - 1], fprs[k], pros[k - 1], pros[k]
            grid_x.append(fpr_limit)
            grid_y.append(y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))
            break
    return float(np.trapezoid(grid_y, grid_x) / fpr_limit)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_reference(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 24, 24), bool)
    masks[0, 2:6, 2:9] = True
    masks[0, 15:20, 15:17] = True  # two regions of different size in one image
    masks[1, 10:14, 3:20] = True
    maps = rng.random(masks.shape).round(2)  # ties on purpose
    maps[masks] += rng.uniform(0, 0.6, masks.sum())
    assert aupro(maps, masks) == pytest.approx(reference_aupro(maps, masks), abs=1e-9)


def test_aupro_extremes():
    masks = np.zeros((2, 16, 16), bool)
    masks[0, 4:8, 4:8] = True
    perfect = masks.astype(float)
    assert aupro(perfect, masks) == pytest.approx(1.0)
    inverted = 1.0 - perfect
    assert aupro(inverted, masks) == pytest.approx(0.0)


def test_auroc_and_f1():
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    labels = np.array([0, 0, 0, 1, 1], bool)
    assert auroc(scores, labels) == 1.0
    f1, threshold = f1_max(scores, labels)
    assert f1 == 1.0 and 0.3 < threshold <= 0.8
    assert np.isnan(auroc(scores, np.zeros(5, bool)))
    result = evaluate(scores, labels)
    assert result["image_auroc"] == 1.0 and result["num_anomalous"] == 2
