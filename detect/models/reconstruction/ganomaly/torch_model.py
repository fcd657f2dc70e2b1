"""GANomaly inference module: encoder-decoder-encoder generator; anomalies have a large latent mismatch.

Akcay, Atapour-Abarghouei, Breckon: "GANomaly: Semi-Supervised Anomaly Detection via Adversarial Training",
ACCV 2018 (arXiv 1805.06725); reference code github.com/samet-akcay/ganomaly.

- Generator G: a DCGAN encoder G_E maps the image x (scaled to [-1, 1]) to a latent vector z, a DCGAN decoder
  G_D maps z back to an image x_hat (tanh), and a second encoder E (G_E's architecture, own weights) maps
  x_hat to z_hat. DCGAN blocks: 4x4 stride-2 convolutions, BatchNorm (not after the first convolution),
  LeakyReLU 0.2 in the encoders, ReLU in the decoder; a final convolution over the whole remaining grid
  gives the 1x1 latent. The number of stride-2 stages follows from ``image_size`` (``downsampling_plan``:
  a 4x4 grid as in the paper for powers of two, 4..7 px for other multiples of 8, whose odd intermediate
  sizes the decoder restores with ``output_padding``; the reference needs multiples of 16).
- Discriminator D (training only, ``detector.py``): G_E's architecture with a one-channel output; its
  features before the last convolution feed the adversarial feature-matching loss.
- Image score (paper, Eq. 7): ``A(x) = mean_k (z_k - z_hat_k)^2`` (``score_mode="latent"``), or the maximum
  of the pixel map (``score_mode="map_max"``, not in the paper).
- Anomaly map: GANomaly has none in the paper (it scores whole images). The map here is the per-pixel
  contextual error ``|x - x_hat|`` averaged over the channels (in [0, 1] units), smoothed with the shared
  Gaussian ``AnomalyMapSmoother`` (``blur_sigma``).

``forward`` is plain torch (BatchNorm in eval mode: running statistics): exporting the module exports the
whole model.
"""

from __future__ import annotations

import torch
from torch import nn

from detect.models.components.blur import AnomalyMapSmoother
from detect.models.reconstruction.autoencoder.torch_model import downsampling_plan, output_paddings

SCORE_MODES = ("latent", "map_max")


class DcganEncoder(nn.Module):
    """(N, 3, S, S) -> (N, latent_dim, 1, 1); ``features`` is everything before the final convolution."""

    def __init__(self, image_size: int, latent_dim: int, width: int = 64, extra_layers: int = 0):
        super().__init__()
        sizes = downsampling_plan(image_size)
        stages, final = len(sizes) - 1, sizes[-1]
        layers: list[nn.Module] = [nn.Conv2d(3, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2)]
        channels = width
        for _ in range(extra_layers):
            layers += [nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels),
                       nn.LeakyReLU(0.2)]
        for _ in range(stages - 1):
            layers += [nn.Conv2d(channels, channels * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(channels * 2),
                       nn.LeakyReLU(0.2)]
            channels *= 2
        self.features = nn.Sequential(*layers)
        # Over the whole final grid (4x4 for powers of two, as the DCGAN / paper encoder).
        self.head = nn.Conv2d(channels, latent_dim, final, 1, 0, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class DcganDecoder(nn.Module):
    """(N, latent_dim, 1, 1) -> (N, 3, S, S) in [-1, 1]: the encoder's mirror image."""

    def __init__(self, image_size: int, latent_dim: int, width: int = 64, extra_layers: int = 0):
        super().__init__()
        sizes = downsampling_plan(image_size)
        stages, final = len(sizes) - 1, sizes[-1]
        pads = output_paddings(sizes)  # restore odd grid sizes (none for powers of two)
        channels = width * 2 ** (stages - 1)
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, channels, final, 1, 0, bias=False),
                                   nn.BatchNorm2d(channels), nn.ReLU()]
        for pad in pads[:-1]:
            layers += [nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, output_padding=pad, bias=False),
                       nn.BatchNorm2d(channels // 2), nn.ReLU()]
            channels //= 2
        for _ in range(extra_layers):
            layers += [nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
        layers += [nn.ConvTranspose2d(channels, 3, 4, 2, 1, output_padding=pads[-1], bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.main(latent)


class GanomalyGenerator(nn.Module):
    """x in [-1, 1] -> (x_hat, z, z_hat): encoder G_E, decoder G_D, second encoder E."""

    def __init__(self, image_size: int, latent_dim: int = 100, width: int = 64, extra_layers: int = 0):
        super().__init__()
        self.encoder1 = DcganEncoder(image_size, latent_dim, width, extra_layers)
        self.decoder = DcganDecoder(image_size, latent_dim, width, extra_layers)
        self.encoder2 = DcganEncoder(image_size, latent_dim, width, extra_layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent = self.encoder1(x)
        fake = self.decoder(latent)
        return fake, latent.flatten(1), self.encoder2(fake).flatten(1)


class GanomalyDiscriminator(nn.Module):
    """x in [-1, 1] -> (real/fake logits (N,), intermediate features (N, C, f, f)): G_E's architecture with
    a one-channel head (the reference's sigmoid is folded into the BCE-with-logits loss)."""

    def __init__(self, image_size: int, width: int = 64, extra_layers: int = 0):
        super().__init__()
        self.encoder = DcganEncoder(image_size, 1, width, extra_layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder.features(x)
        return self.encoder.head(features).flatten(), features


class GanomalyModel(nn.Module):
    """Images in [0, 1] (N, 3, S, S) -> (scores (N,), anomaly maps (N, S, S))."""

    def __init__(self, image_size: int, *, latent_dim: int = 100, width: int = 64, extra_layers: int = 0,
                 score_mode: str = "latent", blur_sigma: float = 4.0):
        super().__init__()
        if score_mode not in SCORE_MODES:
            raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
        self.generator = GanomalyGenerator(image_size, latent_dim, width, extra_layers)
        self.score_mode = score_mode
        self.smoother = AnomalyMapSmoother(sigma=blur_sigma)

    @staticmethod
    def to_tanh_range(images: torch.Tensor) -> torch.Tensor:
        """[0, 1] -> [-1, 1], the reference's Normalize((0.5,) * 3, (0.5,) * 3), matching the tanh output."""
        return images * 2.0 - 1.0

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.to_tanh_range(images)
        fake, latent, latent_hat = self.generator(x)
        # |x - x_hat| / 2: the error in [0, 1] image units, averaged over the channels.
        error = (x - fake).abs().mean(dim=1) / 2.0
        maps = self.smoother(error, (images.shape[-2], images.shape[-1]))
        if self.score_mode == "latent":
            scores = (latent - latent_hat).pow(2).mean(dim=1)
        else:
            scores = maps.flatten(1).amax(dim=1)
        return scores, maps
