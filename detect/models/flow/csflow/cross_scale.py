"""The cross-scale normalizing flow of CS-Flow (Rudolph, Wehrbein, Rosenhahn, Wandt, WACV 2022).

A CS-Flow processes the feature maps of one image at several scales *jointly*: ``xs = [x_0, x_1, ..., x_{S-1}]``
with x_s of shape (N, C, h_s, w_s), h_{s+1} = ceil(h_s / 2) (x_0 finest). Every block is

1. ``ParallelPermute``: a fixed, seeded random permutation of the channels of each scale (log-det 0);
2. ``CrossScaleCoupling``: GLOW-style affine coupling applied to all scales in parallel. The channels are split
   into halves (a, b). First a is transformed conditioned on b, then b conditioned on the new a:

       a' = a * exp(sigma(s_a(b))) + t_a(b),    b' = b * exp(sigma(s_b(a'))) + t_b(a')

   where (s, t) of *every* scale come from one ``CrossScaleSubnet`` that sees the conditioning halves of all
   scales (3x3 convolutions per scale with cross-scale connections), and sigma is the soft clamp
   sigma(h) = (2 alpha / pi) * atan(h / alpha) bounding the log-scale to (-alpha, alpha) (alpha = 3 in the paper).

The log-determinant of a block is the sum of the clamped log-scales over channels and positions of all scales.
Everything is plain torch (exportable); ``inverse`` undoes ``forward`` exactly up to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def soft_clamp(s: torch.Tensor, alpha: float) -> torch.Tensor:
    """The paper's soft clamp of log-scales, (2 alpha / pi) atan(s / alpha): in (-alpha, alpha), linear with slope
    2 / pi near 0. ``alpha <= 0`` disables clamping."""
    if alpha <= 0:
        return s
    return (2.0 * alpha / math.pi) * torch.atan(s / alpha)


def reset_conv(conv: nn.Conv2d, generator: torch.Generator | None) -> None:
    """PyTorch's default Conv2d initialisation, drawn from ``generator`` (reproducible)."""
    nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5), generator=generator)
    if conv.bias is not None:
        fan_in = conv.weight.shape[1] * conv.weight.shape[2] * conv.weight.shape[3]
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(conv.bias, -bound, bound, generator=generator)


def _resize_to(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    return x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class CrossScaleSubnet(nn.Module):
    """The coupling subnetwork: per scale conv(k) -> LeakyReLU -> conv(k), plus cross-scale connections.

    Each scale s has its own two convolutions (``inner[s]``: in -> hidden, ``outer[s]``: hidden -> out). The
    hidden activations of the next coarser scale are bilinearly upsampled and convolved (``up[s]``), those of the
    next finer scale convolved with stride 2 (``down[s]``), and both are added to the scale's own output. Each
    scale's output is multiplied by a learned scalar gamma initialised to 0, so a fresh coupling is the identity
    (as in the authors' code).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int, n_scales: int = 3,
                 kernel_size: int = 3, leaky_slope: float = 0.1):
        super().__init__()
        pad = kernel_size // 2
        self.n_scales = n_scales
        self.leaky_slope = leaky_slope
        self.inner = nn.ModuleList(nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=pad)
                                   for _ in range(n_scales))
        self.outer = nn.ModuleList(nn.Conv2d(hidden_channels, out_channels, kernel_size, padding=pad)
                                   for _ in range(n_scales))
        # up[s]: coarser scale s + 1 -> scale s; down[s]: finer scale s -> scale s + 1 (stride 2).
        self.up = nn.ModuleList(nn.Conv2d(hidden_channels, out_channels, kernel_size, padding=pad)
                                for _ in range(n_scales - 1))
        self.down = nn.ModuleList(nn.Conv2d(hidden_channels, out_channels, kernel_size, padding=pad, stride=2)
                                  for _ in range(n_scales - 1))
        self.gamma = nn.Parameter(torch.zeros(n_scales))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                reset_conv(module, generator)
        nn.init.zeros_(self.gamma)

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        hidden = [F.leaky_relu(conv(x), self.leaky_slope) for conv, x in zip(self.inner, xs, strict=True)]
        out = [conv(h) for conv, h in zip(self.outer, hidden, strict=True)]
        for s in range(self.n_scales - 1):
            fine, coarse = hidden[s], hidden[s + 1]
            out[s] = out[s] + self.up[s](_resize_to(coarse, fine.shape[-2:]))
            out[s + 1] = out[s + 1] + _resize_to(self.down[s](fine), coarse.shape[-2:])
        return [o * self.gamma[s] for s, o in enumerate(out)]


class ParallelPermute(nn.Module):
    """A fixed random channel permutation per scale (drawn from ``generator``); volume preserving."""

    def __init__(self, channels: int, n_scales: int, generator: torch.Generator | None = None):
        super().__init__()
        perms = torch.stack([torch.randperm(channels, generator=generator) for _ in range(n_scales)])
        self.register_buffer("perm", perms)
        self.register_buffer("inverse_perm", torch.argsort(perms, dim=1))

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [x.index_select(1, self.perm[s]) for s, x in enumerate(xs)]

    def inverse(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [x.index_select(1, self.inverse_perm[s]) for s, x in enumerate(xs)]


class CrossScaleCoupling(nn.Module):
    """Affine coupling of both channel halves of all scales (see the module docstring); returns the log-det."""

    def __init__(self, channels: int, hidden_channels: int, n_scales: int = 3, kernel_size: int = 3,
                 clamp: float = 3.0):
        super().__init__()
        if channels < 2:
            raise ValueError(f"a coupling needs at least 2 channels, got {channels}")
        self.len_a = channels // 2
        self.len_b = channels - self.len_a
        self.clamp = float(clamp)
        # subnet_a predicts (s, t) for half a from half b; subnet_b for half b from the transformed half a.
        self.subnet_a = CrossScaleSubnet(self.len_b, 2 * self.len_a, hidden_channels, n_scales, kernel_size)
        self.subnet_b = CrossScaleSubnet(self.len_a, 2 * self.len_b, hidden_channels, n_scales, kernel_size)

    def _scale_shift(self, params: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return soft_clamp(params[:, :length], self.clamp), params[:, length:]

    def forward(self, xs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        a = [x[:, :self.len_a] for x in xs]
        b = [x[:, self.len_a:] for x in xs]
        log_det = xs[0].new_zeros(xs[0].shape[0])
        new_a = []
        for params, a_s in zip(self.subnet_a(b), a, strict=True):
            log_s, t = self._scale_shift(params, self.len_a)
            new_a.append(a_s * torch.exp(log_s) + t)
            log_det = log_det + log_s.sum(dim=(1, 2, 3))
        new_b = []
        for params, b_s in zip(self.subnet_b(new_a), b, strict=True):
            log_s, t = self._scale_shift(params, self.len_b)
            new_b.append(b_s * torch.exp(log_s) + t)
            log_det = log_det + log_s.sum(dim=(1, 2, 3))
        return [torch.cat(pair, dim=1) for pair in zip(new_a, new_b, strict=True)], log_det

    def inverse(self, ys: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        a = [y[:, :self.len_a] for y in ys]
        b = [y[:, self.len_a:] for y in ys]
        old_b = []
        for params, b_s in zip(self.subnet_b(a), b, strict=True):
            log_s, t = self._scale_shift(params, self.len_b)
            old_b.append((b_s - t) * torch.exp(-log_s))
        old_a = []
        for params, a_s in zip(self.subnet_a(old_b), a, strict=True):
            log_s, t = self._scale_shift(params, self.len_a)
            old_a.append((a_s - t) * torch.exp(-log_s))
        return [torch.cat(pair, dim=1) for pair in zip(old_a, old_b, strict=True)]


class CrossScaleFlow(nn.Module):
    """``n_blocks`` x (permute + cross-scale coupling). Kernel size 3 in every block but the last (5), as in the
    authors' code. ``forward(xs) -> (zs, log_det (N,))``; ``inverse(zs) -> xs``."""

    def __init__(self, channels: int, *, n_scales: int = 3, n_blocks: int = 4, hidden_channels: int = 1024,
                 clamp: float = 3.0, seed: int = 0):
        super().__init__()
        self.n_scales = n_scales
        generator = torch.Generator().manual_seed(seed)
        kernel_sizes = [3] * (n_blocks - 1) + [5]
        self.permutations = nn.ModuleList(ParallelPermute(channels, n_scales, generator) for _ in range(n_blocks))
        self.couplings = nn.ModuleList(CrossScaleCoupling(channels, hidden_channels, n_scales, k, clamp)
                                       for k in kernel_sizes)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for coupling in self.couplings:
            coupling.subnet_a.reset_parameters(generator)
            coupling.subnet_b.reset_parameters(generator)

    def forward(self, xs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        if len(xs) != self.n_scales:
            raise ValueError(f"expected {self.n_scales} scales, got {len(xs)}")
        zs = list(xs)
        log_det = zs[0].new_zeros(zs[0].shape[0])
        for permute, coupling in zip(self.permutations, self.couplings, strict=True):
            zs, block_log_det = coupling(permute(zs))
            log_det = log_det + block_log_det
        return zs, log_det

    def inverse(self, zs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        xs = list(zs)
        for permute, coupling in zip(reversed(self.permutations), reversed(self.couplings), strict=True):
            xs = permute.inverse(coupling.inverse(xs))
        return xs


def nll_loss(zs: Sequence[torch.Tensor], log_det: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood under a standard normal per dimension (constant dropped), as in the authors' code:
    mean over the batch of (0.5 * sum over all scales of ||z||^2 - log_det), divided by the number of dimensions."""
    squared = sum(z.pow(2).flatten(1).sum(1) for z in zs)
    dims = sum(z[0].numel() for z in zs)
    return (0.5 * squared - log_det).mean() / dims
