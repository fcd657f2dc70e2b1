"""Weight initialisation shared by detectors trained from scratch (seeded, so the same seed gives the same model)."""

from __future__ import annotations

import torch
from torch import nn


def dcgan_init(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """DCGAN / reference initialisation: conv weights N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0,
    fresh running statistics; drawn from ``generator`` (reproducible)."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(layer.weight, 0.0, 0.02, generator=generator)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.normal_(layer.weight, 1.0, 0.02, generator=generator)
            nn.init.zeros_(layer.bias)
            layer.reset_running_stats()
