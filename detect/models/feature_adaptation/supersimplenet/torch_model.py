"""SuperSimpleNet inference module: upscaled pretrained features, a linear adaptor and two discriminative heads.

Rolih, Fučka, Skočaj: "SuperSimpleNet: Unifying Unsupervised and Supervised Learning for Fast and Reliable
Surface Defect Detection", ICPR 2024 (arXiv 2408.03143).

- Feature extraction (frozen): the backbone's ``layers`` (paper: WideResNet50 layers 2 and 3; here by default
  tf_efficientnet_lite0 indices 2 and 3, strides 8 and 16) are bilinearly upscaled to ``upscale`` (2) times the
  size of the first (largest) one, concatenated along channels and average-pooled over a ``pool_size`` (3x3)
  neighbourhood (stride 1) so each position sees its local context. The feature map is at 1/4 of the input.
- Feature adaptor: a 1x1 convolution (a per-position linear layer), channels in = channels out.
- Segmentation head: 1x1 conv (C -> ``hidden_dim``, 1024) + BatchNorm + LeakyReLU(0.2) + 1x1 conv (-> 1, no bias):
  the anomaly-map logits at feature resolution.
- Classification head: a 5x5 conv block (C + 1 -> 128, BatchNorm, ReLU) over the adapted features concatenated
  with the map; global max and average pooling of its output and of the map (128 * 2 + 2 values) feed one linear
  layer: the image logit. With ``stop_grad`` (the paper's unsupervised setting) the map enters the
  classification head detached, so the classification loss does not train the segmentation head.
- Output: the image score is the classification head's logit (the paper reports its sigmoid; the logit is the
  same ranking without float32 saturation to 1.0, and the detector calibrates thresholds on it). The map logits
  are bilinearly upsampled to the input size and smoothed with a Gaussian of sigma 4 (``AnomalyMapSmoother``).
  ``score_mode="map_max"`` scores images by the maximum of that map instead (the reference code's second image
  metric, "seg-I-AUROC"; it needs no trained classification head).

Training-time anomaly generation and losses live in ``anomaly_generator.py``, ``losses.py`` and ``detector.py``;
``forward`` is the plain inference path, so exporting the module exports the whole model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from detect.models.components.blur import AnomalyMapSmoother
from detect.models.components.feature_extractor import FeatureExtractor

CLS_CHANNELS = 128  # classification conv block width (paper)
SCORE_MODES = ("cls", "map_max")


class SegmentationDetectionHead(nn.Module):
    """Adapted features (N, C, h, w) -> (map logits (N, 1, h, w), image logits (N,))."""

    def __init__(self, channels: int, hidden_dim: int = 1024, *, stop_grad: bool = True):
        super().__init__()
        self.stop_grad = stop_grad
        self.seg = nn.Sequential(
            nn.Conv2d(channels, hidden_dim, kernel_size=1),
            nn.BatchNorm2d(hidden_dim),
            nn.LeakyReLU(0.2),
            nn.Conv2d(hidden_dim, 1, kernel_size=1, bias=False),
        )
        self.cls_conv = nn.Sequential(
            nn.Conv2d(channels + 1, CLS_CHANNELS, kernel_size=5, padding=2),
            nn.BatchNorm2d(CLS_CHANNELS),
            nn.ReLU(),
        )
        self.cls_fc = nn.Linear(2 * CLS_CHANNELS + 2, 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seg_map = self.seg(features)
        # Stop-gradient (unsupervised setting): the classification loss must not reshape the segmentation head.
        map_in = seg_map.detach() if self.stop_grad else seg_map
        conv = self.cls_conv(torch.cat([features, map_in], dim=1))
        pooled = torch.cat([conv.amax(dim=(2, 3)), conv.mean(dim=(2, 3)),
                            map_in.amax(dim=(2, 3)), map_in.mean(dim=(2, 3))], dim=1)
        return seg_map, self.cls_fc(pooled).squeeze(1)


def init_trainable(module: nn.Module, generator: torch.Generator) -> None:
    """Reproducible initialisation of the adaptor and heads, drawn from ``generator``.

    Weights of convolutions and linear layers: Xavier normal (the reference code); their biases: PyTorch's
    default U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (which the reference keeps); BatchNorm: weight 1, bias 0, fresh
    running statistics.
    """
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(layer.weight, generator=generator)
            if layer.bias is not None:
                fan_in = layer.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
            layer.reset_running_stats()


class SuperSimpleNetModel(nn.Module):
    """Images in [0, 1] (N, 3, S, S) -> (scores (N,), anomaly maps (N, S, S))."""

    def __init__(self, extractor: FeatureExtractor, *, upscale: int = 2, pool_size: int = 3,
                 hidden_dim: int = 1024, stop_grad: bool = True, blur_sigma: float = 4.0, score_mode: str = "cls"):
        super().__init__()
        if score_mode not in SCORE_MODES:
            raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
        self.score_mode = score_mode
        self.feature_extractor = extractor
        self.upscale = int(upscale)
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2) if pool_size > 1 else nn.Identity()
        self.channels = sum(extractor.channels)
        self.adaptor = nn.Conv2d(self.channels, self.channels, kernel_size=1)
        self.head = SegmentationDetectionHead(self.channels, hidden_dim, stop_grad=stop_grad)
        self.smoother = AnomalyMapSmoother(sigma=blur_sigma)

    def feature_size(self, image_size: int) -> int:
        """Side of the (square) feature map for square inputs of ``image_size``."""
        return math.ceil(image_size / self.feature_extractor.reductions[0]) * self.upscale

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen part: upscaled, concatenated and locally pooled backbone features (N, C, h, w)."""
        levels = self.feature_extractor(images)
        h, w = levels[0].shape[-2:]
        size = (h * self.upscale, w * self.upscale)
        # align_corners=True as the reference code.
        upscaled = [F.interpolate(level, size=size, mode="bilinear", align_corners=True) for level in levels]
        return self.pool(torch.cat(upscaled, dim=1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seg_map, score = self.head(self.adaptor(self.features(images)))
        maps = self.smoother(seg_map, (images.shape[-2], images.shape[-1]))
        if self.score_mode == "map_max":
            score = maps.flatten(1).amax(dim=1)
        return score, maps
