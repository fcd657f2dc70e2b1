"""A frozen timm feature pyramid that takes images in [0, 1] and normalises them itself.

Normalisation lives inside the module (as buffers) so the exported model and the in-framework model see
exactly the same input: images in [0, 1], (N, 3, H, W).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from synth.core.backbones import DEFAULT_BACKBONE, create_feature_extractor, freeze, imagenet_normalization


@dataclass
class BackboneConfig:
    """Config fields of detectors built on a pretrained CNN (mixed into their Config dataclasses).

    backbone: any timm model name; the default's ImageNet weights ship with PixelVision (offline).
    layers: timm feature indices used (for tf_efficientnet_lite0: 1..4 have strides 4, 8, 16, 32).
    weights: a local weights file (.safetensors/.pth) when the backbone's weights cannot be downloaded.
    """

    backbone: str = DEFAULT_BACKBONE
    layers: list[int] = field(default_factory=lambda: [2, 3])
    pretrained: bool = True
    weights: str | None = None


class FeatureExtractor(nn.Module):
    """Frozen backbone returning the feature maps of ``layers`` for [0, 1] images."""

    def __init__(self, backbone: str = DEFAULT_BACKBONE, layers: Sequence[int] = (2, 3), *, pretrained: bool = True,
                 weights: str | None = None, trainable: bool = False):
        super().__init__()
        self.backbone_name = backbone
        self.layers = list(layers)
        self.body = create_feature_extractor(backbone, out_indices=self.layers, pretrained=pretrained,
                                             weights=weights)
        if not trainable:
            freeze(self.body)
        mean, std = imagenet_normalization(backbone)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.channels: list[int] = list(self.body.feature_info.channels())
        self.reductions: list[int] = list(self.body.feature_info.reduction())

    def train(self, mode: bool = True) -> FeatureExtractor:
        # A frozen backbone keeps its BatchNorm statistics even when the detector's head trains.
        super().train(mode)
        if not any(p.requires_grad for p in self.body.parameters()):
            self.body.eval()
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.body((images - self.mean) / self.std)

    @torch.no_grad()
    def feature_shapes(self, image_size: int) -> list[tuple[int, int, int]]:
        """(channels, height, width) of each selected feature map for a square input of ``image_size``."""
        return [tuple(f.shape[1:]) for f in self(torch.zeros(1, 3, image_size, image_size))]


def build_feature_extractor(config: BackboneConfig, *, loading: bool = False, trainable: bool = False
                            ) -> FeatureExtractor:
    """The extractor for a detector config; when ``loading`` a saved model, weights come from its file."""
    return FeatureExtractor(config.backbone, config.layers, pretrained=config.pretrained and not loading,
                            weights=None if loading else config.weights, trainable=trainable)
