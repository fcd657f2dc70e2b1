"""FRE (feature reconstruction error of a tied linear autoencoder): learns on brick crops, round-trips."""

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
from detect.models.reconstruction.fre import Fre
from detect.models.reconstruction.fre.torch_model import TiedAutoencoder
from synth.errors import ConfigError

SIZE = 64
CONFIG = {"image_size": SIZE, "epochs": 60, "seed": 0}
# Measured on brick_set at image_size 64 (60 epochs; layer 3 pooled to 112 x 2 x 2 = 448 values, latent 220):
# image AUROC 0.938, pixel AUROC 0.726 (a 2x2 map), loss 20.2 -> 0.22 (-> 5e-6 with the default 220 epochs).
IMAGE_AUROC_BAR = 0.88
PIXEL_AUROC_BAR = 0.65
LOSS_FACTOR = 0.05


@pytest.fixture(scope="module")
def fitted(brick_set):
    return Fre(**CONFIG).fit(brick_set, progress=False)


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


def test_registered_and_shapes(fitted):
    assert "fre" in detect.list_models("reconstruction")
    ae = fitted.model.autoencoder
    assert tuple(ae.weight.shape) == (220, 112 * 2 * 2)
    assert set(fitted.model.state_dict()) >= {"autoencoder.weight", "autoencoder.encoder_bias",
                                              "autoencoder.decoder_bias"}


def test_training_loss_decreases(fitted):
    history = fitted.history
    assert len(history) == CONFIG["epochs"]
    assert all(np.isfinite(history))
    assert history[-1] < LOSS_FACTOR * history[0]


def test_learns_image_and_pixel_auroc(prediction, test_split):
    paths, labels, masks = test_split
    assert prediction.scores.shape == (len(paths),)
    assert prediction.anomaly_maps.shape == (len(paths), SIZE, SIZE)
    assert auroc(prediction.scores, labels) >= IMAGE_AUROC_BAR
    assert auroc(prediction.anomaly_maps, masks) >= PIXEL_AUROC_BAR
    assert prediction.labels is not None  # calibrated


def test_score_is_the_total_feature_reconstruction_error(fitted):
    model = fitted.model
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        scores, _ = model(images)
        features = model.features(images)
        expected = (features - model.autoencoder(features)).pow(2).sum(dim=1)
    torch.testing.assert_close(scores, expected)


def test_save_load_round_trip(fitted, prediction, test_split, tmp_path):
    fitted.save(tmp_path / "fre")
    loaded = detect.load(tmp_path / "fre")
    assert isinstance(loaded, Fre)
    after = loaded.predict(test_split[0])
    np.testing.assert_array_equal(prediction.scores, after.scores)
    np.testing.assert_array_equal(prediction.anomaly_maps, after.anomaly_maps)
    np.testing.assert_array_equal(prediction.labels, after.labels)


def test_same_seed_same_model(fitted, prediction, test_split, brick_set):
    again = Fre(**CONFIG).fit(brick_set, progress=False)
    assert again.history == fitted.history
    np.testing.assert_array_equal(again.predict(test_split[0]).scores, prediction.scores)


def test_tied_autoencoder_shares_its_weight():
    ae = TiedAutoencoder(4, 2)
    with torch.no_grad():
        ae.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # Encoder W, decoder W^T: the projection onto the first two coordinates.
    torch.testing.assert_close(ae(x), torch.tensor([[1.0, 2.0, 0.0, 0.0]]))


@pytest.mark.parametrize(("key", "value"), [
    ("epochs", 0), ("lr", 0.0), ("pooling", 0), ("latent_dim", 0), ("score_mode", "mean"), ("blur_sigma", -1.0),
    ("layers", [2, 3]), ("layers", []),
])
def test_bad_config_names_the_key(key, value):
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        Fre(**{key: value})


@pytest.mark.parametrize(("key", "value"), [("latent_dim", 449), ("pooling", 5)])
def test_sizes_beyond_the_features_name_the_key(key, value):
    # At 64 px layer 3 is 112 x 4 x 4: pooling at most 4; with pooling 2, latent_dim at most 448.
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        Fre(image_size=SIZE, pretrained=False, **{key: value})


def test_cli_fit_and_eval(brick_set, tmp_path):
    out = tmp_path / "model"
    assert detect_main(["fit", "-q", "--model", "fre", "--data", str(brick_set.root), "--out", str(out),
                        "--image-size", "64", "--set", "epochs=2"]) == 0
    assert detect.load(out).name == "fre"
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
    model = Fre(image_size=size, seed=0).fit(train, progress=False)
    prediction = model.predict(good + bad)
    # Measured (defaults; fit holds 6 of the 30 out for calibration): image AUROC 0.776, pixel AUROC 0.815.
    assert auroc(prediction.scores, labels) >= 0.71
    assert auroc(prediction.anomaly_maps, np.stack(masks)) >= 0.75
