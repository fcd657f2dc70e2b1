"""CFLOW-AD inference module: frozen CNN features -> per-scale conditional normalizing flow on feature vectors.

Gudovskiy, Ishizaka, Kozuka, "CFLOW-AD: Real-Time Unsupervised Anomaly Detection with Localization via
Conditional Normalizing Flows", WACV 2022.

- Encoder: the chosen stages of the frozen backbone (no extra normalisation, as the reference code).
- Condition: a fixed 2D sinusoidal positional encoding with ``condition_vector`` channels per position (the
  first half encodes x, the second half y; sin/cos interleaved), as the reference ``positionalencoding2d``.
- Decoder per scale: ``coupling_blocks`` conditional affine coupling blocks (``components.flows``) on the
  C-dimensional feature vector of each position ("fiber"), the positional encoding concatenated to every
  subnet's input; subnets Linear(d, 2d)-ReLU-Linear(2d, out); soft clamp ``clamp`` (1.9), global affine
  (SOFTPLUS) and a random rotation as channel mixing (``permute_soft``, as the reference).
- Per position the log-likelihood ``log p = -C/2 log 2pi - 0.5 |z|^2 + log|det J|``, divided by C.
- Anomaly map, as the paper: per scale ``exp(log p / C - max)`` (likelihoods in (0, 1]), upsampled to the
  input size and summed over scales; the map is ``max - sum``; the image score is the map's maximum. The
  reference takes both maxima over the whole test set, which makes a score depend on the other images of the
  batch; here they are fixed constants measured on the training images after training (buffers
  ``log_prob_max`` per scale and ``score_max``), so scores are per image and reproducible. Within one scale
  this is the same map up to a constant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from detect.models.components.blur import AnomalyMapSmoother
from detect.models.components.feature_extractor import FeatureExtractor
from detect.models.components.flows import AffineCouplingBlock, FlowSequence, gaussian_log_likelihood, linear_subnet


def positional_encoding_2d(channels: int, height: int, width: int) -> torch.Tensor:
    """(channels, H, W) sinusoidal encoding: channels [0, D/2) encode x, [D/2, D) encode y (D % 4 == 0)."""
    if channels % 4 != 0:
        raise ValueError(f"positional encoding needs a multiple of 4 channels (got {channels})")
    encoding = torch.zeros(channels, height, width)
    half = channels // 2
    div_term = torch.exp(torch.arange(0.0, half, 2) * -(math.log(1e4) / half))  # (half / 2,)
    pos_w = torch.arange(0.0, width).unsqueeze(1) * div_term  # (W, half / 2)
    pos_h = torch.arange(0.0, height).unsqueeze(1) * div_term  # (H, half / 2)
    encoding[0:half:2] = torch.sin(pos_w).t().unsqueeze(1).expand(-1, height, -1)
    encoding[1:half:2] = torch.cos(pos_w).t().unsqueeze(1).expand(-1, height, -1)
    encoding[half::2] = torch.sin(pos_h).t().unsqueeze(2).expand(-1, -1, width)
    encoding[half + 1::2] = torch.cos(pos_h).t().unsqueeze(2).expand(-1, -1, width)
    return encoding


class CflowModel(nn.Module):
    """Images in [0, 1] (N, 3, S, S) -> (scores (N,), anomaly maps (N, S, S))."""

    def __init__(self, feature_extractor: FeatureExtractor, feature_shapes: Sequence[tuple[int, int, int]], *,
                 coupling_blocks: int = 8, clamp: float = 1.9, condition_vector: int = 128,
                 permute_soft: bool = True, blur_sigma: float = 0.0, seed: int = 0):
        super().__init__()
        self.feature_extractor = feature_extractor
        self.channels = [shape[0] for shape in feature_shapes]
        self.condition_vector = condition_vector
        generator = torch.Generator().manual_seed(seed)
        self.decoders = nn.ModuleList(
            FlowSequence([
                AffineCouplingBlock(channels, linear_subnet(2.0), condition_channels=condition_vector, clamp=clamp,
                                    permute_soft=permute_soft, generator=generator)
                for _ in range(coupling_blocks)])
            for channels in self.channels)
        for index, (_, h, w) in enumerate(feature_shapes):
            # fixed by the config: recomputed, never saved
            self.register_buffer(f"position_{index}", positional_encoding_2d(condition_vector, h, w), persistent=False)
        # Normalisers measured on the training images after training (see the module docstring).
        self.register_buffer("log_prob_max", torch.zeros(len(feature_shapes)))
        self.register_buffer("score_max", torch.tensor(float(len(feature_shapes))))
        self.smoother = AnomalyMapSmoother(blur_sigma)
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        for decoder in self.decoders:
            decoder.reset_parameters(generator)

    def position(self, scale: int) -> torch.Tensor:
        return getattr(self, f"position_{scale}")

    @torch.no_grad()
    def backbone_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.feature_extractor(images))

    def fiber_log_prob(self, scale: int, fibers: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Per-dimension log-likelihood ``log p / C`` of feature vectors (E, C) with their conditions (E, P)."""
        z, log_det = self.decoders[scale](fibers, condition)
        return gaussian_log_likelihood(z, log_det) / fibers.shape[1]

    def log_prob_maps(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-scale (N, h, w) maps of ``log p / C`` for every position."""
        maps = []
        for scale, feature in enumerate(features):
            n, c, h, w = feature.shape
            fibers = feature.permute(0, 2, 3, 1).reshape(-1, c)
            condition = self.position(scale).permute(1, 2, 0).reshape(1, h * w, -1).expand(n, -1, -1)
            log_prob = self.fiber_log_prob(scale, fibers, condition.reshape(n * h * w, -1))
            maps.append(log_prob.view(n, h, w))
        return maps

    def likelihood_sum(self, log_prob_maps: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Sum over scales of the upsampled per-scale likelihoods ``exp(log p / C - log_prob_max)``: (N, S, S)."""
        total = None
        for scale, log_prob in enumerate(log_prob_maps):
            up = self.smoother(torch.exp(log_prob - self.log_prob_max[scale]), size)
            total = up if total is None else total + up
        return total

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_probs = self.log_prob_maps(self.backbone_features(images))
        maps = self.score_max - self.likelihood_sum(log_probs, images.shape[-2:])
        return maps.flatten(1).amax(dim=1), maps
