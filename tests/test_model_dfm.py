"""DFM: learns the brick defects and its PCA scores are exact.

Learning bars (brick_set, image_size 64, layers [3] with pooling_kernel 1 so that the 4x4 stride-16 map keeps
its resolution; the default kernel 4 would pool it to one cell): measured image AUROC 0.99, pixel AUROC 0.93;
asserted >= 0.90 and >= 0.85.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

import detect
from detect.data import resize_mask
from detect.metrics import auroc
from detect.models.memory.dfm import Dfm
from detect.models.memory.dfm.torch_model import PcaScorer, fit_pca

SIZE = 64


def _evaluate(detector, defect_set, samples, size):
    labels = np.array([s.is_anomalous for s in samples])
    masks = np.stack([resize_mask(defect_set.load_mask(s), size) for s in samples])
    prediction = detector.predict([defect_set.image_path(s) for s in samples])
    return prediction, auroc(prediction.scores, labels), auroc(prediction.anomaly_maps, masks)


@pytest.fixture(scope="module")
def fitted(brick_set):
    detector = Dfm(image_size=SIZE, pooling_kernel=1).fit(brick_set, progress=False)
    test = brick_set.select(split="test")
    return detector, test, _evaluate(detector, brick_set, test, SIZE)


def test_learns_brick_defects(fitted):
    detector, _, (prediction, image_auroc, pixel_auroc) = fitted
    assert prediction.anomaly_maps.shape == (24, SIZE, SIZE)
    assert image_auroc >= 0.90, image_auroc
    assert pixel_auroc >= 0.85, pixel_auroc
    components = detector.model.pca.components
    assert 1 <= components.shape[1] < 112  # 97 % of the variance in fewer dimensions than the 112 channels
    torch.testing.assert_close(components.T @ components, torch.eye(components.shape[1]), atol=1e-4, rtol=0)


def test_data_dependent_pca_buffer_round_trips(fitted, tmp_path):
    # The generic round trip (same scores and maps) is in test_detector_contract.py.
    detector = fitted[0]
    loaded = detect.load(detector.save(tmp_path / "dfm"))
    assert loaded.model.pca.components.shape == detector.model.pca.components.shape  # data-dependent buffer


def _low_rank_data(rng, n=50, dim=10, rank=3):
    basis = np.linalg.qr(rng.normal(size=(dim, rank)))[0]  # orthonormal (dim, rank)
    offset = rng.normal(size=dim)
    data = offset + (rng.normal(size=(n, rank)) * [3.0, 2.0, 1.0][:rank]) @ basis.T
    return data, basis, offset


def test_reconstruction_error_is_zero_inside_the_subspace_and_the_squared_distance_outside():
    rng = np.random.default_rng(0)
    data, basis, offset = _low_rank_data(rng)
    model = PcaScorer(10, "fre")
    model.fit(torch.from_numpy(data), level=0.999)
    assert model.components.shape == (10, 3)  # exactly the rank of the data
    inside = model(torch.from_numpy(data[:5]).float())
    assert inside.abs().max() < 1e-4
    normal = np.linalg.svd(basis.T)[2][-1]  # a unit direction orthogonal to the subspace
    outside = torch.from_numpy(data[:5] + 2.5 * normal).float()
    torch.testing.assert_close(model(outside), torch.full((5,), 2.5**2), atol=1e-3, rtol=1e-3)


def test_nll_matches_scipy_gaussian_in_pca_space():
    rng = np.random.default_rng(1)
    data = rng.normal(size=(200, 4)) @ rng.normal(size=(4, 4))
    mean, components, eigenvalues = fit_pca(torch.from_numpy(data), level=1.0)
    assert components.shape == (4, 4)
    model = PcaScorer(4, "nll")
    model.fit(torch.from_numpy(data), level=1.0)
    queries = rng.normal(size=(6, 4))
    projected = (queries - mean.numpy()) @ components.numpy()
    expected = -multivariate_normal(mean=np.zeros(4), cov=np.diag(eigenvalues.numpy())).logpdf(projected)
    np.testing.assert_allclose(model(torch.from_numpy(queries).float()).numpy(), expected, rtol=1e-4)
    # With all components kept, that is the NLL of the data's own Gaussian (sample covariance).
    full = -multivariate_normal(mean=data.mean(0), cov=np.cov(data, rowvar=False)).logpdf(queries)
    np.testing.assert_allclose(expected, full, rtol=1e-6)


@pytest.mark.real_data
def test_magnetic_tile(magnetic_tile):
    """30 train/good images; 30 good + 30 defect test images at 128 px, pooling_kernel 2. Measured AUROC 0.76."""
    from synth.core.defect_set import read_defect_set

    defect_set = read_defect_set(magnetic_tile)
    rng = np.random.default_rng(0)

    def pick(samples, n):
        return [samples[i] for i in sorted(rng.choice(len(samples), n, replace=False))]

    train = pick(defect_set.select(split="train"), 30)
    test = pick(defect_set.select(split="test", anomalous=False), 30) + pick(
        defect_set.select(split="test", anomalous=True), 30)
    detector = Dfm(image_size=128, pooling_kernel=2).fit([defect_set.image_path(s) for s in train], progress=False)
    _, image_auroc, _ = _evaluate(detector, defect_set, test, 128)
    assert image_auroc >= 0.68, image_auroc
