"""STFPM (student-teacher feature pyramid matching): learns on brick crops.
Round trip, same seed, CLI and config errors: test_detector_contract.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import magnetic_tile_probe

import detect
from detect.metrics import auroc
from detect.models.distillation.stfpm import Stfpm
from detect.models.distillation.stfpm.torch_model import layer_distance, stfpm_loss

SIZE = 64
# Paper's SGD (lr 0.4, momentum 0.9, wd 1e-4); batch 4 gives 4 steps per epoch on the 13 training crops.
CONFIG = {"image_size": SIZE, "epochs": 15, "batch_size": 4, "seed": 0}
# Measured on brick_set at image_size 64 (15 epochs, seed 0): image AUROC 1.000 (seeds 1, 2: 0.938, 0.961),
# loss 2.58 -> 0.38.
IMAGE_AUROC_BAR = 0.9
LOSS_FACTOR = 0.3


@pytest.fixture(scope="module")
def fitted(brick_set):
    return Stfpm(**CONFIG).fit(brick_set, progress=False)


@pytest.fixture(scope="module")
def prediction(fitted, test_split):
    return fitted.predict(test_split[0])


def test_registered_with_teacher_and_student(fitted):
    assert "stfpm" in detect.list_models("distillation")
    state = fitted.model.state_dict()
    assert any(k.startswith("teacher.") for k in state) and any(k.startswith("student.") for k in state)
    assert not any(p.requires_grad for p in fitted.model.teacher.parameters())


def test_training_loss_decreases(fitted):
    history = fitted.history
    assert len(history) == CONFIG["epochs"]
    assert all(np.isfinite(history))
    assert history[-1] < LOSS_FACTOR * history[0]


def test_learns_image_auroc(prediction, test_split):
    paths, labels, _ = test_split
    assert prediction.scores.shape == (len(paths),)
    assert prediction.anomaly_maps.shape == (len(paths), SIZE, SIZE)
    assert auroc(prediction.scores, labels) >= IMAGE_AUROC_BAR
    assert prediction.labels is not None  # calibrated


def test_loss_and_map_terms():
    # Unit vectors along x and y: 0.5 * |t - s|^2 = 1 - cos = 1; equal directions (any length): 0.
    t = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    s = torch.tensor([0.0, 3.0]).view(1, 2, 1, 1)
    assert layer_distance(t, s).item() == pytest.approx(1.0)
    assert layer_distance(t, 5 * t).item() == pytest.approx(0.0)
    assert stfpm_loss([t, t], [s, 2 * t]).item() == pytest.approx(1.0)


@pytest.mark.real_data
@pytest.mark.slow
def test_magnetic_tile_real_defects(magnetic_tile: Path):
    """30 normal shots; 30 test/good vs 30 real defects (6 per class), image_size 128."""
    size = 128
    train, paths, labels, masks = magnetic_tile_probe(magnetic_tile, size)
    model = Stfpm(image_size=size, epochs=30, batch_size=8, seed=0).fit(train, progress=False)
    prediction = model.predict(paths)
    # Measured (30 epochs; fit holds 6 of the 30 out for calibration): image AUROC 0.683, pixel AUROC 0.701.
    assert auroc(prediction.scores, labels) >= 0.62
    assert auroc(prediction.anomaly_maps, masks) >= 0.64
