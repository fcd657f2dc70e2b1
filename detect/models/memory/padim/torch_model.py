"""PaDiM (Defard et al., 2020): one multivariate Gaussian per feature-map position.

Features of several backbone layers are upsampled to the first layer's resolution and concatenated; a fixed,
seeded random subset of ``n_features`` channels is kept. Training fits, at every position, the mean and the
covariance (plus ``eps * I``) of the normal embeddings; inference is the Mahalanobis distance of each
position's embedding to its Gaussian, upsampled to the input size and smoothed with a Gaussian blur. The
image score is the maximum of the map.

Everything inference needs (channel index, means, inverse covariances, blur kernel) is a buffer, and
``forward`` is plain torch, so exporting the module exports the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from detect.models.components.blur import gaussian_blur, gaussian_kernel1d
from detect.models.components.feature_extractor import FeatureExtractor


def mahalanobis(embedding: torch.Tensor, mean: torch.Tensor, inv_covariance: torch.Tensor) -> torch.Tensor:
    """Per-position Mahalanobis distance.

    embedding: (N, D, P); mean: (P, D); inv_covariance: (P, D, D). Returns (N, P).
    """
    delta = embedding.permute(2, 0, 1) - mean.unsqueeze(1)  # (P, N, D)
    squared = (torch.bmm(delta, inv_covariance) * delta).sum(dim=2)  # (P, N)
    return squared.clamp_min(0).sqrt().transpose(0, 1)


class RunningGaussian:
    """Per-position mean and covariance accumulated batch by batch (float64 running sums).

    Memory is O(P * D^2) whatever the number of training images, instead of keeping every embedding.
    """

    def __init__(self) -> None:
        self.count = 0
        self.sum: torch.Tensor | None = None  # (P, D)
        self.sum_outer: torch.Tensor | None = None  # (P, D, D)

    def update(self, embedding: torch.Tensor) -> None:
        """Add a batch of embeddings (N, D, P)."""
        x = embedding.detach().to(torch.float64).permute(2, 0, 1)  # (P, N, D)
        if self.sum is None or self.sum_outer is None:
            positions, _, d = x.shape
            self.sum = torch.zeros(positions, d, dtype=torch.float64)
            self.sum_outer = torch.zeros(positions, d, d, dtype=torch.float64)
        self.sum += x.sum(dim=1)
        self.sum_outer.baddbmm_(x.transpose(1, 2), x)  # in place: no second (P, D, D) buffer
        self.count += embedding.shape[0]

    def finalize(self, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (P, D) and unbiased covariance + ``eps * I`` (P, D, D), in float64.

        The covariance is computed in place in the running sum of outer products (which is then used up).
        """
        if self.sum is None or self.sum_outer is None or self.count < 1:
            raise ValueError("no embeddings were accumulated")
        n = self.count
        mean = self.sum / n
        # Unbiased covariance (like numpy.cov); a single sample gives the eps-regularised zero matrix.
        covariance = self.sum_outer.baddbmm_(mean.unsqueeze(2), mean.unsqueeze(1), alpha=-n).div_(max(n - 1, 1))
        covariance.diagonal(dim1=1, dim2=2).add_(eps)
        self.sum_outer = None
        return mean, covariance


class PadimModel(nn.Module):
    """Frozen feature extractor + per-position Gaussians; ``forward`` -> (scores (N,), maps (N, S, S))."""

    def __init__(self, extractor: FeatureExtractor, *, image_size: int, n_features: int, seed: int,
                 blur_sigma: float):
        super().__init__()
        self.extractor = extractor
        self.image_size = image_size
        total = sum(extractor.channels)
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(total, generator=generator)[:n_features].sort().values
        stride = extractor.reductions[0]
        side = math.ceil(image_size / stride)
        positions = side * side
        self.register_buffer("index", index)
        self.register_buffer("mean", torch.zeros(positions, n_features))
        self.register_buffer("inv_covariance", torch.zeros(positions, n_features, n_features))
        self.register_buffer("blur_kernel", gaussian_kernel1d(blur_sigma) if blur_sigma > 0 else torch.ones(1))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Random-subset embedding (N, n_features, h, w) at the first layer's resolution."""
        features = self.extractor(images)
        size = features[0].shape[-2:]
        maps = [features[0]] + [F.interpolate(f, size=size, mode="nearest") for f in features[1:]]
        return torch.cat(maps, dim=1).index_select(1, self.index)

    def set_gaussian(self, mean: torch.Tensor, covariance: torch.Tensor) -> None:
        """Store mean (P, D) and the inverse of covariance (P, D, D) (batched over positions, float64)."""
        inverse = torch.linalg.inv(covariance.to(torch.float64))
        inverse = 0.5 * (inverse + inverse.transpose(1, 2))
        self.mean = mean.to(torch.float32).contiguous()
        self.inv_covariance = inverse.to(torch.float32).contiguous()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embed(images)
        n, d, h, w = embedding.shape
        distance = mahalanobis(embedding.reshape(n, d, h * w), self.mean, self.inv_covariance)
        maps = distance.reshape(n, 1, h, w)
        maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
        maps = gaussian_blur(maps, self.blur_kernel).squeeze(1)
        scores = maps.flatten(1).amax(dim=1)
        return scores, maps
