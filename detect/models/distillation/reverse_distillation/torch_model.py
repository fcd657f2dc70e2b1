"""Reverse Distillation inference module: frozen encoder -> one-class bottleneck -> decoder (student).

Deng, Li: "Anomaly Detection via Reverse Distillation from One-Class Embedding", CVPR 2022 (arXiv 2201.10703).

- Encoder (teacher): the pretrained backbone, frozen; three consecutive stages (``layers``, strides s, 2s, 4s
  with channels C1, C2, C3) are the targets.
- One-class bottleneck embedding (OCBE, trained):
  multi-scale feature fusion (MFF): stage 1 is brought to stage 3's resolution by two strided 3x3 conv +
  BN + ReLU (C1 -> C2 -> C3), stage 2 by one (C2 -> C3); both are concatenated with stage 3 (3 * C3
  channels); one-class embedding (OCE): a residual stage of bottleneck blocks, the first with stride 2,
  giving the compact embedding of 2 * C3 channels at stride 8s (as 3 x 1024 -> 2048 for WideResNet-50).
- Decoder (student, trained): mirrors the encoder, three residual stages of bottleneck blocks whose first
  block upsamples by 2 with transposed 2x2 convolutions (in the residual branch and the shortcut),
  reconstructing C3, C2 and C1 channels at strides 4s, 2s and s.
- Anomaly map: per stage ``1 - cos(encoder, decoder)`` at every position, bilinearly upsampled to the input
  size, summed over the stages (or multiplied), then smoothed with a Gaussian (sigma 4). Image score: the max.

Bottleneck widths follow WideResNet-50-2 (the paper's backbone): the inner width of a block is half its output
channels. Deviation: each decoder stage's last block has no final ReLU. ResNet stage outputs (the paper's
targets) are post-ReLU, but EfficientNet's (the default backbone here) are linear projections, about half
negative, which a ReLU output could never point towards; a linear output fits both.

``forward`` is plain torch: exporting the module exports the whole model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detect.models.components.blur import AnomalyMapSmoother
from detect.models.components.feature_extractor import FeatureExtractor

MAP_MODES = ("sum", "product")


def match_size(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop (transposed convolutions overshoot odd sizes by one) or, if smaller, resize ``x`` to ``size``."""
    h, w = int(size[0]), int(size[1])
    if x.shape[-2:] == (h, w):
        return x
    if x.shape[-2] >= h and x.shape[-1] >= w:
        return x[..., :h, :w]
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)


def conv_bn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, *, relu: bool = True
            ) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 -> 1x1, BN, residual) with a stride-2 3x3 to downsample, or a transposed
    2x2 stride-2 convolution instead of the 3x3 to upsample (the decoder's blocks)."""

    def __init__(self, in_channels: int, out_channels: int, *, resample: str | None = None, out_relu: bool = True):
        super().__init__()
        self.out_relu = out_relu
        width = max(out_channels // 2, 1)
        self.reduce = conv_bn(in_channels, width, 1)
        if resample == "up":
            self.spatial = nn.Sequential(nn.ConvTranspose2d(width, width, kernel_size=2, stride=2, bias=False),
                                         nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        else:
            self.spatial = conv_bn(width, width, 3, stride=2 if resample == "down" else 1)
        self.expand = conv_bn(width, out_channels, 1, relu=False)
        self.shortcut: nn.Module
        if resample == "up":
            self.shortcut = nn.Sequential(
                nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2, bias=False),
                nn.BatchNorm2d(out_channels))
        elif resample == "down" or in_channels != out_channels:
            self.shortcut = conv_bn(in_channels, out_channels, 1, stride=2 if resample == "down" else 1, relu=False)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(self.spatial(self.reduce(x))) + self.shortcut(x)
        return F.relu(out) if self.out_relu else out


def residual_stage(in_channels: int, out_channels: int, blocks: int, resample: str, *, out_relu: bool = True
                   ) -> nn.Sequential:
    """``blocks`` bottlenecks; the first resamples ("down" or "up") and changes the channels. Without
    ``out_relu`` the last block's output is linear (signed)."""
    layers = [Bottleneck(in_channels, out_channels, resample=resample, out_relu=out_relu or blocks > 1)]
    layers += [Bottleneck(out_channels, out_channels, out_relu=out_relu or i < blocks - 1) for i in range(1, blocks)]
    return nn.Sequential(*layers)


class OneClassBottleneck(nn.Module):
    """OCBE: multi-scale feature fusion of the three encoder stages + one-class embedding (residual stage)."""

    def __init__(self, channels: Sequence[int], blocks: int):
        super().__init__()
        c1, c2, c3 = channels
        self.fuse1 = nn.Sequential(conv_bn(c1, c2, 3, stride=2), conv_bn(c2, c3, 3, stride=2))
        self.fuse2 = conv_bn(c2, c3, 3, stride=2)
        self.embed = residual_stage(3 * c3, 2 * c3, blocks, resample="down")
        self.out_channels = 2 * c3

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        f1, f2, f3 = features
        size = f3.shape[-2:]
        return self.embed(torch.cat([match_size(self.fuse1(f1), size), match_size(self.fuse2(f2), size), f3], dim=1))


class Decoder(nn.Module):
    """Student decoder: embedding (2 * C3, stride 8s) -> [C1 at s, C2 at 2s, C3 at 4s] (encoder order)."""

    def __init__(self, channels: Sequence[int], blocks: Sequence[int]):
        super().__init__()
        c1, c2, c3 = channels
        self.stage3 = residual_stage(2 * c3, c3, blocks[0], resample="up", out_relu=False)
        self.stage2 = residual_stage(c3, c2, blocks[1], resample="up", out_relu=False)
        self.stage1 = residual_stage(c2, c1, blocks[2], resample="up", out_relu=False)

    def forward(self, embedding: torch.Tensor, sizes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """``sizes``: the encoder stages' (h, w), which the outputs are cropped to when the strides overshoot."""
        f3 = match_size(self.stage3(embedding), sizes[2])
        f2 = match_size(self.stage2(f3), sizes[1])
        f1 = match_size(self.stage1(f2), sizes[0])
        return [f1, f2, f3]


def reset_parameters(module: nn.Module, generator: torch.Generator) -> None:
    """Reference initialisation drawn from ``generator``: He normal (fan-out) convolutions, PyTorch's default
    for transposed convolutions, BatchNorm weight 1 / bias 0 with fresh running statistics."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu", generator=generator)
        elif isinstance(layer, nn.ConvTranspose2d):
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
            layer.reset_running_stats()


def cosine_distance(encoder: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` along channels at every position: (N, C, h, w) twice -> (N, h, w)."""
    return 1.0 - F.cosine_similarity(encoder, decoder, dim=1)


def rd_loss(encoder: Sequence[torch.Tensor], decoder: Sequence[torch.Tensor], *, flatten: bool = False
            ) -> torch.Tensor:
    """Sum over stages of the mean ``1 - cos``: per position (paper, Eq. 2-3) or, with ``flatten``, of each
    image's whole feature map as one vector (the reference code's variant)."""
    terms = []
    for e, d in zip(encoder, decoder, strict=True):
        if flatten:
            terms.append((1.0 - F.cosine_similarity(e.flatten(1), d.flatten(1), dim=1)).mean())
        else:
            terms.append(cosine_distance(e, d).mean())
    return torch.stack(terms).sum()


class ReverseDistillationModel(nn.Module):
    """Images in [0, 1] (N, 3, S, S) -> (scores (N,), anomaly maps (N, S, S))."""

    def __init__(self, encoder: FeatureExtractor, *, ocbe_blocks: int = 3, decoder_blocks: Sequence[int] = (3, 4, 6),
                 map_mode: str = "sum", blur_sigma: float = 4.0):
        super().__init__()
        if len(encoder.channels) != 3:
            raise ValueError("reverse distillation needs exactly three encoder stages")
        if map_mode not in MAP_MODES:
            raise ValueError(f"map_mode must be one of {MAP_MODES}, got {map_mode!r}")
        self.encoder = encoder
        self.bottleneck = OneClassBottleneck(encoder.channels, ocbe_blocks)
        self.decoder = Decoder(encoder.channels, decoder_blocks)
        self.map_mode = map_mode
        self.upsample = AnomalyMapSmoother(sigma=0.0)
        self.smoother = AnomalyMapSmoother(sigma=blur_sigma)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder(images)

    def reconstruct(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Decoder features from the encoder features, through the one-class embedding."""
        return self.decoder(self.bottleneck(features), [f.shape[-2:] for f in features])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = (images.shape[-2], images.shape[-1])
        features = self.encode(images)
        combined: torch.Tensor | None = None
        for e, d in zip(features, self.reconstruct(features), strict=True):
            level = self.upsample(cosine_distance(e, d), size)
            if combined is None:
                combined = level
            elif self.map_mode == "product":
                combined = combined * level
            else:
                combined = combined + level
        assert combined is not None
        maps = self.smoother(combined, size) if self.smoother.sigma > 0 else combined
        return maps.flatten(1).amax(dim=1), maps
