"""CS-Flow inference module: multi-scale frozen CNN features -> cross-scale flow -> likelihood scores.

Rudolph, Wehrbein, Rosenhahn, Wandt, "Fully Convolutional Cross-Scale-Flows for Image-based Defect Detection",
WACV 2022.

- Features: the image at full, 1/2 and 1/4 resolution (area downscaling) goes through the *same* frozen backbone;
  one stage's feature map per scale (paper: EfficientNet-B5 block 36 at 768 px; here tf_efficientnet_lite0
  feature index 3, stride 16, 112 channels), optionally smoothed by a k x k average pool.
- Flow: :class:`~detect.models.flow.csflow.cross_scale.CrossScaleFlow` maps the three maps jointly to
  Gaussian latents z_s of the same shapes.
- Scores: per position ||z_s(i, j)||^2; the score of a scale is its mean over positions, the image score the mean
  over scales. The anomaly map is the finest scale's ||z||^2, upsampled to the input size and smoothed by the
  shared Gaussian (sigma 4).

Training (NLL of z minus log-det, Adam) lives in ``detector.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from detect.models.components.blur import AnomalyMapSmoother
from detect.models.components.feature_extractor import FeatureExtractor
from detect.models.flow.csflow.cross_scale import CrossScaleFlow


class CsFlowModel(nn.Module):
    """Images in [0, 1] (N, 3, S, S) -> (scores (N,), anomaly maps (N, S, S))."""

    def __init__(self, feature_extractor: FeatureExtractor, *, n_scales: int = 3, n_coupling_blocks: int = 4,
                 hidden_channels: int = 1024, clamp: float = 3.0, feature_pool: int = 1, blur_sigma: float = 4.0,
                 seed: int = 0):
        super().__init__()
        if len(feature_extractor.layers) != 1:
            raise ValueError("CS-Flow uses exactly one backbone stage")
        self.feature_extractor = feature_extractor
        self.n_scales = n_scales
        self.feature_pool = feature_pool
        self.channels = feature_extractor.channels[0]
        self.flow = CrossScaleFlow(self.channels, n_scales=n_scales, n_blocks=n_coupling_blocks,
                                   hidden_channels=hidden_channels, clamp=clamp, seed=seed)
        self.smoother = AnomalyMapSmoother(blur_sigma)

    @torch.no_grad()
    def multiscale_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen backbone stage of the image at scales 1, 1/2, 1/4, ...: list of (N, C, h_s, w_s)."""
        h, w = images.shape[-2:]
        features = []
        for s in range(self.n_scales):
            scaled = images if s == 0 else F.interpolate(images, size=(h >> s, w >> s), mode="area")
            feature = self.feature_extractor(scaled)[0]
            if self.feature_pool > 1:
                feature = F.avg_pool2d(feature, self.feature_pool, stride=1, padding=self.feature_pool // 2,
                                       count_include_pad=False)
            features.append(feature)
        return features

    @staticmethod
    def position_scores(zs: list[torch.Tensor]) -> list[torch.Tensor]:
        """||z_s||^2 over channels at every position: list of (N, h_s, w_s)."""
        return [z.pow(2).sum(dim=1) for z in zs]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zs, _ = self.flow(self.multiscale_features(images))
        per_position = self.position_scores(zs)
        scores = torch.stack([p.flatten(1).mean(dim=1) for p in per_position], dim=1).mean(dim=1)
        maps = self.smoother(per_position[0], images.shape[-2:])
        return scores, maps
