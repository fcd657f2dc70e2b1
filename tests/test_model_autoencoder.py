"""Convolutional autoencoder (pixel reconstruction error): learns on brick crops, any image size.
Round trip, same seed, CLI and config errors: test_detector_contract.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import detect
from detect.data import resolve_images
from detect.metrics import auroc
from detect.models.reconstruction.autoencoder import Autoencoder
from detect.models.reconstruction.autoencoder.torch_model import (
    AutoencoderModel,
    downsampling_plan,
    output_paddings,
    reconstruction_loss,
    ssim_map,
    ssim_window,
    top_k_mean,
)

SIZE = 64
# CPU-sized: width 16 (default 32), batch 2 (7 steps per epoch on the 13 training crops); L2 loss and L2 map
# (the defaults: on these crops the L2 map beats the SSIM maps, image AUROC about 0.97 vs 0.6-0.8).
# One torch thread: the 30-epoch trajectory (batch 2) depends on float reduction order; with 2 threads on this
# AMD EPYC machine seed 0 ended at x0.92 of the mean image's MSE (over the bar), with 1 thread at x0.66.
pytestmark = pytest.mark.usefixtures("one_torch_thread")
CONFIG = {"image_size": SIZE, "epochs": 30, "batch_size": 2, "width": 16, "lr": 1e-3, "seed": 0}
# Measured on brick_set at image_size 64 (30 epochs; fit holds 3 of the 16 crops out), seeds 0 / 1 / 2:
# image AUROC 1.000 / 0.969 / 0.977, pixel AUROC 0.969 / 0.963 / 0.968, epoch loss 0.0150 -> 0.0069 (x0.46) /
# x0.63 / x0.52. The first epochs learn the mean brick (MSE of the mean image 0.0094), after that the
# structure: trained MSE on the 16 crops 0.0071 / 0.0082 / 0.0080 (x0.76 / 0.87 / 0.85 of the mean image's).
IMAGE_AUROC_BAR = 0.9
PIXEL_AUROC_BAR = 0.9
LOSS_FACTOR = 0.7
MEAN_IMAGE_FACTOR = 0.9


@pytest.fixture(scope="module")
def fitted(brick_set):
    return Autoencoder(**CONFIG).fit(brick_set, progress=False)


@pytest.fixture(scope="module")
def prediction(fitted, test_split):
    return fitted.predict(test_split[0])


def test_registered_and_state(fitted):
    assert "autoencoder" in detect.list_models("reconstruction")
    state = fitted.model.state_dict()
    assert state and all(k.startswith("autoencoder.") for k in state)  # SSIM window / blur kernel not saved


def test_training_loss_decreases(fitted, brick_set):
    history = fitted.history
    assert len(history) == CONFIG["epochs"]
    assert all(np.isfinite(history))
    assert history[-1] < LOSS_FACTOR * history[0]
    # Better than the per-pixel mean of the training crops: it reconstructs structure, not just the mean.
    pixels = fitted.load_tensor(resolve_images(brick_set))
    with torch.no_grad():
        trained = fitted.model.loss(pixels, "l2").item()
    mean_image = (pixels - pixels.mean(dim=0, keepdim=True)).pow(2).mean().item()
    assert trained < MEAN_IMAGE_FACTOR * mean_image


def test_learns_image_and_pixel_auroc(prediction, test_split):
    paths, labels, masks = test_split
    assert prediction.scores.shape == (len(paths),)
    assert prediction.anomaly_maps.shape == (len(paths), SIZE, SIZE)
    assert auroc(prediction.scores, labels) >= IMAGE_AUROC_BAR
    assert auroc(prediction.anomaly_maps, masks) >= PIXEL_AUROC_BAR
    assert prediction.labels is not None  # calibrated


@pytest.mark.parametrize(("size", "sizes"), [
    (32, [32, 16, 8, 4]), (40, [40, 20, 10, 5]), (56, [56, 28, 14, 7]), (64, [64, 32, 16, 8, 4]),
    (72, [72, 36, 18, 9, 4]), (120, [120, 60, 30, 15, 7]),
])
def test_downsampling_plan(size, sizes):
    assert downsampling_plan(size) == sizes
    assert output_paddings(sizes) == [s - 2 * (s // 2) for s in reversed(sizes[:-1])]


@pytest.mark.parametrize("size", [32, 40, 48, 56, 72, 88, 120])
@pytest.mark.parametrize("bottleneck", ["dense", "spatial"])
def test_any_multiple_of_eight(size, bottleneck):
    model = AutoencoderModel(size, width=4, latent_dim=8, bottleneck=bottleneck, extra_convs=False).eval()
    with torch.no_grad():
        scores, maps = model(torch.rand(2, 3, size, size))
    assert scores.shape == (2,) and maps.shape == (2, size, size)


def test_ssim_and_loss_terms():
    window = ssim_window()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim_map(x, x, window), torch.ones(2, 3, 32, 32), atol=1e-4)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert ssim_map(x, noisy, window).mean() < 0.9
    y = x.clone().requires_grad_(True)
    loss = reconstruction_loss(x, (y * 0.5).clamp(0, 1), window, mode="l2_ssim", ssim_weight=1.0)
    loss.backward()
    assert loss.item() > 0 and y.grad is not None and torch.isfinite(y.grad).all()
    assert reconstruction_loss(x, x, window, mode="ssim").item() == pytest.approx(0.0, abs=1e-4)
    maps = torch.arange(200.0).view(2, 10, 10)
    torch.testing.assert_close(top_k_mean(maps, 2.0), torch.tensor([98.5, 198.5]))  # top 2 of 100
    torch.testing.assert_close(top_k_mean(maps, 0.001), torch.tensor([99.0, 199.0]))  # at least one pixel


