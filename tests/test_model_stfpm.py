"""STFPM (student-teacher feature pyramid matching): learns on brick crops, round-trips, is deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import detect
from detect.cli import main as detect_main
from detect.data import resize_mask
from detect.metrics import auroc
from detect.models.distillation.stfpm import Stfpm
from detect.models.distillation.stfpm.torch_model import layer_distance, stfpm_loss
from synth.errors import ConfigError

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
def test_split(brick_set):
    samples = brick_set.select(split="test")
    paths = [brick_set.image_path(s) for s in samples]
    labels = np.array([s.is_anomalous for s in samples])
    masks = np.stack([resize_mask(brick_set.load_mask(s), SIZE) if s.is_anomalous else np.zeros((SIZE, SIZE), bool)
                      for s in samples])
    return paths, labels, masks


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


def test_save_load_round_trip(fitted, prediction, test_split, tmp_path):
    fitted.save(tmp_path / "stfpm")
    loaded = detect.load(tmp_path / "stfpm")
    assert isinstance(loaded, Stfpm)
    after = loaded.predict(test_split[0])
    np.testing.assert_array_equal(prediction.scores, after.scores)
    np.testing.assert_array_equal(prediction.anomaly_maps, after.anomaly_maps)
    np.testing.assert_array_equal(prediction.labels, after.labels)


def test_same_seed_same_model(brick_set, test_split):
    short = {**CONFIG, "epochs": 2}
    first, second = (Stfpm(**short).fit(brick_set, progress=False) for _ in range(2))
    assert first.history == second.history
    np.testing.assert_array_equal(first.predict(test_split[0]).scores, second.predict(test_split[0]).scores)


def test_loss_and_map_terms():
    # Unit vectors along x and y: 0.5 * |t - s|^2 = 1 - cos = 1; equal directions (any length): 0.
    t = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    s = torch.tensor([0.0, 3.0]).view(1, 2, 1, 1)
    assert layer_distance(t, s).item() == pytest.approx(1.0)
    assert layer_distance(t, 5 * t).item() == pytest.approx(0.0)
    assert stfpm_loss([t, t], [s, 2 * t]).item() == pytest.approx(1.0)


@pytest.mark.parametrize(("key", "value"), [
    ("epochs", 0), ("lr", 0.0), ("optimizer", "rmsprop"), ("momentum", 1.0), ("weight_decay", -1.0),
    ("map_mode", "max"), ("blur_sigma", -1.0), ("layers", []), ("layers", [3, 1]),
])
def test_bad_config_names_the_key(key, value):
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        Stfpm(**{key: value})


def test_cli_fit_and_eval(brick_set, tmp_path):
    out = tmp_path / "model"
    assert detect_main(["fit", "-q", "--model", "stfpm", "--data", str(brick_set.root), "--out", str(out),
                        "--image-size", "64", "--set", "epochs=2"]) == 0
    assert detect.load(out).name == "stfpm"
    assert detect_main(["eval", "-q", "--model-dir", str(out), "--data", str(brick_set.root),
                        "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics["image_auroc"] <= 1.0


@pytest.mark.real_data
@pytest.mark.slow
def test_magnetic_tile_real_defects(magnetic_tile: Path):
    """30 normal shots; 30 test/good vs 30 real defects (6 per class), image_size 128."""
    from synth.io import read_image

    size = 128
    train = sorted((magnetic_tile / "train" / "good").iterdir())[:30]
    good = sorted((magnetic_tile / "test" / "good").iterdir())[:30]
    bad = [p for c in ("blowhole", "break", "crack", "fray", "uneven")
           for p in sorted((magnetic_tile / "test" / c).iterdir())[:6]]
    masks = [np.zeros((size, size), bool)] * len(good) + [
        resize_mask(read_image(magnetic_tile / "ground_truth" / p.parent.name / f"{p.stem}_mask.png")[..., 0] > 127,
                    size) for p in bad]
    labels = np.array([False] * len(good) + [True] * len(bad))
    model = Stfpm(image_size=size, epochs=30, batch_size=8, seed=0).fit(train, progress=False)
    prediction = model.predict(good + bad)
    # Measured (30 epochs; fit holds 6 of the 30 out for calibration): image AUROC 0.683, pixel AUROC 0.701.
    assert auroc(prediction.scores, labels) >= 0.62
    assert auroc(prediction.anomaly_maps, np.stack(masks)) >= 0.64
