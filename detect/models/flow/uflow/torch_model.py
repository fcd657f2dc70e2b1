"""U-Flow inference module: a U-shaped multi-scale normalizing flow and its a-contrario (NFA) segmentation.

Tailanian, Pardo, Muse, "U-Flow: A U-shaped Normalizing Flow for Anomaly Detection with Unsupervised
Threshold", 2022 (JMIV 2024).

- Features: a multi-scale pyramid of the frozen backbone (consecutive stages, each twice the resolution of the
  next), each normalised by a LayerNorm over its (C, H, W) volume with a learned affine (as the reference
  code's CNN extractors). The paper's MS-CaiT transformer backbone is replaced by this CNN pyramid.
- U-shaped flow, built from the coarsest scale up (as the reference graph): a flow stage (``flow_steps``
  coupling blocks, ``components.flows.AffineCouplingBlock``, Conv-ReLU-Conv subnets alternating 3x3 / 1x1
  kernels, soft clamp ``clamp``, hard permutations) transforms the coarsest features; its output is split
  along channels: ``C // 8 * 4`` channels are upsampled by an invertible space-to-depth inverse
  (``pixel_shuffle(2)``: 4 channels -> 2x2 pixels, volume preserving, log-det 0) and concatenated to the next
  finer scale's features as the input of that scale's flow stage; the remaining channels are that scale's
  latent output. The finest stage's whole output is its latent. The flow is one invertible map of all scales'
  features, so its log-det is one total per image.
- Likelihood anomaly map (paper): per scale ``p = exp(-0.5 * mean_c z^2)``, upsampled (bilinear) to the input
  size; ``1 - mean_scales(p)``. The image score is the maximum of this map.
- NFA (paper's a-contrario detection, block version of the reference code): under the null hypothesis
  latents are i.i.d. standard normal, so each latent value is a candidate (``z^2 >= tau``, tau the
  ``nfa_probability`` quantile of chi-square(1)) with probability ``q = 1 - nfa_probability``. Around each
  position a window of ``n = (2 * half + 1)^2`` positions (``half = max(window / 2^scale // 2, 1)``) counts the
  candidates of all channels; ``k = floor(count / C)`` is tested with the binomial tail
  ``P[Bin(n, q) > k]``. The log10 tails of all scales are upsampled (bicubic, align_corners, as the reference)
  and summed; ``log NFA = log10(number of tests) + sum``, the number of tests being the positions of all
  scales. ``-log10 NFA`` is the NFA anomaly map: positive where NFA < 1 (epsilon = 1), i.e. anomalous.
  ``P[Bin(n, q) > n] = 0``; the table is floored at ``P[Bin(n, q) >= n] = q^n`` to stay finite.

``forward`` returns the image score and, with ``nfa_map`` (config ``use_nfa_threshold``), the ``-log10 NFA`` map
(automatic pixel threshold 0), otherwise the likelihood map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detect.models.components.blur import AnomalyMapSmoother
from detect.models.components.feature_extractor import FeatureExtractor
from detect.models.components.flows import AffineCouplingBlock, FlowSequence, conv_subnet, gaussian_nll


def binomial_log10_tail(n: int, q: float) -> torch.Tensor:
    """(n + 1,) table of ``log10 P[Bin(n, q) > k]`` for k = 0..n (k = n floored at ``log10 P[X >= n]``)."""
    k = torch.arange(n + 1, dtype=torch.float64)
    log_pmf = (math.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)
               + k * math.log(q) + (n - k) * math.log1p(-q))
    # tail[k] = logsumexp(log_pmf[k+1:]): reverse cumulative logsumexp
    upper = torch.logcumsumexp(log_pmf.flip(0), dim=0).flip(0)  # upper[k] = log P[X >= k]
    tail = torch.cat([upper[1:], upper[-1:]])
    return (tail / math.log(10.0)).float()


class UflowModel(nn.Module):
    """Images in [0, 1] (N, 3, S, S) -> (scores (N,), anomaly maps (N, S, S))."""

    def __init__(self, feature_extractor: FeatureExtractor, feature_shapes: Sequence[tuple[int, int, int]], *,
                 flow_steps: int = 4, hidden_ratio: float = 1.0, clamp: float = 2.0, permute_soft: bool = False,
                 nfa_map: bool = True, nfa_window: int = 5, nfa_probability: float = 0.9, blur_sigma: float = 0.0,
                 seed: int = 0):
        super().__init__()
        self.feature_extractor = feature_extractor
        self.nfa_map = nfa_map
        self.norms = nn.ModuleList(nn.LayerNorm(list(shape), elementwise_affine=True) for shape in feature_shapes)
        generator = torch.Generator().manual_seed(seed)
        n_scales = len(feature_shapes)
        # Channels entering each scale's flow stage, from the coarsest up; ``up_channels[i]`` leave stage i
        # (i > 0) for the finer scale, the rest are scale i's latent.
        stage_channels = [0] * n_scales
        self.up_channels = [0] * n_scales
        incoming = 0
        for i in reversed(range(n_scales)):
            stage_channels[i] = feature_shapes[i][0] + incoming
            if i > 0:
                self.up_channels[i] = stage_channels[i] // 8 * 4
                incoming = self.up_channels[i] // 4
        self.latent_channels = [c - u for c, u in zip(stage_channels, self.up_channels, strict=True)]
        self.stages = nn.ModuleList(
            FlowSequence([
                AffineCouplingBlock(channels, conv_subnet(3 if step % 2 == 0 else 1, hidden_ratio), clamp=clamp,
                                    permute_soft=permute_soft, generator=generator)
                for step in range(flow_steps)])
            for channels in stage_channels)
        self.smoother = AnomalyMapSmoother(blur_sigma)

        # NFA constants (fixed by the config: recomputed, never saved).
        self.nfa_windows: list[int] = []
        for scale in range(n_scales):
            half = max(int((nfa_window / 2**scale) // 2), 1)
            self.nfa_windows.append(half)
            table = binomial_log10_tail((2 * half + 1) ** 2, 1.0 - nfa_probability)
            self.register_buffer(f"nfa_table_{scale}", table, persistent=False)
        tau = torch.special.ndtri(torch.tensor((1.0 + nfa_probability) / 2, dtype=torch.float64)) ** 2
        self.nfa_tau = float(tau)  # chi-square(1) quantile at nfa_probability
        self.log10_tests = math.log10(sum(h * w for _, h, w in feature_shapes))
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        for norm in self.norms:
            norm.reset_parameters()
        for stage in self.stages:
            stage.reset_parameters(generator)

    @torch.no_grad()
    def backbone_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(self.feature_extractor(images))

    def encode(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The U-shaped flow: latents per scale (finest first) and the total per-image log|det J|."""
        n_scales = len(features)
        latents: list[torch.Tensor] = list(features)  # placeholders, replaced scale by scale
        log_det = torch.zeros(features[0].shape[0], dtype=features[0].dtype, device=features[0].device)
        up = None
        for i in reversed(range(n_scales)):
            x = self.norms[i](features[i])
            if up is not None:
                x = torch.cat([x, up], dim=1)
            y, stage_log_det = self.stages[i](x)
            log_det = log_det + stage_log_det
            if i > 0:
                to_up, latents[i] = torch.split(y, [self.up_channels[i], self.latent_channels[i]], dim=1)
                up = F.pixel_shuffle(to_up, 2)
            else:
                latents[i] = y
        return latents, log_det

    @staticmethod
    def loss(latents: Sequence[torch.Tensor], log_det: torch.Tensor) -> torch.Tensor:
        """U-Flow's loss: batch mean of ``sum_scales 0.5 * sum z^2 - log|det J|`` (total NLL, constant dropped)."""
        return gaussian_nll(torch.cat([z.flatten(1) for z in latents], dim=1), log_det).mean()

    def likelihood_map(self, latents: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        maps = [self.smoother(torch.exp(-0.5 * z.pow(2).mean(dim=1)), size) for z in latents]
        return 1.0 - torch.stack(maps, dim=0).mean(dim=0)

    def log_nfa(self, latents: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """(N, S, S) map of log10 NFA (block binomial test per scale, see the module docstring)."""
        total = None
        for scale, z in enumerate(latents):
            half = self.nfa_windows[scale]
            channels = z.shape[1]
            candidates = (z.pow(2) >= self.nfa_tau).to(z.dtype).sum(dim=1, keepdim=True)
            mode = "reflect" if half < min(z.shape[-2:]) else "replicate"
            padded = F.pad(candidates, (half, half, half, half), mode=mode)
            box = torch.ones(1, 1, 2 * half + 1, 2 * half + 1, dtype=z.dtype, device=z.device)
            counts = F.conv2d(padded, box).round()
            table = getattr(self, f"nfa_table_{scale}")
            k = torch.div(counts, channels, rounding_mode="floor").long().clamp(0, table.numel() - 1)
            log_prob = table[k].to(z.dtype)
            log_prob = F.interpolate(log_prob, size=size, mode="bicubic", align_corners=True)
            total = log_prob if total is None else total + log_prob
        return (total + self.log10_tests)[:, 0]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latents, _ = self.encode(self.backbone_features(images))
        size = images.shape[-2:]
        likelihood = self.likelihood_map(latents, size)
        scores = likelihood.flatten(1).amax(dim=1)
        if self.nfa_map:
            return scores, -self.log_nfa(latents, size)
        return scores, likelihood
