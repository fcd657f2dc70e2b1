"""CFA inference module: frozen CNN patch features -> trained patch descriptor -> distance to a memory bank.

Lee, Lee, Song, "CFA: Coupled-hypersphere-based Feature Adaptation for Target-Oriented Anomaly Localization",
IEEE Access 2022.

- Patch features: each chosen backbone stage is smoothed with a 3x3 average pool (local neighbourhood
  aggregation), resized (bilinear) to the first stage's resolution and concatenated along channels.
- Patch descriptor generator: a "CoordConv" 1x1 convolution (two normalised coordinate channels appended to
  the input) mapping the C concatenated channels to C // gamma_d target-oriented features. It is the only
  trained part.
- Memory bank: target-oriented features of the normal training data (one vector per spatial position, the
  mean over the training images, optionally compressed by k-means), a buffer of shape (M, D).
- Score: squared distances to the K nearest memory features; the patch score is the nearest distance
  weighted by its softmin weight among the K (as in the authors' reference code), upsampled to the input
  size and smoothed with a fixed Gaussian (sigma 4). The image score is the maximum of the map.

Training (the coupled-hypersphere loss and the memory-bank initialisation) lives in ``detector.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from detect.models.components.blur import gaussian_blur, gaussian_kernel1d
from detect.models.components.feature_extractor import FeatureExtractor


class CoordConv1x1(nn.Module):
    """1x1 convolution over the input plus two coordinate channels (x and y, each in [-1, 1])."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 2, out_channels, kernel_size=1)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PyTorch's default Conv2d initialisation, drawn from ``generator`` (reproducible)."""
        nn.init.kaiming_uniform_(self.conv.weight, a=math.sqrt(5), generator=generator)
        fan_in = self.conv.weight.shape[1]
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.conv.bias, -bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        ys = torch.linspace(-1.0, 1.0, h, dtype=x.dtype, device=x.device).view(1, 1, h, 1).expand(n, 1, h, w)
        xs = torch.linspace(-1.0, 1.0, w, dtype=x.dtype, device=x.device).view(1, 1, 1, w).expand(n, 1, h, w)
        return self.conv(torch.cat([x, xs, ys], dim=1))


class CfaModel(nn.Module):
    """Images in [0, 1] (N, 3, S, S) -> (scores (N,), anomaly maps (N, S, S))."""

    def __init__(self, feature_extractor: FeatureExtractor, *, gamma_d: int = 1, k_nearest: int = 3,
                 sigma: float = 4.0):
        super().__init__()
        self.feature_extractor = feature_extractor
        self.in_channels = sum(feature_extractor.channels)
        self.out_channels = self.in_channels // gamma_d
        self.k_nearest = k_nearest
        self.descriptor = CoordConv1x1(self.in_channels, self.out_channels)
        # Filled by training (detector.py); data-dependent shape (M, D), resized by Detector.load_tensors.
        self.register_buffer("memory", torch.zeros(0, self.out_channels))
        self.register_buffer("blur_kernel", gaussian_kernel1d(sigma), persistent=False)

    # ----- pieces used by training as well ------------------------------------------------------------------
    @torch.no_grad()
    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen, locally averaged multi-stage features at the first stage's resolution: (N, C, h, w)."""
        stages = self.feature_extractor(images)
        size = stages[0].shape[-2:]
        out = []
        for stage in stages:
            stage = F.avg_pool2d(stage, kernel_size=3, stride=1, padding=1)
            if stage.shape[-2:] != size:
                stage = F.interpolate(stage, size=size, mode="bilinear", align_corners=False)
            out.append(stage)
        return torch.cat(out, dim=1)

    def describe(self, features: torch.Tensor) -> torch.Tensor:
        """Target-oriented features, flattened to (N, h*w, D)."""
        return self.descriptor(features).flatten(2).transpose(1, 2)

    def squared_distances(self, phi: torch.Tensor) -> torch.Tensor:
        """Squared Euclidean distances (N, P, M) from descriptors (N, P, D) to every memory feature."""
        memory = self.memory
        dist = (phi.pow(2).sum(-1, keepdim=True) + memory.pow(2).sum(-1).view(1, 1, -1)
                - 2.0 * phi @ memory.t())
        return dist.clamp_min(0.0)

    def blur(self, maps: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian smoothing of (N, 1, H, W) maps with reflect padding."""
        return gaussian_blur(maps, self.blur_kernel)

    # ----- inference ------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.patch_features(images)
        h, w = features.shape[-2:]
        phi = self.describe(features)
        dist = self.squared_distances(phi)
        nearest = dist.topk(min(self.k_nearest, dist.shape[-1]), dim=-1, largest=False).values
        patch_scores = F.softmin(nearest, dim=-1)[..., 0] * nearest[..., 0]
        maps = patch_scores.view(-1, 1, h, w)
        maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
        maps = self.blur(maps)[:, 0]
        return maps.flatten(1).amax(dim=1), maps
