"""DSR inference module: a two-level VQ-VAE, object-specific decoding, anomaly segmentation and upsampling.

Zavrtanik, Kristan, Skocaj: "DSR - A dual subspace re-projection network for surface anomaly detection",
ECCV 2022 (arXiv 2208.01521); layer layout after the authors' code (github.com/VitjanZ/DSR_anomaly_detection).

Modules (names of the paper in brackets):

- ``vq`` (:class:`DiscreteLatentModel`, the discrete latent model): encoder ``E_hi`` (stride 4) and ``E_lo``
  (stride 8 on top of it); the coarse features ``F_lo`` are quantized with codebook ``K_lo``, upsampled,
  joined with the ``E_hi`` output into ``F_hi`` and quantized with ``K_hi``. The general object appearance
  decoder ``D_gen`` turns ``(Q_lo, Q_hi)`` into an image that keeps anomalies visible.
- ``restrict_lo`` / ``restrict_hi`` (:class:`SubspaceRestriction`, the subspace restriction modules) map
  possibly anomalous quantized features to features of normal appearance, which are re-quantized with the
  same codebooks; ``object_decoder`` (:class:`ObjectDecoder`, the object-specific decoder ``D_spc``) turns
  them into an image of the object without anomalies. Together they form the object-specific branch.
- ``detection`` (:class:`UNet`, the anomaly detection module) segments the differences between the
  object-specific and the general reconstruction (2 classes, softmax).
- ``upsampling`` (:class:`UNet`, the upsampling module) refines that segmentation, which is only exact to a
  feature cell, to the image resolution from both reconstructions and the coarse mask.

Inference (``forward``): the anomaly map is the anomalous-class softmax of the upsampling module; the image
score is the maximum of the detection module's anomalous-class softmax after a mean filter (paper: 21x21 at
256 px; ``score_kernel``). Images enter in [0, 1] without normalisation, as in the authors' code.

:func:`replace_with_distant_codes` is the paper's feature-space anomaly sampler used in training (Sec. 3.3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Codebook entries skipped as too similar when sampling anomalies: the nearest 5 % (authors' code).
NEAREST_EXCLUDED = 0.05
# Channels of the object-specific decoder's 1x1 bottleneck (authors' constant, independent of the widths).
OBJECT_DECODER_BOTTLENECK = 64


# ----- vector quantisation ---------------------------------------------------------------------------------------
class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation with a straight-through gradient and EMA codebook updates.

    ``codebook`` (K, D) is a buffer: it is learnt by exponential moving averages of the features assigned to
    each entry (van den Oord et al. 2017, App. A.1; as the authors' VQ-VAE), not by gradients. The EMA state
    is training-only and not saved.
    """

    def __init__(self, num_embeddings: int, dim: int, decay: float = 0.99, epsilon: float = 1e-5):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.dim = dim
        self.decay = decay
        self.epsilon = epsilon
        self.register_buffer("codebook", torch.zeros(num_embeddings, dim))
        self.register_buffer("ema_size", torch.zeros(num_embeddings), persistent=False)
        self.register_buffer("ema_sum", torch.zeros(num_embeddings, dim), persistent=False)

    @staticmethod
    def flatten(features: torch.Tensor) -> torch.Tensor:
        """(N, D, h, w) -> (N * h * w, D), positions in row-major order."""
        return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])

    def distances(self, flat: torch.Tensor) -> torch.Tensor:
        """Squared Euclidean distances (P, K) of flat features (P, D) to every codebook entry."""
        book = self.codebook
        return (flat.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1) - 2.0 * flat @ book.t()).clamp_min(0.0)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D, h, w) -> (quantized features with straight-through gradient, indices (N, h, w))."""
        n, d, h, w = features.shape
        indices = self.distances(self.flatten(features)).argmin(dim=1)
        quantized = self.codebook[indices].view(n, h, w, d).permute(0, 3, 1, 2)
        # Straight-through estimator: the value of the codebook entry, the gradient of the identity.
        return features + (quantized - features).detach(), indices.view(n, h, w)

    @torch.no_grad()
    def ema_update(self, features: torch.Tensor, indices: torch.Tensor) -> None:
        """One EMA step of entry counts and feature sums; entries = sums / Laplace-smoothed counts."""
        flat = self.flatten(features.detach())
        idx = indices.reshape(-1)
        counts = torch.bincount(idx, minlength=self.num_embeddings).to(flat.dtype)
        sums = torch.zeros_like(self.ema_sum).index_add_(0, idx, flat)
        self.ema_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        total = self.ema_size.sum()
        size = (self.ema_size + self.epsilon) / (total + self.num_embeddings * self.epsilon) * total
        self.codebook.copy_(self.ema_sum / size.unsqueeze(1))

    @torch.no_grad()
    def reseed(self, entries: torch.Tensor, features: torch.Tensor, generator: torch.Generator) -> None:
        """Set the codebook ``entries`` (bool (K,) or index tensor) to randomly drawn feature vectors.

        Used to initialise the codebook from the data and to restart entries no feature was assigned to
        (dead codes), which otherwise stay at their initial values on a small training set.
        """
        flat = self.flatten(features.detach())
        slots = torch.nonzero(entries).flatten() if entries.dtype == torch.bool else entries
        if slots.numel() == 0:
            return
        picks = torch.randint(flat.shape[0], (slots.numel(),), generator=generator)
        vectors = flat[picks]
        self.codebook[slots] = vectors
        self.ema_sum[slots] = vectors
        self.ema_size[slots] = 1.0


def replace_with_distant_codes(features: torch.Tensor, quantized: torch.Tensor, codebook: torch.Tensor,
                               mask: torch.Tensor, strength: torch.Tensor, generator: torch.Generator
                               ) -> torch.Tensor:
    """DSR's feature-space anomalies: inside ``mask``, swap quantized vectors for distant codebook entries.

    For every position the codebook entries are ranked by their distance to the non-quantized feature; the
    replacement is drawn uniformly among the ranks ``[0.05 K, strength * K]`` (the nearest 5 % are skipped as
    too similar; a larger ``strength`` allows more distant entries), as the authors' code. Outside the mask
    the quantized vectors are returned unchanged.

    features, quantized: (N, D, h, w); codebook: (K, D); mask: (N, 1, h, w) bool or {0, 1};
    strength: (N,) in (0, 1]. Returns (N, D, h, w).
    """
    n, d, h, w = features.shape
    k = codebook.shape[0]
    flat = features.permute(0, 2, 3, 1).reshape(-1, d)
    dist = (flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2.0 * flat @ codebook.t())
    order = dist.argsort(dim=1, stable=True)  # (P, K), nearest first
    low = min(int(k * NEAREST_EXCLUDED), k - 1)
    high = (strength * k).long().add(1).clamp(1, k - 1).clamp_min(low + 1)  # exclusive upper rank per image
    high = high.repeat_interleave(h * w).to(flat.device)
    draw = torch.rand(flat.shape[0], generator=generator).to(flat.device)
    rank = (low + (draw * (high - low).to(draw.dtype)).long()).clamp_max(k - 1)
    chosen = codebook[order.gather(1, rank.unsqueeze(1)).squeeze(1)].view(n, h, w, d).permute(0, 3, 1, 2)
    return torch.where(mask.bool().expand_as(quantized), chosen.to(quantized.dtype), quantized)


# ----- discrete latent model (VQ-VAE) ----------------------------------------------------------------------------
class Residual(nn.Module):
    """``x + conv1x1(relu(conv3x3(relu(x))))`` (VQ-VAE residual block)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1, bias=False), nn.ReLU(),
                                   nn.Conv2d(hidden, channels, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResidualStack(nn.Sequential):
    """``layers`` residual blocks followed by a ReLU."""

    def __init__(self, channels: int, hidden: int, layers: int):
        super().__init__(*[Residual(channels, hidden) for _ in range(layers)], nn.ReLU())


class DiscreteLatentModel(nn.Module):
    """Two-level VQ-VAE: ``E_hi`` (stride 4), ``E_lo`` (stride 8), codebooks ``K_hi``/``K_lo``, ``D_gen``."""

    def __init__(self, *, embedding_dim: int, num_embeddings: int, num_hiddens: int, num_residual_layers: int,
                 num_residual_hiddens: int):
        super().__init__()
        h, d = num_hiddens, embedding_dim
        self.encoder_hi = nn.Sequential(
            nn.Conv2d(3, h // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(h // 2, h, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(h, h, 3, padding=1), ResidualStack(h, num_residual_hiddens, num_residual_layers))
        self.encoder_lo = nn.Sequential(
            nn.Conv2d(h, h, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(h, h, 3, padding=1), ResidualStack(h, num_residual_hiddens, num_residual_layers))
        self.pre_quantize_lo = nn.Conv2d(h, d, 1)
        self.pre_quantize_hi = nn.Conv2d(h + d, d, 1)
        self.quantizer_lo = VectorQuantizer(num_embeddings, d)
        self.quantizer_hi = VectorQuantizer(num_embeddings, d)
        self.upsample_lo = nn.ConvTranspose2d(d, d, 4, stride=2, padding=1)
        self.general_decoder = nn.Sequential(
            nn.Conv2d(2 * d, h, 3, padding=1), ResidualStack(h, num_residual_hiddens, num_residual_layers),
            nn.ConvTranspose2d(h, h // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(h // 2, 3, 4, stride=2, padding=1))

    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of both levels: ``enc_hi``, non-quantized ``z_lo``/``z_hi``, quantized ``q_lo``/``q_hi``
        (straight-through) and codebook indices ``idx_lo``/``idx_hi``."""
        enc_hi = self.encoder_hi(images)
        z_lo = self.pre_quantize_lo(self.encoder_lo(enc_hi))
        q_lo, idx_lo = self.quantizer_lo(z_lo)
        z_hi, q_hi, idx_hi = self.hi_from_lo(enc_hi, q_lo)
        return {"enc_hi": enc_hi, "z_lo": z_lo, "q_lo": q_lo, "idx_lo": idx_lo, "z_hi": z_hi, "q_hi": q_hi,
                "idx_hi": idx_hi}

    def hi_from_lo(self, enc_hi: torch.Tensor, q_lo: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``F_hi`` from the ``E_hi`` output and upsampled ``Q_lo``; returns (z_hi, q_hi, idx_hi)."""
        z_hi = self.pre_quantize_hi(torch.cat((enc_hi, self.upsample_lo(q_lo)), dim=1))
        q_hi, idx_hi = self.quantizer_hi(z_hi)
        return z_hi, q_hi, idx_hi

    def decode(self, q_lo: torch.Tensor, q_hi: torch.Tensor) -> torch.Tensor:
        """General object appearance decoder ``D_gen``: quantized features of both levels -> image."""
        return self.general_decoder(torch.cat((self.upsample_lo(q_lo), q_hi), dim=1))


# ----- object-specific branch -------------------------------------------------------------------------------------
def _double_conv(cin: int, cmid: int, cout: int) -> nn.Sequential:
    """Two 3x3 convolutions, each followed by instance normalisation and ReLU (authors' building block)."""
    return nn.Sequential(nn.Conv2d(cin, cmid, 3, padding=1), nn.InstanceNorm2d(cmid), nn.ReLU(),
                         nn.Conv2d(cmid, cout, 3, padding=1), nn.InstanceNorm2d(cout), nn.ReLU())


def _up_conv(cin: int, cout: int) -> nn.Sequential:
    """Bilinear x2 upsampling, 3x3 convolution, instance normalisation, ReLU."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                         nn.Conv2d(cin, cout, 3, padding=1), nn.InstanceNorm2d(cout), nn.ReLU())


class SubspaceRestriction(nn.Module):
    """Subspace restriction network: an encoder-decoder (no skip connections, two poolings, width ``w``)
    mapping quantized features (D channels) to non-quantized features of normal appearance."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        w = width
        self.encoder = nn.Sequential(_double_conv(dim, w, w), nn.MaxPool2d(2), _double_conv(w, 2 * w, 2 * w),
                                     nn.MaxPool2d(2), _double_conv(2 * w, 4 * w, 4 * w))
        self.decoder = nn.Sequential(_up_conv(4 * w, 2 * w), _double_conv(2 * w, 2 * w, 2 * w),
                                     _up_conv(2 * w, w), _double_conv(w, w, w), nn.Conv2d(w, dim, 3, padding=1))

    def forward(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(quantized))


class ObjectDecoder(nn.Module):
    """Object-specific image decoder ``D_spc``: re-projected (Q_lo upsampled, Q_hi) -> image.

    As the authors' image reconstruction network: two conv blocks with poolings (channels x2, x4 of the
    input), a 1x1 bottleneck, two transposed convolutions back to the ``F_hi`` resolution, then the VQ-VAE
    decoder layout (conv, residual stack, two stride-2 transposed convolutions).
    """

    def __init__(self, in_channels: int, *, num_hiddens: int, num_residual_layers: int, num_residual_hiddens: int):
        super().__init__()
        c, h = in_channels, num_hiddens
        bottleneck = OBJECT_DECODER_BOTTLENECK
        self.encoder = nn.Sequential(_double_conv(c, c, 2 * c), nn.MaxPool2d(2), _double_conv(2 * c, 2 * c, 4 * c),
                                     nn.MaxPool2d(2), nn.Conv2d(4 * c, bottleneck, 1))
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(bottleneck, bottleneck, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(bottleneck, bottleneck, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(bottleneck, h, 3, padding=1), ResidualStack(h, num_residual_hiddens, num_residual_layers),
            nn.ConvTranspose2d(h, h // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(h // 2, 3, 4, stride=2, padding=1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(features))


# ----- segmentation -----------------------------------------------------------------------------------------------
class UNet(nn.Module):
    """U-Net with three poolings (widths w, 2w, 4w, 4w) and skip connections, instance normalisation; the
    architecture of both the anomaly detection module and the upsampling module (2 output logits)."""

    def __init__(self, in_channels: int, out_channels: int, width: int):
        super().__init__()
        w = width
        self.block1 = _double_conv(in_channels, w, w)
        self.block2 = _double_conv(w, 2 * w, 2 * w)
        self.block3 = _double_conv(2 * w, 4 * w, 4 * w)
        self.block4 = _double_conv(4 * w, 4 * w, 4 * w)
        self.up1, self.dec1 = _up_conv(4 * w, 4 * w), _double_conv(8 * w, 4 * w, 4 * w)
        self.up2, self.dec2 = _up_conv(4 * w, 2 * w), _double_conv(4 * w, 2 * w, 2 * w)
        self.up3, self.dec3 = _up_conv(2 * w, w), _double_conv(2 * w, w, w)
        self.out = nn.Conv2d(w, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.block1(x)
        b2 = self.block2(F.max_pool2d(b1, 2))
        b3 = self.block3(F.max_pool2d(b2, 2))
        b4 = self.block4(F.max_pool2d(b3, 2))
        d1 = self.dec1(torch.cat((self.up1(b4), b3), dim=1))
        d2 = self.dec2(torch.cat((self.up2(d1), b2), dim=1))
        d3 = self.dec3(torch.cat((self.up3(d2), b1), dim=1))
        return self.out(d3)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Mean focal loss ``-(1 - p_t)^gamma log p_t`` (Lin et al. 2017; alpha 1, gamma 2 as DSR) of 2-class
    logits (N, 2, H, W) against a {0, 1} target (N, 1, H, W) or (N, H, W)."""
    target = target.reshape(logits.shape[0], *logits.shape[2:]).long()
    log_pt = F.log_softmax(logits, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    return (-(1.0 - log_pt.exp()).pow(gamma) * log_pt).mean()


# ----- the whole model --------------------------------------------------------------------------------------------
class DsrModel(nn.Module):
    """Images in [0, 1] (N, 3, S, S) -> (scores (N,), anomaly maps (N, S, S)); see the module docstring."""

    def __init__(self, *, embedding_dim: int = 64, num_embeddings: int = 512, num_hiddens: int = 64,
                 num_residual_layers: int = 2, num_residual_hiddens: int = 32, segmentation_width: int = 32,
                 score_kernel: int = 21):
        super().__init__()
        if score_kernel < 1 or score_kernel % 2 == 0:
            raise ValueError(f"score_kernel must be odd and >= 1, got {score_kernel}")
        d = embedding_dim
        self.vq = DiscreteLatentModel(embedding_dim=d, num_embeddings=num_embeddings, num_hiddens=num_hiddens,
                                      num_residual_layers=num_residual_layers,
                                      num_residual_hiddens=num_residual_hiddens)
        # Authors: subspace restriction width = embedding size.
        self.restrict_lo = SubspaceRestriction(d, d)
        self.restrict_hi = SubspaceRestriction(d, d)
        self.object_decoder = ObjectDecoder(2 * d, num_hiddens=num_hiddens, num_residual_layers=num_residual_layers,
                                            num_residual_hiddens=num_residual_hiddens)
        self.detection = UNet(6, 2, segmentation_width)
        self.upsampling = UNet(8, 2, segmentation_width)
        self.score_kernel = score_kernel

    def object_specific(self, q_lo: torch.Tensor, q_hi: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Subspace restriction of both levels, re-quantization, object-specific decoding.

        Returns the non-quantized restricted features (lo, hi) and the object-specific image."""
        f_lo = self.restrict_lo(q_lo)
        f_hi = self.restrict_hi(q_hi)
        r_lo, _ = self.vq.quantizer_lo(f_lo)
        r_hi, _ = self.vq.quantizer_hi(f_hi)
        image = self.object_decoder(torch.cat((self.vq.upsample_lo(r_lo), r_hi), dim=1))
        return f_lo, f_hi, image

    def reconstructions(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(object-specific image, general appearance image) of the input images."""
        latent = self.vq.encode(images)
        general = self.vq.decode(latent["q_lo"], latent["q_hi"])
        _, _, specific = self.object_specific(latent["q_lo"], latent["q_hi"])
        return specific, general

    def segment(self, specific: torch.Tensor, general: torch.Tensor) -> torch.Tensor:
        """Anomaly detection module: 2-class logits (N, 2, S, S) from both reconstructions."""
        return self.detection(torch.cat((specific, general), dim=1))

    def upsample(self, specific: torch.Tensor, general: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """Upsampling module: refined 2-class logits from both reconstructions and the coarse softmax."""
        return self.upsampling(torch.cat((specific, general, coarse), dim=1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        specific, general = self.reconstructions(images)
        coarse = torch.softmax(self.segment(specific, general), dim=1)
        refined = torch.softmax(self.upsample(specific, general, coarse), dim=1)
        k = self.score_kernel
        # count_include_pad (default) as the authors' avg_pool2d: borders are damped the same way.
        pooled = F.avg_pool2d(coarse[:, 1:], k, stride=1, padding=k // 2)
        return pooled.flatten(1).amax(dim=1), refined[:, 1]
