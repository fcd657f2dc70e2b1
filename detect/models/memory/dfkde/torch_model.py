"""DFKDE (Deep Feature Kernel Density Estimation, as in Anomalib): image-level only.

Globally average-pooled backbone features -> PCA to ``n_components`` -> feature scaling -> Gaussian kernel
density estimate of the normal training vectors (bandwidth by Scott's rule, the estimator of
``scipy.stats.gaussian_kde``). The image score is the negative log density, computed with a log-sum-exp so
that far-away anomalies do not underflow to a density of 0.

DFKDE does not localise: pooled features have no spatial extent, so the anomaly map is the image score
broadcast over the whole image (a constant map).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from detect.models.components.feature_extractor import FeatureExtractor

SCALING_METHODS = ("scale", "norm", "none")


def fit_pca(features: torch.Tensor, n_components: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (C,) and the first ``n_components`` principal axes (C, k) of ``features`` (N, C), via SVD."""
    mean = features.mean(dim=0)
    _, _, v_h = torch.linalg.svd(features - mean, full_matrices=False)
    return mean, v_h[:n_components].T.contiguous()


def scott_bandwidth(data: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """Kernel covariance by Scott's rule, as scipy's gaussian_kde: cov(data) * n ** (-2 / (d + 4)).

    ``ridge`` adds ``ridge * mean(diag(cov)) * I`` to the data covariance (0 reproduces scipy exactly; a tiny
    value keeps it invertible when the training vectors are nearly collinear).
    """
    n, d = data.shape
    covariance = torch.cov(data.T, correction=1).reshape(d, d)
    if ridge > 0:
        covariance = covariance + ridge * covariance.diagonal().mean().clamp_min(1e-12) * torch.eye(d, dtype=data.dtype)
    factor = n ** (-1.0 / (d + 4))
    return covariance * factor**2


def kde_whitening(kernel_covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrix W with W W^T = inverse(kernel covariance), and the log normaliser of one Gaussian kernel."""
    d = kernel_covariance.shape[0]
    cholesky = torch.linalg.cholesky(kernel_covariance)  # L L^T = K  ->  K^-1 = L^-T L^-1
    identity = torch.eye(d, dtype=kernel_covariance.dtype)
    whitening = torch.linalg.solve_triangular(cholesky, identity, upper=False).T  # L^-T
    log_norm = -torch.log(cholesky.diagonal()).sum() - 0.5 * d * math.log(2 * math.pi)
    return whitening, log_norm


def kde_log_density(points: torch.Tensor, dataset: torch.Tensor, log_norm: torch.Tensor) -> torch.Tensor:
    """log of (1/n) sum_i N(x; x_i, K) for whitened ``points`` (M, d) and whitened ``dataset`` (n, d)."""
    squared = (points.pow(2).sum(1, keepdim=True) + dataset.pow(2).sum(1).unsqueeze(0)
               - 2 * points @ dataset.T).clamp_min(0)
    return torch.logsumexp(-0.5 * squared, dim=1) - math.log(dataset.shape[0]) + log_norm


class KdeHead(nn.Module):
    """PCA + feature scaling + Gaussian KDE on feature vectors; every fitted quantity is a buffer."""

    def __init__(self, channels: int, n_components: int, feature_scaling: str):
        super().__init__()
        self.feature_scaling = feature_scaling
        self.register_buffer("pca_mean", torch.zeros(channels))
        self.register_buffer("pca_components", torch.zeros(channels, n_components))
        self.register_buffer("max_norm", torch.ones(()))
        self.register_buffer("whitening", torch.eye(n_components))
        self.register_buffer("dataset", torch.zeros(0, n_components))  # whitened training vectors
        self.register_buffer("log_norm", torch.zeros(()))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """PCA projection (N, k), then feature scaling."""
        projected = (features - self.pca_mean) @ self.pca_components
        if self.feature_scaling == "scale":
            projected = projected / self.max_norm
        elif self.feature_scaling == "norm":
            projected = projected / torch.linalg.vector_norm(projected, dim=1, keepdim=True).clamp_min(1e-12)
        return projected

    @torch.no_grad()
    def fit(self, features: torch.Tensor, n_components: int, ridge: float = 1e-6) -> None:
        """Fit PCA, scaling and the KDE on training features (N, C), in float64.

        The PCA keeps at most N - 1 components (N points span N - 1 dimensions), so the KDE covariance is
        invertible; ``ridge`` (see :func:`scott_bandwidth`) guards against nearly collinear vectors.
        """
        features = features.to(torch.float64)
        k = max(1, min(n_components, features.shape[0] - 1, features.shape[1]))
        mean, components = fit_pca(features, k)
        projected = (features - mean) @ components
        self.pca_mean = mean.float()
        self.pca_components = components.float()
        self.max_norm = torch.linalg.vector_norm(projected, dim=1).max().clamp_min(1e-12).float()
        vectors = self.project(features.float()).to(torch.float64)
        whitening, log_norm = kde_whitening(scott_bandwidth(vectors, ridge=ridge))
        self.whitening = whitening.float().contiguous()
        self.dataset = (vectors @ whitening).float().contiguous()
        self.log_norm = log_norm.float()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Log density (N,) of feature vectors (N, C) (in the projected, scaled space)."""
        return kde_log_density(self.project(features) @ self.whitening, self.dataset, self.log_norm)


class DfkdeModel(nn.Module):
    """Frozen extractor + KDE head; ``forward`` -> (scores (N,), constant maps (N, S, S))."""

    def __init__(self, extractor: FeatureExtractor, *, n_components: int, feature_scaling: str):
        super().__init__()
        self.extractor = extractor
        self.kde = KdeHead(sum(extractor.channels), n_components, feature_scaling)

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled features of every layer, concatenated: (N, C)."""
        return torch.cat([F.adaptive_avg_pool2d(f, 1).flatten(1) for f in self.extractor(images)], dim=1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = -self.kde(self.pooled_features(images))
        maps = scores.view(-1, 1, 1).expand(-1, images.shape[-2], images.shape[-1]).contiguous()
        return scores, maps
