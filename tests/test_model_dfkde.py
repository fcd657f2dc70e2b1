"""DFKDE: learns the brick defects and its KDE is scipy's gaussian_kde.

Learning bar (brick_set, image_size 64, layers [2]: the planted spots and scratches are small, local changes
that the default stride-32 layer [4] averages away, image AUROC 0.45 there): measured image AUROC 0.85,
asserted >= 0.75. DFKDE is image-level only: its anomaly maps are constant.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import gaussian_kde

from detect.metrics import auroc
from detect.models.memory.dfkde import Dfkde
from detect.models.memory.dfkde.torch_model import KdeHead

SIZE = 64


@pytest.fixture(scope="module")
def fitted(brick_set):
    detector = Dfkde(image_size=SIZE, layers=[2]).fit(brick_set, progress=False)
    test = brick_set.select(split="test")
    prediction = detector.predict([brick_set.image_path(s) for s in test])
    labels = np.array([s.is_anomalous for s in test])
    return detector, test, prediction, auroc(prediction.scores, labels)


def test_learns_brick_defects(fitted):
    detector, _, prediction, image_auroc = fitted
    assert image_auroc >= 0.75, image_auroc
    # No localisation: each map is its image's score everywhere.
    assert prediction.anomaly_maps.shape == (24, SIZE, SIZE)
    np.testing.assert_array_equal(prediction.anomaly_maps, np.broadcast_to(prediction.scores[:, None, None],
                                                                           prediction.anomaly_maps.shape))
    # 12 or 13 training images after the validation hold-out: the PCA keeps at most N - 1 components.
    n_train = detector.model.kde.dataset.shape[0]
    assert detector.model.kde.pca_components.shape == (40, min(16, n_train - 1))


@pytest.mark.parametrize("scaling", ["scale", "norm", "none"])
def test_log_density_matches_scipy_gaussian_kde(scaling):
    rng = np.random.default_rng(0)
    channels, n_components = 12, 4
    train = rng.normal(size=(300, channels)) @ rng.normal(size=(channels, channels))
    queries = np.r_[train[:5] + 0.1 * rng.normal(size=(5, channels)), 3 * rng.normal(size=(5, channels))]
    head = KdeHead(channels, n_components, scaling)
    head.fit(torch.from_numpy(train), n_components)
    projected_train = head.project(torch.from_numpy(train).float()).double().numpy()
    projected_queries = head.project(torch.from_numpy(queries).float()).double().numpy()
    reference = gaussian_kde(projected_train.T, bw_method="scott")
    expected = reference.logpdf(projected_queries.T)
    got = head(torch.from_numpy(queries).float()).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)
    # Far-away points keep a finite log density (log-sum-exp) where the plain density underflows to 0.
    far = head(torch.from_numpy(100 * queries[-1:]).float())
    assert torch.isfinite(far).all()


def test_training_vectors_are_capped(brick_set):
    train = [brick_set.image_path(s) for s in brick_set.select(split="train")[:8]]
    detector = Dfkde(image_size=SIZE, layers=[1], max_training_points=6, val_fraction=0.0,
                     threshold_method="percentile").fit(train, progress=False)
    assert detector.model.kde.dataset.shape == (6, 5)  # 6 points kept, so 5 PCA components


