"""The defect-class classifier's torch module: normalisation inside, images in [0, 1] -> class logits.

As for the detectors (detect/base.py), the module is the whole inference: ``forward(images)`` takes RGB images in
[0, 1], shape (N, 3, S, S), applies the backbone's own normalisation (kept as buffers) and returns logits (N, C),
so an exported graph needs no preprocessing beyond resizing to S x S and dividing uint8 pixels by 255.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ClassifierModel(nn.Module):
    """A timm classification network with a ``num_classes`` head and its input normalisation."""

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone((images - self.mean) / self.std)
