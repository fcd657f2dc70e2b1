"""PaDiM: learns the brick defects and its Mahalanobis distance is exact.

Learning bars (brick_set, image_size 64, seed 0, blur_sigma 1 — Anomalib's sigma 4 at 256 px scaled to 64 px):
measured image AUROC 0.94 and pixel AUROC 0.96; asserted >= 0.90 and >= 0.90.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from detect.data import resize_mask
from detect.metrics import auroc
from detect.models.components.blur import gaussian_blur, gaussian_kernel1d
from detect.models.memory.padim import Padim
from detect.models.memory.padim.torch_model import RunningGaussian, mahalanobis

SIZE = 64


def _evaluate(detector, defect_set, samples, size):
    labels = np.array([s.is_anomalous for s in samples])
    masks = np.stack([resize_mask(defect_set.load_mask(s), size) for s in samples])
    prediction = detector.predict([defect_set.image_path(s) for s in samples])
    return prediction, auroc(prediction.scores, labels), auroc(prediction.anomaly_maps, masks)


@pytest.fixture(scope="module")
def fitted(brick_set):
    detector = Padim(image_size=SIZE, blur_sigma=1.0).fit(brick_set, progress=False)
    test = brick_set.select(split="test")
    return detector, test, _evaluate(detector, brick_set, test, SIZE)


def test_learns_brick_defects(fitted):
    detector, _, (prediction, image_auroc, pixel_auroc) = fitted
    assert prediction.anomaly_maps.shape == (24, SIZE, SIZE)
    assert image_auroc >= 0.90, image_auroc
    assert pixel_auroc >= 0.90, pixel_auroc
    assert detector.calibration is not None
    # The seeded channel subset: 100 distinct sorted indices out of 24 + 40 + 112 channels.
    index = detector.model.index
    assert index.numel() == 100 and index.unique().numel() == 100 and int(index.max()) < 176


def test_running_gaussian_and_mahalanobis_match_numpy_scipy():
    rng = np.random.default_rng(0)
    n, d, positions = 40, 5, 3
    # A correlated Gaussian per position.
    mixing = rng.normal(size=(positions, d, d))
    data = np.einsum("pde,npe->ndp", mixing, rng.normal(size=(n, positions, d))) + rng.normal(size=(1, d, positions))
    gaussian = RunningGaussian()
    for chunk in np.array_split(data, 4):  # batched accumulation == all at once
        gaussian.update(torch.from_numpy(chunk).float())
    mean, covariance = gaussian.finalize(eps=0.01)
    queries = rng.normal(size=(7, d, positions)) * 2
    distance = mahalanobis(torch.from_numpy(queries).float(), mean.float(),
                           torch.linalg.inv(covariance).float()).numpy()
    for p in range(positions):
        ref_cov = np.cov(data[:, :, p], rowvar=False) + 0.01 * np.eye(d)
        np.testing.assert_allclose(mean[p].numpy(), data[:, :, p].mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(covariance[p].numpy(), ref_cov, rtol=1e-4, atol=1e-4)
        inverse = np.linalg.inv(ref_cov)
        for q in range(len(queries)):
            expected = scipy_mahalanobis(queries[q, :, p], data[:, :, p].mean(0), inverse)
            assert distance[q, p] == pytest.approx(expected, rel=1e-4)


def test_blur_kernel_is_normalised_and_preserves_constants():
    kernel = gaussian_kernel1d(4.0)
    assert kernel.numel() == 33 and float(kernel.sum()) == pytest.approx(1.0)
    flat = torch.full((1, 1, 40, 40), 3.0)
    torch.testing.assert_close(gaussian_blur(flat, kernel), flat)


@pytest.mark.real_data
def test_magnetic_tile(magnetic_tile):
    """30 train/good images; 30 good + 30 defect test images at 128 px (~3 s). Measured image AUROC 0.72."""
    from synth.core.defect_set import read_defect_set

    defect_set = read_defect_set(magnetic_tile)
    rng = np.random.default_rng(0)

    def pick(samples, n):
        return [samples[i] for i in sorted(rng.choice(len(samples), n, replace=False))]

    train = pick(defect_set.select(split="train"), 30)
    test = pick(defect_set.select(split="test", anomalous=False), 30) + pick(
        defect_set.select(split="test", anomalous=True), 30)
    detector = Padim(image_size=128).fit([defect_set.image_path(s) for s in train], progress=False)
    _, image_auroc, _ = _evaluate(detector, defect_set, test, 128)
    assert image_auroc >= 0.65, image_auroc
