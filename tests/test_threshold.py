"""Thresholds: F1-optimal and percentile, no collapse without anomalies, normalisation maps threshold to 0.5."""

from __future__ import annotations

import numpy as np
import pytest

from detect.threshold import Calibration, calibrate, f1_optimal_threshold, percentile_threshold
from synth.core.errors import InputError


def test_f1_threshold_separates_and_sits_between_samples():
    normal = np.array([0.1, 0.2, 0.25, 0.3])
    anomalous = np.array([0.6, 0.7, 0.9])
    scores = np.r_[normal, anomalous]
    labels = np.r_[np.zeros(4, bool), np.ones(3, bool)]
    threshold = f1_optimal_threshold(scores, labels)
    assert threshold == pytest.approx(0.45)
    assert ((scores >= threshold) == labels).all()


def test_percentile_without_anomalies_does_not_collapse():
    rng = np.random.default_rng(0)
    normal = rng.normal(1.0, 0.1, 500)
    calibration = calibrate(normal)
    assert calibration.method == "percentile-99"
    # Collapse would put the threshold at the minimum (everything anomalous) or 0.
    assert np.mean(normal >= calibration.image_threshold) == pytest.approx(0.01, abs=0.005)
    assert calibration.image_threshold > normal.mean()


def test_auto_uses_f1_with_anomalies_and_records_source():
    calibration = calibrate(np.array([0.1, 0.2, 0.3]), np.array([0.8, 0.9]), anomalies_are="synthetic")
    assert calibration.method == "f1-synthetic"
    assert 0.3 < calibration.image_threshold < 0.8


def test_normalisation_maps_threshold_to_half():
    calibration = calibrate(np.array([0.0, 1.0, 2.0]), np.array([5.0, 6.0]))
    assert calibration.normalize(np.array([calibration.image_threshold]))[0] == pytest.approx(0.5)
    assert calibration.normalize(np.array([100.0]))[0] == 1.0
    again = Calibration.from_dict(calibration.to_dict())
    assert again == calibration


def test_degenerate_inputs_raise():
    with pytest.raises(InputError, match="identical"):
        calibrate(np.ones(10))
    with pytest.raises(InputError, match="at least one normal"):
        calibrate(np.array([]))
    with pytest.raises(InputError, match="needs anomalous"):
        calibrate(np.array([0.1, 0.2]), method="f1")
    with pytest.raises(InputError, match="percentile"):
        percentile_threshold(np.array([1.0]), q=0)


def test_pixel_threshold_from_masks():
    rng = np.random.default_rng(1)
    normal_maps = rng.random((4, 16, 16)) * 0.5
    anomalous_maps = rng.random((3, 16, 16)) * 0.5
    masks = np.zeros((3, 16, 16), bool)
    masks[:, 4:8, 4:8] = True
    anomalous_maps[masks] += 1.0
    calibration = calibrate(normal_maps.max((1, 2)), anomalous_maps.max((1, 2)), normal_maps=normal_maps,
                            anomalous_maps=anomalous_maps, anomalous_masks=masks)
    predicted = anomalous_maps >= calibration.pixel_threshold
    assert (predicted == masks).all()
