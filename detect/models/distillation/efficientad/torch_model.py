"""EfficientAD inference module: PDN teacher, PDN student and autoencoder, combined local + global maps.

Batzner, Heckler, König, "EfficientAD: Accurate Visual Anomaly Detection at Millisecond-Level Latencies",
WACV 2024.

- Patch description network (PDN): a fully convolutional net whose every output vector describes one 33x33
  input patch (small; medium: 33x33 as well, wider and deeper). No padding at inference, so an S x S input
  gives (S/4 - 8) x (S/4 - 8) output vectors (56 x 56 for 256).
  small: conv4x4 128, ReLU, avgpool2x2/2, conv4x4 256, ReLU, avgpool2x2/2, conv3x3 256, ReLU, conv4x4 C.
  medium: conv4x4 256, ReLU, avgpool, conv4x4 512, ReLU, avgpool, conv1x1 512, ReLU, conv3x3 512, ReLU,
  conv4x4 C, ReLU, conv1x1 C.
  The teacher (C = 384) is distilled from pretrained CNN features with padding (paper: conv padding 3/3/1,
  pool padding 1, output exactly S/4) and used without it; the same weights serve both (``padded=``).
- Student: the same PDN with 2 x 384 output channels; the first half mimics the teacher (local branch), the
  second half mimics the autoencoder (global/logical branch).
- Autoencoder: 6 strided convolutions down to a 64-d 1x1 latent, then 6 x (bilinear resize, conv4x4 64,
  ReLU, dropout 0.2), a resize to the PDN output size, conv3x3 64 + ReLU and conv3x3 384.
- Anomaly maps: local = channel mean of (normalised teacher - student[:384])^2, global = channel mean of
  (autoencoder - student[384:])^2. Each is mapped linearly so that its q_a = 0.9 / q_b = 0.995 quantiles on
  normal validation images go to 0 / 0.1, then averaged 0.5/0.5, zero-padded by 4 cells on every side (the
  border the unpadded PDN loses), resized to the input size and optionally blurred. Image score = map max.

Training (teacher distillation, student/autoencoder losses, quantiles) lives in ``detector.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from detect.models.components.blur import AnomalyMapSmoother

TEACHER_CHANNELS = 384
LATENT_CHANNELS = 64
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (in_channels or None = previous out, out_channels or None = C, kernel, padding when padded, ReLU after,
#  2x2 average pool after).
_PDN_LAYERS = {
    "small": [
        (3, 128, 4, 3, True, True),
        (128, 256, 4, 3, True, True),
        (256, 256, 3, 1, True, False),
        (256, None, 4, 0, False, False),
    ],
    "medium": [
        (3, 256, 4, 3, True, True),
        (256, 512, 4, 3, True, True),
        (512, 512, 1, 0, True, False),
        (512, 512, 3, 1, True, False),
        (512, None, 4, 0, True, False),
        (None, None, 1, 0, False, False),
    ],
}
MODEL_SIZES = tuple(_PDN_LAYERS)


def reset_conv_parameters(module: nn.Module, generator: torch.Generator | None = None) -> None:
    """PyTorch's default Conv2d initialisation for every convolution in ``module``, drawn from ``generator``."""
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d):
            nn.init.kaiming_uniform_(conv.weight, a=math.sqrt(5), generator=generator)
            if conv.bias is not None:
                bound = 1.0 / math.sqrt(conv.weight[0].numel())
                nn.init.uniform_(conv.bias, -bound, bound, generator=generator)


class PDN(nn.Module):
    """Patch description network; ``forward(x, padded=False)`` for inference, ``padded=True`` for distillation."""

    def __init__(self, size: str = "small", out_channels: int = TEACHER_CHANNELS):
        super().__init__()
        if size not in _PDN_LAYERS:
            raise ValueError(f"PDN size must be one of {MODEL_SIZES}, got {size!r}")
        self.size = size
        self.out_channels = out_channels
        convs, pads, relus, pools = [], [], [], []
        for c_in, c_out, kernel, pad, relu, pool in _PDN_LAYERS[size]:
            convs.append(nn.Conv2d(c_in or out_channels, c_out or out_channels, kernel_size=kernel))
            pads.append(pad)
            relus.append(relu)
            pools.append(pool)
        self.convs = nn.ModuleList(convs)
        self.pads = tuple(pads)
        self.relus = tuple(relus)
        self.pools = tuple(pools)

    def forward(self, x: torch.Tensor, padded: bool = False) -> torch.Tensor:
        for conv, pad, relu, pool in zip(self.convs, self.pads, self.relus, self.pools, strict=True):
            if padded and pad:
                x = F.pad(x, (pad, pad, pad, pad))
            x = conv(x)
            if relu:
                x = F.relu(x)
            if pool:
                x = F.avg_pool2d(x, kernel_size=2, stride=2, padding=1 if padded else 0)
        return x

    def output_size(self, size: int, padded: bool = False) -> int:
        """Spatial output size for a ``size`` x ``size`` input."""
        for conv, pad, pool in zip(self.convs, self.pads, self.pools, strict=True):
            size = size + (2 * pad if padded else 0) - conv.kernel_size[0] + 1
            if pool:
                size = (size + (2 if padded else 0) - 2) // 2 + 1
        return size


class SeededDropout(nn.Module):
    """Dropout whose mask is drawn from ``self.generator`` (set by the trainer) for reproducible training."""

    def __init__(self, p: float = 0.2):
        super().__init__()
        self.p = p
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape, generator=self.generator, dtype=x.dtype, device=x.device) >= self.p
        return x * keep / (1.0 - self.p)


class AutoEncoder(nn.Module):
    """The paper's autoencoder, generalised from 256 px to any input size >= 64.

    At 256 it is exactly the paper's: five 4x4/2 convolutions (32, 32, 64, 64, 64 channels) to 8x8, an 8x8
    convolution to the 1x1 latent, and decoder resizes to 3, 8, 15, 32, 63, 127 and finally 56. Elsewhere
    the latent convolution's kernel is the encoder's last spatial size (S/32) and the decoder sizes scale as
    S/64 - 1 (at least 1), S/32, S/16 - 1, S/8, S/4 - 1, S/2 - 1, then the PDN output size.
    """

    def __init__(self, image_size: int, output_size: int, out_channels: int = TEACHER_CHANNELS,
                 dropout: float = 0.2):
        super().__init__()
        channels = [3, 32, 32, 64, 64, 64]
        self.encoder = nn.ModuleList(
            nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1)
            for c_in, c_out in zip(channels[:-1], channels[1:], strict=True))
        size = image_size
        for _ in self.encoder:
            size = (size + 2 - 4) // 2 + 1
        self.latent = nn.Conv2d(64, LATENT_CHANNELS, kernel_size=size)
        s = image_size
        self.decoder_sizes = (max(1, s // 64 - 1), s // 32, s // 16 - 1, s // 8, s // 4 - 1, s // 2 - 1)
        self.output_size = output_size
        self.decoder = nn.ModuleList(
            nn.Conv2d(LATENT_CHANNELS if i == 0 else 64, 64, kernel_size=4, stride=1, padding=2) for i in range(6))
        self.dropouts = nn.ModuleList(SeededDropout(dropout) for _ in range(6))
        self.head1 = nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=1)
        self.head2 = nn.Conv2d(64, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.encoder:
            x = F.relu(conv(x))
        x = self.latent(x)
        for size, conv, dropout in zip(self.decoder_sizes, self.decoder, self.dropouts, strict=True):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            x = dropout(F.relu(conv(x)))
        x = F.interpolate(x, size=(self.output_size, self.output_size), mode="bilinear", align_corners=False)
        return self.head2(F.relu(self.head1(x)))

    def set_generator(self, generator: torch.Generator | None) -> None:
        for dropout in self.dropouts:
            dropout.generator = generator


class EfficientAdModel(nn.Module):
    """Images in [0, 1] (N, 3, S, S) -> (scores (N,), anomaly maps (N, S, S))."""

    def __init__(self, model_size: str = "small", image_size: int = 256, blur_sigma: float = 0.0):
        super().__init__()
        self.model_size = model_size
        self.image_size = image_size
        self.teacher = PDN(model_size, TEACHER_CHANNELS)
        self.student = PDN(model_size, 2 * TEACHER_CHANNELS)
        self.feature_size = self.teacher.output_size(image_size)
        if self.feature_size < 1:
            raise ValueError(f"image_size {image_size} is too small for the PDN")
        # The unpadded PDN loses (S/4 - feature_size) / 2 cells on each side (4 for every S): padded back with 0.
        self.border = max(0, (image_size // 4 - self.feature_size) // 2)
        self.autoencoder = AutoEncoder(image_size, self.feature_size)
        self.register_buffer("input_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        # Set by training: teacher channel statistics on the training images, map quantiles (q_a, q_b).
        self.register_buffer("teacher_mean", torch.zeros(1, TEACHER_CHANNELS, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, TEACHER_CHANNELS, 1, 1))
        self.register_buffer("quantiles_st", torch.tensor([0.0, 0.1]))
        self.register_buffer("quantiles_ae", torch.tensor([0.0, 0.1]))
        self.smoother = AnomalyMapSmoother(blur_sigma)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        reset_conv_parameters(self, generator)

    # ----- pieces used by training as well ------------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> ImageNet-normalised network input."""
        return (images - self.input_mean) / self.input_std

    def teacher_features(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher output of normalised input ``x``, standardised with the training-image channel statistics."""
        return (self.teacher(x) - self.teacher_mean) / self.teacher_std

    def raw_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-normalised local (student-teacher) and global (student-autoencoder) maps, (N, 1, h, w) each."""
        x = self.normalize(images)
        teacher = self.teacher_features(x)
        student = self.student(x)
        autoencoder = self.autoencoder(x)
        map_st = (teacher - student[:, :TEACHER_CHANNELS]).pow(2).mean(dim=1, keepdim=True)
        map_ae = (autoencoder - student[:, TEACHER_CHANNELS:]).pow(2).mean(dim=1, keepdim=True)
        return map_st, map_ae

    # ----- inference ------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        map_st, map_ae = self.raw_maps(images)
        map_st = 0.1 * (map_st - self.quantiles_st[0]) / (self.quantiles_st[1] - self.quantiles_st[0])
        map_ae = 0.1 * (map_ae - self.quantiles_ae[0]) / (self.quantiles_ae[1] - self.quantiles_ae[0])
        maps = 0.5 * map_st + 0.5 * map_ae
        if self.border:
            maps = F.pad(maps, (self.border, self.border, self.border, self.border))
        maps = self.smoother(maps, images.shape[-2:])
        return maps.flatten(1).amax(dim=1), maps
