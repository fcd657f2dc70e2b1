"""DFM (Deep Feature Modeling, Ahuja et al., 2019): PCA of pooled deep features.

A backbone layer's feature map is average-pooled (``pooling_kernel`` x ``pooling_kernel``, stride the same);
every position of the pooled map is one C-dimensional feature vector. Training fits one PCA to all training
vectors (every image, every position; torch.linalg.svd of the centred matrix) and keeps the fewest components
that explain ``pca_level`` of the variance. Each position is then scored:

- ``"fre"``: feature reconstruction error, the squared distance of the vector to its projection on the kept
  principal subspace (``||x - mean - V V^T (x - mean)||^2``);
- ``"nll"``: Gaussian negative log-likelihood of the projected vector in the kept subspace (eigenvalues as
  variances).

The per-position scores form the anomaly map (upsampled bilinearly to the input size); the image score is the
map's maximum over positions. Unlike Anomalib, which flattens the whole pooled map into one vector, the PCA
is shared by all positions, so the map localises and a few training images give many training vectors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from detect.models.components.feature_extractor import FeatureExtractor

SCORE_TYPES = ("fre", "nll")


def fit_pca(features: torch.Tensor, level: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PCA of ``features`` (N, C) keeping the fewest components that explain ``level`` of the variance.

    Returns mean (C,), components (C, k) with orthonormal columns, eigenvalues (k,) (variances, n - 1).
    """
    features = features.to(torch.float64)
    n = features.shape[0]
    mean = features.mean(dim=0)
    _, singular, v_h = torch.linalg.svd(features - mean, full_matrices=False)
    variance = singular.pow(2)
    total = variance.sum()
    if total <= 0:
        k = 1
    else:
        ratio = torch.cumsum(variance, 0) / total
        k = int(torch.searchsorted(ratio, torch.tensor([level], dtype=ratio.dtype) - 1e-12).item()) + 1
        k = min(k, len(singular))
    eigenvalues = variance[:k] / max(n - 1, 1)
    return mean, v_h[:k].T.contiguous(), eigenvalues


class PcaScorer(nn.Module):
    """The PCA model and its per-vector score; mean, components and eigenvalues are buffers."""

    def __init__(self, channels: int, score_type: str):
        super().__init__()
        self.score_type = score_type
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("components", torch.zeros(channels, 1))
        self.register_buffer("eigenvalues", torch.ones(1))

    @torch.no_grad()
    def fit(self, vectors: torch.Tensor, level: float) -> None:
        """Fit the PCA on training vectors (M, C) (float64 SVD)."""
        mean, components, eigenvalues = fit_pca(vectors, level)
        self.mean = mean.float()
        self.components = components.float()
        # Floor tiny eigenvalues so the NLL stays finite for (near-)degenerate directions.
        self.eigenvalues = eigenvalues.clamp_min(eigenvalues.max().clamp_min(1e-30) * 1e-10).float()

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        """Per-vector score (M,) for vectors (M, C): reconstruction error ("fre") or Gaussian NLL ("nll")."""
        centred = vectors - self.mean
        projected = centred @ self.components
        if self.score_type == "fre":
            residual = centred - projected @ self.components.T
            return residual.pow(2).sum(dim=1)
        k = self.eigenvalues.numel()
        return 0.5 * ((projected.pow(2) / self.eigenvalues).sum(dim=1)
                      + torch.log(self.eigenvalues).sum() + k * math.log(2 * math.pi))


class DfmModel(nn.Module):
    """Frozen extractor + shared PCA scorer; ``forward`` -> (scores (N,), maps (N, S, S))."""

    def __init__(self, extractor: FeatureExtractor, *, pooling_kernel: int, score_type: str):
        super().__init__()
        self.extractor = extractor
        self.pooling_kernel = pooling_kernel
        self.pca = PcaScorer(sum(extractor.channels), score_type)

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled feature map (N, C, h, w) (layers upsampled to the first one's size and concatenated)."""
        features = self.extractor(images)
        size = features[0].shape[-2:]
        features = [features[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                                    for f in features[1:]]
        stacked = torch.cat(features, dim=1) if len(features) > 1 else features[0]
        if self.pooling_kernel > 1:
            stacked = F.avg_pool2d(stacked, self.pooling_kernel, stride=self.pooling_kernel, ceil_mode=True)
        return stacked

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.pooled_features(images)
        n, c, h, w = pooled.shape
        scores = self.pca(pooled.permute(0, 2, 3, 1).reshape(n * h * w, c)).view(n, 1, h, w)
        maps = F.interpolate(scores, size=images.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
        return scores.flatten(1).amax(dim=1), maps
