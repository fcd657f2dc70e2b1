"""DRAEM inference module: a reconstructive sub-network and a discriminative (U-Net) sub-network.

Zavrtanik, Kristan, Skocaj: "DRAEM - A discriminatively trained reconstruction embedding for surface anomaly
detection", ICCV 2021 (arXiv 2108.07610); reference code github.com/VitjanZ/DRAEM.

- Reconstructive sub-network: an encoder-decoder without skip connections. Encoder: 5 blocks of two
  (3x3 conv, BatchNorm, ReLU) with widths w, 2w, 4w, 8w, 8w and a 2x2 max-pool between blocks (stride 16 at
  the bottleneck); decoder: 4 stages of (bilinear 2x upsampling, conv-BN-ReLU) + two conv-BN-ReLU, widths
  8w -> 4w -> 2w -> w -> w, and a final 3x3 conv to RGB (no output activation, as the paper's code). Trained
  to restore the anomaly-free image from an image with simulated anomalies (L2 + SSIM loss).
- Discriminative sub-network: a U-Net with 6 encoder blocks (widths v, 2v, 4v, 8v, 8v, 8v; 5 max-pools) and
  a decoder with skip connections at every level, ending in a 3x3 conv to 2 channels (normal, anomalous). Its
  input is the channel concatenation (reconstruction, input image), as the reference code orders it. Trained
  with the focal loss (gamma 2) against the simulated (or real) anomaly mask.
- Inference: the anomaly map is the softmax probability of the anomalous channel at the input size; the
  image score is the maximum of the map after a ``score_window`` x ``score_window`` mean filter (stride 1,
  zero padding counted as in the reference's ``avg_pool2d``); the paper's window is 21 px at 256 px.

Upsampling in the decoders goes to the size of the matching encoder level (bilinear, ``align_corners=True``
as the reference's ``nn.Upsample(scale_factor=2)``), so any input size works, not only multiples of 32.

Also here: :func:`ssim` (the differentiable SSIM of the training loss, Gaussian window 11, sigma 1.5) and
:func:`focal_loss`. ``forward`` is plain torch: exporting the module exports the whole model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PAPER_IMAGE_SIZE = 256
PAPER_SCORE_WINDOW = 21


def auto_score_window(image_size: int) -> int:
    """The paper's 21 px mean filter at 256 px scaled to ``image_size``, rounded to an odd size >= 1."""
    window = max(1, int(round(PAPER_SCORE_WINDOW * image_size / PAPER_IMAGE_SIZE)))
    return window if window % 2 else window + 1


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True)]


def double_conv(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    """(3x3 conv, BatchNorm, ReLU) twice: the building block of both sub-networks."""
    return nn.Sequential(*_conv_bn_relu(in_channels, mid_channels), *_conv_bn_relu(mid_channels, out_channels))


class UpConv(nn.Module):
    """Bilinear upsampling to a given size, then conv-BN-ReLU (the reference's ``up*`` stages)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Sequential(*_conv_bn_relu(in_channels, out_channels))

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="bilinear", align_corners=True))


class Encoder(nn.Module):
    """``len(multipliers)`` double-conv blocks with a 2x2 max-pool before each block but the first; returns
    the output of every block (finest first)."""

    def __init__(self, in_channels: int, width: int, multipliers: tuple[int, ...]):
        super().__init__()
        blocks = []
        previous = in_channels
        for multiplier in multipliers:
            blocks.append(double_conv(previous, width * multiplier, width * multiplier))
            previous = width * multiplier
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x if index == 0 else F.max_pool2d(x, 2))
            outputs.append(x)
        return outputs


class ReconstructiveSubNetwork(nn.Module):
    """Encoder-decoder (no skips): (N, 3, H, W) -> reconstruction (N, 3, H, W). Paper width 128."""

    def __init__(self, width: int = 128, in_channels: int = 3, out_channels: int = 3):
        super().__init__()
        w = width
        self.encoder = Encoder(in_channels, w, (1, 2, 4, 8, 8))
        # (upsampling conv in -> out, then double conv mid -> out), deepest first, as the reference decoder.
        self.ups = nn.ModuleList([UpConv(8 * w, 8 * w), UpConv(4 * w, 4 * w), UpConv(2 * w, 2 * w), UpConv(w, w)])
        self.blocks = nn.ModuleList([double_conv(8 * w, 8 * w, 4 * w), double_conv(4 * w, 4 * w, 2 * w),
                                     double_conv(2 * w, 2 * w, w), double_conv(w, w, w)])
        self.out = nn.Conv2d(w, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = self.encoder(x)
        # Only the bottleneck is decoded; the encoder's level sizes just say where each upsampling goes.
        sizes = [tuple(level.shape[-2:]) for level in levels[:-1]][::-1]
        y = levels[-1]
        for up, block, size in zip(self.ups, self.blocks, sizes, strict=True):
            y = block(up(y, size))
        return self.out(y)


class DiscriminativeSubNetwork(nn.Module):
    """U-Net: (N, 6, H, W) -> logits (N, 2, H, W) of (normal, anomalous). Paper width 64."""

    def __init__(self, width: int = 64, in_channels: int = 6, out_channels: int = 2):
        super().__init__()
        v = width
        self.encoder = Encoder(in_channels, v, (1, 2, 4, 8, 8, 8))
        # Deepest first: (upsampled channels in -> out, skip channels); then a double conv on the concatenation.
        stages = [(8, 8, 8), (8, 4, 8), (4, 2, 4), (2, 1, 2), (1, 1, 1)]  # (in, out, skip) multiples of v
        self.ups = nn.ModuleList([UpConv(i * v, o * v) for i, o, _ in stages])
        self.blocks = nn.ModuleList([double_conv((o + s) * v, o * v, o * v) for _, o, s in stages])
        self.out = nn.Conv2d(v, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = self.encoder(x)
        y = levels[-1]
        for up, block, skip in zip(self.ups, self.blocks, levels[-2::-1], strict=True):
            y = block(torch.cat([up(y, tuple(skip.shape[-2:])), skip], dim=1))
        return self.out(y)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 2-D Gaussian window (size, size) of SSIM."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    return torch.outer(g, g).float()


def ssim(a: torch.Tensor, b: torch.Tensor, *, window_size: int = 11, sigma: float = 1.5, data_range: float = 1.0
         ) -> torch.Tensor:
    """Mean structural similarity of two (N, C, H, W) image batches (Wang et al. 2004), differentiable.

    Local statistics under a Gaussian window (per channel, zero padding so the map keeps the input size, as
    the DRAEM reference), constants C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = ``data_range``.
    """
    channels = a.shape[1]
    size = min(window_size, a.shape[-2], a.shape[-1])
    window = gaussian_window(size, sigma).to(a).expand(channels, 1, size, size)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, padding=size // 2, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return ssim_map.mean()


def focal_loss(logits: torch.Tensor, masks: torch.Tensor, *, gamma: float = 2.0, smooth: float = 1e-5
               ) -> torch.Tensor:
    """DRAEM's focal loss (Lin et al. 2017) of two-class logits (N, 2, H, W) against bool/0-1 masks (N, H, W).

    As the reference: softmax probabilities, the one-hot target clamped to [smooth, 1 - smooth],
    ``p_t = <target, p> + smooth`` and ``-(1 - p_t)^gamma log p_t`` averaged over all pixels (no alpha).
    """
    probs = torch.softmax(logits, dim=1)
    anomalous = masks.to(probs.dtype)
    target = torch.stack([1 - anomalous, anomalous], dim=1).clamp(smooth, 1 - smooth)
    pt = (target * probs).sum(dim=1) + smooth
    return (-(1 - pt).pow(gamma) * pt.log()).mean()


class DraemModel(nn.Module):
    """Images in [0, 1] (N, 3, S, S) -> (scores (N,), anomaly maps (N, S, S))."""

    def __init__(self, *, reconstructive_width: int = 128, discriminative_width: int = 64, score_window: int = 21):
        super().__init__()
        if score_window < 1 or score_window % 2 == 0:
            raise ValueError(f"score_window must be an odd size >= 1, got {score_window}")
        self.reconstructive = ReconstructiveSubNetwork(reconstructive_width)
        self.discriminative = DiscriminativeSubNetwork(discriminative_width)
        self.score_window = score_window

    def segment(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstructions (N, 3, S, S), mask logits (N, 2, S, S)); the training forward pass."""
        reconstruction = self.reconstructive(images)
        return reconstruction, self.discriminative(torch.cat([reconstruction, images], dim=1))

    def score(self, maps: torch.Tensor) -> torch.Tensor:
        """Image scores: max of the ``score_window`` mean-filtered maps (N, S, S) -> (N,)."""
        k = self.score_window
        pooled = F.avg_pool2d(maps.unsqueeze(1), k, stride=1, padding=k // 2) if k > 1 else maps.unsqueeze(1)
        return pooled.flatten(1).amax(dim=1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, logits = self.segment(images)
        maps = torch.softmax(logits, dim=1)[:, 1]
        return self.score(maps), maps
