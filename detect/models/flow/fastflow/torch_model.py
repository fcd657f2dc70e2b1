"""FastFlow inference module: frozen CNN features -> LayerNorm -> one 2D normalizing flow per stage.

Yu et al., "FastFlow: Unsupervised Anomaly Detection and Localization via 2D Normalizing Flows", 2021.

- Features: the chosen stages of the frozen backbone, each normalised by a LayerNorm over its whole
  (C, H, W) volume with a learned elementwise affine (as in the paper and its reference code for CNN backbones).
- Flow per stage: ``flow_steps`` affine coupling blocks (``components.flows.AffineCouplingBlock``, hard channel
  permutation, global affine, soft clamp ``clamp``) whose subnets are Conv-ReLU-Conv with ``hidden_ratio``
  times the input channels, alternating 3x3 (even steps) and 1x1 (odd steps) kernels; ``conv3x3_only`` uses
  3x3 everywhere (the paper's ResNet-18 setting).
- Anomaly map, as the reference: per stage and position ``p = exp(-0.5 * mean_c z^2)``, upsampled (bilinear)
  to the input size; the map is ``-mean_stages(p)`` (in [-1, 0], higher = more anomalous), optionally blurred.
  The image score is the maximum of the map.

Training (NLL ``sum_stages mean_batch(0.5 * sum z^2 - log|det J|)``) lives in ``detector.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from detect.models.components.blur import AnomalyMapSmoother
from detect.models.components.feature_extractor import FeatureExtractor
from detect.models.components.flows import AffineCouplingBlock, FlowSequence, conv_subnet, gaussian_nll


class FastflowModel(nn.Module):
    """Images in [0, 1] (N, 3, S, S) -> (scores (N,), anomaly maps (N, S, S))."""

    def __init__(self, feature_extractor: FeatureExtractor, feature_shapes: Sequence[tuple[int, int, int]], *,
                 flow_steps: int = 8, hidden_ratio: float = 1.0, clamp: float = 2.0, conv3x3_only: bool = False,
                 blur_sigma: float = 0.0, seed: int = 0):
        super().__init__()
        self.feature_extractor = feature_extractor
        generator = torch.Generator().manual_seed(seed)
        self.norms = nn.ModuleList(nn.LayerNorm(list(shape), elementwise_affine=True) for shape in feature_shapes)
        self.flows = nn.ModuleList(
            FlowSequence([
                AffineCouplingBlock(shape[0], conv_subnet(3 if step % 2 == 0 or conv3x3_only else 1, hidden_ratio),
                                    clamp=clamp, permute_soft=False, generator=generator)
                for step in range(flow_steps)])
            for shape in feature_shapes)
        self.smoother = AnomalyMapSmoother(blur_sigma)
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int) -> None:
        """Seeded initialisation of the trainable parts (LayerNorm affine and flow subnets)."""
        generator = torch.Generator().manual_seed(seed)
        for norm in self.norms:
            norm.reset_parameters()
        for flow in self.flows:
            flow.reset_parameters(generator)

    @torch.no_grad()
    def backbone_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen backbone's feature maps (before the trainable LayerNorm)."""
        return list(self.feature_extractor(images))

    def encode(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """LayerNorm + flow per stage: latents z (same shapes) and per-sample log|det J| per stage."""
        latents, log_dets = [], []
        for feature, norm, flow in zip(features, self.norms, self.flows, strict=True):
            z, log_det = flow(norm(feature))
            latents.append(z)
            log_dets.append(log_det)
        return latents, log_dets

    @staticmethod
    def loss(latents: Sequence[torch.Tensor], log_dets: Sequence[torch.Tensor]) -> torch.Tensor:
        """FastFlow's loss: per stage the batch mean of 0.5 * sum z^2 - log|det J|, summed over stages."""
        return sum(gaussian_nll(z, log_det).mean() for z, log_det in zip(latents, log_dets, strict=True))

    def anomaly_map(self, latents: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        maps = [self.smoother(-torch.exp(-0.5 * z.pow(2).mean(dim=1)), size) for z in latents]
        return torch.stack(maps, dim=0).mean(dim=0)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latents, _ = self.encode(self.backbone_features(images))
        maps = self.anomaly_map(latents, images.shape[-2:])
        return maps.flatten(1).amax(dim=1), maps
