"""Normalizing-flow building blocks shared by the flow detectors (FastFlow, CFlow, U-Flow, ...).

:class:`AffineCouplingBlock` is an affine coupling block in the style of FrEIA's ``AllInOneBlock`` (the block
the FastFlow, CFLOW-AD and U-Flow reference implementations are built from). For an input ``x`` with C
channels (a feature map (N, C, H, W) or a vector batch (N, C)):

1. channel split ``x1 = x[:, :C - C // 2]``, ``x2 = x[:, C - C // 2:]``;
2. the subnet sees ``x1`` (and the optional condition, concatenated along channels) and predicts
   ``a = 0.1 * subnet([x1, c])`` (FrEIA's factor 0.1 for a near-identity start); its first half is the
   log-scale, softly clamped to (-clamp, clamp): ``s = clamp * tanh(a_s)`` ("tanh", FrEIA) or
   ``s = clamp * 2/pi * atan(a_s)`` ("atan", Glow-style); the second half is the shift ``t``;
3. ``y2 = x2 * exp(s) + t``, ``y = [x1, y2]``;
4. optional global affine (ActNorm-like, learned per channel): ``y * scale + offset`` with
   ``scale = 0.2 * log(1 + exp(0.5 * g))`` (FrEIA's "SOFTPLUS" parametrisation), initialised to the identity
   or, with ``initialize_global_affine(x)``, data-dependently as Glow's ActNorm (standardised outputs on x);
5. a fixed channel mixing drawn from a seeded ``torch.Generator``: a hard random permutation, or (``permute_soft``)
   a random rotation (FrEIA's soft permutation; orthogonal, so its log-determinant is 0).

``forward`` returns ``(y, log_det)`` with ``log_det`` the per-sample log |det J| (shape (N,)); ``reverse=True``
inverts the block exactly (up to floating point). :class:`FlowSequence` chains blocks. The subnet factories
:func:`conv_subnet` (conv feature maps: Conv-ReLU-Conv) and :func:`linear_subnet` (vectors: Linear-ReLU-Linear)
cover the usual cases. :func:`gaussian_log_likelihood` / :func:`gaussian_nll` turn ``(z, log_det)`` into the
log-likelihood under a standard-normal base distribution. Everything is pure torch (exportable).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SubnetConstructor = Callable[[int, int], nn.Module]

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
CLAMP_ACTIVATIONS = ("tanh", "atan")


# ----- subnets --------------------------------------------------------------------------------------------------
def conv_subnet(kernel_size: int = 3, hidden_ratio: float = 1.0) -> SubnetConstructor:
    """Factory ``(in_channels, out_channels) -> Conv(k) - ReLU - Conv(k)`` with ``int(in * hidden_ratio)`` hidden
    channels and "same" padding (FastFlow's / U-Flow's coupling subnet)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 1 (got {kernel_size})")

    def make(in_channels: int, out_channels: int) -> nn.Module:
        hidden = max(1, int(in_channels * hidden_ratio))
        pad = kernel_size // 2
        return nn.Sequential(nn.Conv2d(in_channels, hidden, kernel_size, padding=pad), nn.ReLU(),
                             nn.Conv2d(hidden, out_channels, kernel_size, padding=pad))

    return make


def linear_subnet(hidden_ratio: float = 2.0) -> SubnetConstructor:
    """Factory ``(in_features, out_features) -> Linear - ReLU - Linear`` with ``int(in * hidden_ratio)`` hidden
    units (CFLOW-AD's ``subnet_fc`` has ratio 2)."""

    def make(in_features: int, out_features: int) -> nn.Module:
        hidden = max(1, int(in_features * hidden_ratio))
        return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))

    return make


def reset_module_parameters(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """PyTorch's default initialisation of every Linear / Conv layer in ``module``, drawn from ``generator``
    (so a seeded generator gives the same weights every time)."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            if layer.bias is not None:
                fan_in = layer.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def random_rotation(channels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random orthogonal (C, C) matrix with determinant +1, uniform on SO(C) (QR of a Gaussian matrix)."""
    gauss = torch.randn(channels, channels, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    q = q * torch.sign(torch.diagonal(r)).view(1, -1)
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.float()


# ----- coupling block ---------------------------------------------------------------------------------------------
def _softplus_init(value: float | torch.Tensor) -> float | torch.Tensor:
    """Inverse of the global-scale activation ``0.1 * softplus_{beta=0.5}(g) = 0.2 * log(1 + exp(0.5 g))``:
    ``g = 2 log(exp(5 value) - 1)``, written stably (FrEIA's SOFTPLUS initialisation)."""
    if isinstance(value, torch.Tensor):
        return 10.0 * value + 2.0 * torch.log(-torch.expm1(-5.0 * value))
    return 10.0 * value + 2.0 * math.log(-math.expm1(-5.0 * value))


class AffineCouplingBlock(nn.Module):
    """FrEIA AllInOneBlock-style affine coupling + global affine + fixed channel permutation (see module doc).

    channels: C of the input (feature maps (N, C, ...) or vectors (N, C)); at least 2.
    subnet_constructor: ``f(in, out)`` -> module mapping (N, in, ...) to (N, out, ...); called with
        ``in = C - C // 2 + condition_channels`` and ``out = 2 * (C // 2)``.
    condition_channels: channels of the condition concatenated to the subnet input (0: unconditional).
    clamp: bound of the soft-clamped log-scale; clamp_activation: "tanh" (FrEIA) or "atan" (Glow-style).
    global_affine: learn the ActNorm-like per-channel scale/offset after the coupling.
    permute_soft: random rotation instead of a hard permutation (both fixed, drawn from ``generator``).
    """

    def __init__(self, channels: int, subnet_constructor: SubnetConstructor, *, condition_channels: int = 0,
                 clamp: float = 2.0, clamp_activation: str = "tanh", global_affine: bool = True,
                 global_affine_init: float = 1.0, permute_soft: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        if channels < 2:
            raise ValueError(f"a coupling block needs at least 2 channels (got {channels})")
        if clamp <= 0:
            raise ValueError(f"clamp must be > 0 (got {clamp})")
        if clamp_activation not in CLAMP_ACTIVATIONS:
            raise ValueError(f"clamp_activation must be one of {CLAMP_ACTIVATIONS} (got {clamp_activation!r})")
        self.channels = channels
        self.split1 = channels - channels // 2
        self.split2 = channels // 2
        self.condition_channels = condition_channels
        self.clamp = float(clamp)
        self.clamp_activation = clamp_activation
        self.global_affine = global_affine
        self.global_affine_init = float(global_affine_init)
        self.permute_soft = permute_soft
        self.subnet = subnet_constructor(self.split1 + condition_channels, 2 * self.split2)
        if global_affine:
            self.global_scale = nn.Parameter(torch.full((1, channels), _softplus_init(global_affine_init)))
            self.global_offset = nn.Parameter(torch.zeros(1, channels))
        if permute_soft:
            self.register_buffer("rotation", random_rotation(channels, generator))
        else:
            perm = torch.randperm(channels, generator=generator)
            self.register_buffer("perm", perm)
            self.register_buffer("inv_perm", torch.argsort(perm))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-draw the subnet weights from ``generator`` and reset the global affine to its initial value
        (the permutation is fixed at construction)."""
        reset_module_parameters(self.subnet, generator)
        if self.global_affine:
            with torch.no_grad():
                self.global_scale.fill_(_softplus_init(self.global_affine_init))
                self.global_offset.zero_()

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, condition_channels={self.condition_channels}, clamp={self.clamp}, "
                f"clamp_activation={self.clamp_activation!r}, global_affine={self.global_affine}, "
                f"permute_soft={self.permute_soft}")

    # ----- pieces ---------------------------------------------------------------------------------------------
    def _soft_clamp(self, a: torch.Tensor) -> torch.Tensor:
        if self.clamp_activation == "tanh":
            return self.clamp * torch.tanh(a)
        return self.clamp * (2.0 / math.pi) * torch.atan(a)

    def _view(self, param: torch.Tensor, ndim: int) -> torch.Tensor:
        return param.view(1, self.channels, *([1] * (ndim - 2)))

    def _global_scale(self) -> torch.Tensor:
        return 0.1 * F.softplus(self.global_scale, beta=0.5)

    def _mix(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        if self.permute_soft:
            # the exact inverse (not the transpose), so rounding of the stored rotation cannot break invertibility
            w = torch.linalg.inv(self.rotation) if inverse else self.rotation
            return torch.einsum("ij,nj...->ni...", w.to(x.dtype), x)
        return x.index_select(1, self.inv_perm if inverse else self.perm)

    def _coupled(self, x: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        """The affine coupling alone (no global affine, no permutation)."""
        x1, x2 = torch.split(x, [self.split1, self.split2], dim=1)
        s, t = self._coupling(x1, condition)
        return torch.cat([x1, x2 * torch.exp(s) + t], dim=1)

    @torch.no_grad()
    def initialize_global_affine(self, x: torch.Tensor, condition: torch.Tensor | None = None,
                                 eps: float = 1e-6) -> None:
        """Glow's data-dependent ActNorm initialisation: set the global scale / offset so that this block's
        output has zero mean and unit variance per channel on ``x``."""
        if not self.global_affine:
            return
        y = self._coupled(x, condition).transpose(0, 1).reshape(self.channels, -1)
        mean, std = y.mean(dim=1), y.std(dim=1)
        scale = 1.0 / (std + eps)
        self.global_scale.copy_(_softplus_init(scale).view(1, -1))
        self.global_offset.copy_((-mean * scale).view(1, -1))

    def _coupling(self, x1: torch.Tensor, condition: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.condition_channels:
            if condition is None:
                raise ValueError("this coupling block is conditional: pass a condition")
            x1 = torch.cat([x1, condition], dim=1)
        a = 0.1 * self.subnet(x1)
        return self._soft_clamp(a[:, :self.split2]), a[:, self.split2:]

    # ----- forward / inverse ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None, reverse: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` -> ``(y, log|det dy/dx|)`` per sample; with ``reverse`` the inverse map and its log-det."""
        sum_dims = tuple(range(1, x.ndim))
        n_pixels = 1
        for size in x.shape[2:]:
            n_pixels *= size
        if not reverse:
            x1, x2 = torch.split(x, [self.split1, self.split2], dim=1)
            s, t = self._coupling(x1, condition)
            y = torch.cat([x1, x2 * torch.exp(s) + t], dim=1)
            log_det = s.sum(dim=sum_dims)
            if self.global_affine:
                scale = self._global_scale()
                y = y * self._view(scale, x.ndim) + self._view(self.global_offset, x.ndim)
                log_det = log_det + n_pixels * torch.log(scale).sum()
            return self._mix(y, inverse=False), log_det
        y = self._mix(x, inverse=True)
        log_det = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        if self.global_affine:
            scale = self._global_scale()
            y = (y - self._view(self.global_offset, x.ndim)) / self._view(scale, x.ndim)
            log_det = log_det - n_pixels * torch.log(scale).sum()
        y1, y2 = torch.split(y, [self.split1, self.split2], dim=1)
        s, t = self._coupling(y1, condition)
        return torch.cat([y1, (y2 - t) * torch.exp(-s)], dim=1), log_det - s.sum(dim=sum_dims)


class FlowSequence(nn.Module):
    """A chain of coupling blocks (all sharing the same condition); log-determinants add up."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for block in self.blocks:
            block.reset_parameters(generator)

    @torch.no_grad()
    def initialize_global_affine(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> None:
        """Glow-style data-dependent initialisation of every block's global affine (ActNorm), block by block on
        the sample ``x`` propagated through the chain: each block's output starts standardised per channel."""
        for block in self.blocks:
            block.initialize_global_affine(x, condition)
            x, _ = block(x, condition)

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None, reverse: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for block in (reversed(self.blocks) if reverse else self.blocks):
            x, block_log_det = block(x, condition, reverse=reverse)
            log_det = log_det + block_log_det
        return x, log_det


# ----- likelihood -------------------------------------------------------------------------------------------------
def gaussian_log_likelihood(z: torch.Tensor, log_det: torch.Tensor | float = 0.0,
                            dim: int | Sequence[int] | None = None) -> torch.Tensor:
    """log p(x) = log N(z; 0, I) + log|det dz/dx|, summed over ``dim`` (default: every non-batch dimension).

    With ``dim`` a subset (e.g. the channel dimension of a map), the result keeps the other dimensions and
    ``log_det`` must broadcast against it.
    """
    dims = tuple(range(1, z.ndim)) if dim is None else ((dim,) if isinstance(dim, int) else tuple(dim))
    count = 1
    for d in dims:
        count *= z.shape[d]
    return -0.5 * z.pow(2).sum(dim=dims) - count * HALF_LOG_2PI + log_det


def gaussian_nll(z: torch.Tensor, log_det: torch.Tensor | float = 0.0, *, constant: bool = False) -> torch.Tensor:
    """Per-sample negative log-likelihood ``0.5 * sum z^2 - log_det`` (+ ``D/2 log 2pi`` with ``constant``), the
    loss of FastFlow / U-Flow (which leave the constant out)."""
    nll = 0.5 * z.pow(2).flatten(1).sum(dim=1) - log_det
    if constant:
        nll = nll + z[0].numel() * HALF_LOG_2PI
    return nll
