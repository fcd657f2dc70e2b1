"""GANomaly (encoder-decoder-encoder GAN, latent-mismatch score): learns on brick crops.
Round trip, same seed, CLI and config errors: test_detector_contract.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import detect
from detect.metrics import auroc
from detect.models.reconstruction.ganomaly import Ganomaly
from detect.models.reconstruction.ganomaly.torch_model import GanomalyDiscriminator, GanomalyModel

SIZE = 64
# Paper's losses (w_adv 1, w_con 50, w_enc 1), Adam 2e-4 (0.5, 0.999), latent 100; CPU-sized width 16
# (reference 64) and batch 4 (reference 64): 4 steps per epoch on the 13 training crops.
CONFIG = {"image_size": SIZE, "epochs": 20, "batch_size": 4, "width": 16, "seed": 0}
# Measured on brick_set at image_size 64 (20 epochs, seeds 0 / 1 / 2): image AUROC of the paper's latent score
# 0.852 / 0.891 / 0.953; max of the |x - x_hat| map as the score 0.969 / 0.961 / 0.977; pixel AUROC of the map
# 0.956 / 0.953 / 0.958; generator loss x0.50 / x0.51 / x0.47, contextual L1 0.227 -> 0.113 (seed 0).
IMAGE_AUROC_BAR = 0.75
MAP_IMAGE_AUROC_BAR = 0.9
PIXEL_AUROC_BAR = 0.9
LOSS_FACTOR = 0.65


@pytest.fixture(scope="module")
def fitted(brick_set):
    return Ganomaly(**CONFIG).fit(brick_set, progress=False)


@pytest.fixture(scope="module")
def prediction(fitted, test_split):
    return fitted.predict(test_split[0])


def test_registered_generator_only_saved(fitted):
    assert "ganomaly" in detect.list_models("reconstruction")
    state = fitted.model.state_dict()
    prefixes = {k.split(".")[1] for k in state}
    assert prefixes == {"encoder1", "decoder", "encoder2"}  # D is for training only


def test_training_losses(fitted):
    history = fitted.history
    assert len(history) == CONFIG["epochs"] == len(fitted.history_d)
    assert all(np.isfinite(history)) and all(np.isfinite(fitted.history_d))
    assert history[-1] < LOSS_FACTOR * history[0]
    contextual = fitted.history_terms["con"]
    assert contextual[-1] < LOSS_FACTOR * contextual[0]


def test_learns_image_and_pixel_auroc(prediction, test_split):
    paths, labels, masks = test_split
    assert prediction.scores.shape == (len(paths),)
    assert prediction.anomaly_maps.shape == (len(paths), SIZE, SIZE)
    assert auroc(prediction.scores, labels) >= IMAGE_AUROC_BAR  # paper's score: mean (z - z_hat)^2
    assert auroc(prediction.anomaly_maps.reshape(len(paths), -1).max(axis=1), labels) >= MAP_IMAGE_AUROC_BAR
    assert auroc(prediction.anomaly_maps, masks) >= PIXEL_AUROC_BAR
    assert prediction.labels is not None  # calibrated


def test_latent_score_is_mean_squared_latent_gap(fitted):
    model: GanomalyModel = fitted.model
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scores, maps = model(images)
        fake, z, z_hat = model.generator(images * 2 - 1)
    torch.testing.assert_close(scores, ((z - z_hat) ** 2).mean(dim=1))
    assert z.shape == (2, 100) and maps.shape == (2, SIZE, SIZE) and float(maps.min()) >= 0


def test_discriminator_reinitialised_when_its_loss_collapses(brick_set):
    # A threshold above any BCE value re-initialises D after every step (4 steps: 13 crops, batch 4).
    model = Ganomaly(**{**CONFIG, "epochs": 1, "width": 8, "d_reinit_threshold": 100.0})
    model.fit(brick_set, progress=False)
    assert model.d_reinits == 4
    assert model.history and np.isfinite(model.history[0])


@pytest.mark.parametrize("size", [32, 40, 56, 72, 88])
def test_any_multiple_of_eight(size):
    model = GanomalyModel(size, latent_dim=8, width=4).eval()
    with torch.no_grad():
        scores, maps = model(torch.rand(2, 3, size, size))
        logits, features = GanomalyDiscriminator(size, width=4)(torch.rand(2, 3, size, size))
    assert scores.shape == (2,) and maps.shape == (2, size, size)
    assert logits.shape == (2,) and features.shape[-1] <= 7


