"""Anomaly-map post-processing shared by detectors: upsampling and a fixed, exportable Gaussian blur."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian of size ``2 * int(4 * sigma + 0.5) + 1`` (33 taps for sigma 4, as Anomalib)."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def gaussian_blur(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (N, 1, H, W) maps with reflect padding (replicate when the kernel is wider
    than the map, where reflect is undefined)."""
    radius = kernel.numel() // 2
    if radius == 0:
        return maps
    kernel = kernel.to(maps.dtype)
    mode = "reflect" if radius < min(maps.shape[-2:]) else "replicate"
    maps = F.pad(maps, (radius, radius, radius, radius), mode=mode)
    maps = F.conv2d(maps, kernel.view(1, 1, 1, -1))
    return F.conv2d(maps, kernel.view(1, 1, -1, 1))


class AnomalyMapSmoother(nn.Module):
    """(N, h, w) or (N, 1, h, w) patch scores -> (N, S, S): bilinear upsampling, then Gaussian blur.

    sigma 0 disables the blur. The kernel is a non-persistent buffer: fixed by the config, never saved.
    """

    def __init__(self, sigma: float = 4.0):
        super().__init__()
        self.sigma = float(sigma)
        self.register_buffer("kernel", gaussian_kernel1d(sigma) if sigma > 0 else torch.ones(1), persistent=False)

    def forward(self, maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
        if maps.ndim == 3:
            maps = maps.unsqueeze(1)
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        if self.sigma > 0:
            maps = gaussian_blur(maps, self.kernel)
        return maps.squeeze(1)
