"""Convolutional autoencoder inference module: anomalies are what the autoencoder cannot reconstruct.

The classic reconstruction baseline (e.g. Bergmann, Löwe, Fauser, Sattlegger, Steger: "Improving Unsupervised
Defect Segmentation by Applying Structural Similarity to Autoencoders", VISAPP 2019, arXiv 1807.02011):

- Encoder: strided 4x4 convolutions (stride 2, LeakyReLU 0.2), each optionally followed by a 3x3
  convolution, halve the image down to a ``f`` x ``f`` grid with ``f`` in 4..7 (see :func:`downsampling_plan`:
  the number of stages is derived from ``image_size``, so every multiple of 8 >= 32 works), then the
  bottleneck:
  ``"dense"``: one ``f`` x ``f`` convolution to a ``latent_dim`` vector (Bergmann's code of d = 100 values);
  ``"spatial"``: a 1x1 convolution to ``latent_dim`` channels at ``f`` x ``f``.
- Decoder: the mirror image with 4x4 transposed convolutions; a 3x3 convolution and a sigmoid give the
  reconstruction in [0, 1].
- Anomaly map at the input size, from the per-pixel reconstruction error: ``"l2"``: squared error averaged
  over the channels; ``"ssim"``: the structural dissimilarity ``(1 - SSIM) / 2`` (Gaussian window,
  :func:`ssim_map`) averaged over the channels; ``"l2_ssim"``: ``l2 + ssim_weight * ssim``. The map is
  smoothed with the shared Gaussian ``AnomalyMapSmoother`` (``blur_sigma``).
- Image score: the maximum of the map (``"max"``) or the mean of its ``topk_percent`` % highest pixels
  (``"topk"``), which is less sensitive to single noisy pixels.

``forward`` is plain torch: exporting the module exports the whole model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from detect.models.components.blur import AnomalyMapSmoother

BOTTLENECKS = ("dense", "spatial")
MAP_MODES = ("l2", "ssim", "l2_ssim")
LOSSES = MAP_MODES
SCORE_MODES = ("max", "topk")


def downsampling_plan(image_size: int) -> list[int]:
    """Grid sizes of the encoder: ``[image_size, ..., final]``, one more for every stride-2 stage.

    A 4x4 convolution with stride 2 and padding 1 maps a size s to floor(s / 2); halving goes on while the
    size is >= 8, so the final grid is 4..7 px: 64 -> 32 -> 16 -> 8 -> 4 (the DCGAN layout), 96 -> ... -> 6,
    72 -> 36 -> 18 -> 9 -> 4. The decoder retraces the sizes exactly with transposed convolutions whose
    ``output_padding`` (:func:`output_paddings`) restores the odd sizes, so any multiple of 8 >= 32 works.
    """
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    sizes = [image_size]
    while sizes[-1] >= 8:
        sizes.append(sizes[-1] // 2)
    return sizes


def output_paddings(sizes: list[int]) -> list[int]:
    """``output_padding`` of each decoder upsampling (coarse to fine) so that it inverts ``sizes``."""
    return [big - 2 * small for big, small in zip(reversed(sizes[:-1]), reversed(sizes[1:]), strict=True)]


def ssim_window(sigma: float = 1.5, size: int = 11) -> torch.Tensor:
    """1-D Gaussian window of ``size`` taps (Wang et al. 2004: 11 taps, sigma 1.5), normalised to sum 1."""
    radius = size // 2
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    window = torch.exp(-0.5 * (x / sigma) ** 2)
    return (window / window.sum()).float()


def ssim_map(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-pixel, per-channel SSIM of (N, C, H, W) images in [0, data_range]: (N, C, H, W), differentiable.

    Local means, variances and covariance come from a separable Gaussian filter (reflect padding keeps the
    map at the input size); constants K1 = 0.01, K2 = 0.03 as Wang, Bovik, Sheikh, Simoncelli (2004).
    """
    channels = x.shape[1]
    radius = window.numel() // 2
    window = window.to(x.dtype)
    horizontal = window.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    vertical = window.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    mode = "reflect" if radius < min(x.shape[-2:]) else "replicate"

    def blur(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (radius, radius, radius, radius), mode=mode)
        return F.conv2d(F.conv2d(t, horizontal, groups=channels), vertical, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    # Variances from E[x^2] - E[x]^2 can dip below 0 by rounding; SSIM stays well defined thanks to c2.
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))


def reconstruction_error(images: torch.Tensor, reconstruction: torch.Tensor, window: torch.Tensor, *,
                         mode: str = "l2", ssim_weight: float = 1.0) -> torch.Tensor:
    """Per-pixel error map (N, H, W), averaged over the channels: squared error, DSSIM = (1 - SSIM) / 2 or
    ``l2 + ssim_weight * DSSIM``."""
    if mode == "l2":
        return (images - reconstruction).pow(2).mean(dim=1)
    dssim = ((1.0 - ssim_map(images, reconstruction, window)) / 2.0).mean(dim=1)
    if mode == "ssim":
        return dssim
    return (images - reconstruction).pow(2).mean(dim=1) + ssim_weight * dssim


def reconstruction_loss(images: torch.Tensor, reconstruction: torch.Tensor, window: torch.Tensor, *,
                        mode: str = "l2", ssim_weight: float = 1.0) -> torch.Tensor:
    """Training loss of a batch: mean squared error (``"l2"``), ``1 - mean SSIM`` (``"ssim"``, Bergmann et
    al.) or ``mse + ssim_weight * (1 - mean SSIM)`` (``"l2_ssim"``)."""
    if mode == "l2":
        return F.mse_loss(reconstruction, images)
    dissimilarity = 1.0 - ssim_map(images, reconstruction, window).mean()
    if mode == "ssim":
        return dissimilarity
    return F.mse_loss(reconstruction, images) + ssim_weight * dissimilarity


def top_k_mean(maps: torch.Tensor, percent: float) -> torch.Tensor:
    """Mean of the ``percent`` % highest values of each (N, H, W) map (at least one value): (N,)."""
    flat = maps.flatten(1)
    k = max(1, int(math.ceil(flat.shape[1] * percent / 100.0)))
    return flat.topk(k, dim=1).values.mean(dim=1)


def channel_widths(width: int, stages: int, max_multiplier: int = 8) -> list[int]:
    """Feature channels after each encoder stage: width, 2 width, 4 width, ... capped at ``max_multiplier``."""
    return [width * min(2 ** i, max_multiplier) for i in range(stages)]


class ConvAutoencoder(nn.Module):
    """Images in [0, 1] (N, 3, S, S) -> reconstructions in [0, 1] (N, 3, S, S)."""

    def __init__(self, image_size: int, *, width: int = 32, latent_dim: int = 100, bottleneck: str = "dense",
                 extra_convs: bool = True):
        super().__init__()
        if bottleneck not in BOTTLENECKS:
            raise ValueError(f"bottleneck must be one of {BOTTLENECKS}, got {bottleneck!r}")
        sizes = downsampling_plan(image_size)
        final = sizes[-1]
        widths = channel_widths(width, len(sizes) - 1)
        act = nn.LeakyReLU(0.2)
        encoder: list[nn.Module] = []
        in_ch = 3
        for out_ch in widths:
            encoder += [nn.Conv2d(in_ch, out_ch, 4, 2, 1), act]
            if extra_convs:  # Bergmann et al.'s 3x3 stride-1 layers between the strided ones
                encoder += [nn.Conv2d(out_ch, out_ch, 3, 1, 1), act]
            in_ch = out_ch
        kernel = final if bottleneck == "dense" else 1
        encoder.append(nn.Conv2d(in_ch, latent_dim, kernel))  # linear code, as the paper's bottleneck
        decoder: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, in_ch, kernel), act]
        for out_ch, pad in zip([*reversed(widths[:-1]), width], output_paddings(sizes), strict=True):
            if extra_convs:
                decoder += [nn.Conv2d(in_ch, in_ch, 3, 1, 1), act]
            decoder += [nn.ConvTranspose2d(in_ch, out_ch, 4, 2, 1, output_padding=pad), act]
            in_ch = out_ch
        decoder += [nn.Conv2d(in_ch, 3, 3, 1, 1), nn.Sigmoid()]
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(*decoder)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """He-normal initialisation for LeakyReLU 0.2 (keeps the signal's scale through the deep, norm-free
        stack, so training starts fast), zero biases; drawn from ``generator``."""
        for layer in self.modules():
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(layer.weight, a=0.2, nonlinearity="leaky_relu", generator=generator)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(images))


class AutoencoderModel(nn.Module):
    """Images in [0, 1] (N, 3, S, S) -> (scores (N,), anomaly maps (N, S, S))."""

    def __init__(self, image_size: int, *, width: int = 32, latent_dim: int = 100, bottleneck: str = "dense",
                 extra_convs: bool = True, map_mode: str = "l2", ssim_weight: float = 1.0,
                 score_mode: str = "max", topk_percent: float = 1.0, blur_sigma: float = 4.0):
        super().__init__()
        if map_mode not in MAP_MODES:
            raise ValueError(f"map_mode must be one of {MAP_MODES}, got {map_mode!r}")
        if score_mode not in SCORE_MODES:
            raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
        self.autoencoder = ConvAutoencoder(image_size, width=width, latent_dim=latent_dim, bottleneck=bottleneck,
                                           extra_convs=extra_convs)
        self.map_mode = map_mode
        self.ssim_weight = float(ssim_weight)
        self.score_mode = score_mode
        self.topk_percent = float(topk_percent)
        # Fixed by the config, so non-persistent (never saved).
        self.register_buffer("window", ssim_window(), persistent=False)
        self.smoother = AnomalyMapSmoother(sigma=blur_sigma)

    def loss(self, images: torch.Tensor, mode: str) -> torch.Tensor:
        """Training loss of a batch of normal images (see :func:`reconstruction_loss`)."""
        return reconstruction_loss(images, self.autoencoder(images), self.window, mode=mode,
                                   ssim_weight=self.ssim_weight)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reconstruction = self.autoencoder(images)
        error = reconstruction_error(images, reconstruction, self.window, mode=self.map_mode,
                                     ssim_weight=self.ssim_weight)
        maps = self.smoother(error, (images.shape[-2], images.shape[-1]))
        scores = maps.flatten(1).amax(dim=1) if self.score_mode == "max" else top_k_mean(maps, self.topk_percent)
        return scores, maps

