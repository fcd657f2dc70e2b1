"""STFPM inference module: a frozen pretrained teacher and a student of the same architecture.

Wang, Wu, Cui, Zhang: "Student-Teacher Feature Pyramid Matching for Anomaly Detection", BMVC 2021
(arXiv 2103.04257).

- Teacher: the pretrained backbone, frozen; its feature pyramid (``layers``) is the regression target.
- Student: the same architecture, randomly initialised and trained (``detector.py``) to reproduce, on normal
  images only, the teacher's features at every position and every pyramid level.
- Features are L2-normalised along channels at each position. The per-level anomaly map is
  ``0.5 * ||t_hat - s_hat||^2`` (equal to ``1 - cos(t, s)``), bilinearly upsampled to the input size; the
  levels are combined by their product (paper) or their sum. The image score is the maximum of the map.
  An optional Gaussian blur (``blur_sigma``; the paper and its code use none) smooths the final map.

``forward`` is plain torch: exporting the module exports the whole model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from detect.models.components.blur import AnomalyMapSmoother
from detect.models.components.feature_extractor import FeatureExtractor

MAP_MODES = ("product", "sum")


def reset_parameters(module: nn.Module, generator: torch.Generator) -> None:
    """Random initialisation of every layer of ``module``, drawn from ``generator`` (reproducible).

    Convolutions: He normal with fan-out (timm's EfficientNet and torchvision's ResNet initialisation);
    normalisation layers: weight 1, bias 0 and fresh running statistics; linear layers: PyTorch's default.
    """
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)
            layer.reset_running_stats()
        elif isinstance(layer, nn.Linear):
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            if layer.bias is not None:
                bound = 1.0 / math.sqrt(layer.weight.shape[1])
                nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def layer_distance(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``0.5 * ||t/|t| - s/|s| ||^2`` at every position: (N, C, h, w) twice -> (N, h, w), in [0, 2]."""
    return 0.5 * (F.normalize(teacher, dim=1) - F.normalize(student, dim=1)).pow(2).sum(dim=1)


def stfpm_loss(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
    """Paper's Eq. (1)-(2): per level the mean over images and positions of ``layer_distance``, summed over
    levels (all level weights 1)."""
    return torch.stack([layer_distance(t, s).mean() for t, s in zip(teacher, student, strict=True)]).sum()


class StfpmModel(nn.Module):
    """Images in [0, 1] (N, 3, S, S) -> (scores (N,), anomaly maps (N, S, S))."""

    def __init__(self, teacher: FeatureExtractor, student: FeatureExtractor, *, map_mode: str = "product",
                 blur_sigma: float = 0.0):
        super().__init__()
        if map_mode not in MAP_MODES:
            raise ValueError(f"map_mode must be one of {MAP_MODES}, got {map_mode!r}")
        self.teacher = teacher
        self.student = student
        self.map_mode = map_mode
        self.upsample = AnomalyMapSmoother(sigma=0.0)
        self.smoother = AnomalyMapSmoother(sigma=blur_sigma)

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.teacher(images)

    def anomaly_map(self, teacher: list[torch.Tensor], student: list[torch.Tensor], size: tuple[int, int]
                    ) -> torch.Tensor:
        """Per-level distances upsampled to ``size`` and combined (product or sum): (N, H, W)."""
        combined: torch.Tensor | None = None
        for t, s in zip(teacher, student, strict=True):
            level = self.upsample(layer_distance(t, s), size)
            if combined is None:
                combined = level
            elif self.map_mode == "product":
                combined = combined * level
            else:
                combined = combined + level
        assert combined is not None
        return combined

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = (images.shape[-2], images.shape[-1])
        maps = self.anomaly_map(self.teacher_features(images), self.student(images), size)
        if self.smoother.sigma > 0:
            maps = self.smoother(maps, size)
        return maps.flatten(1).amax(dim=1), maps
