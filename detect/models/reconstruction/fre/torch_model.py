"""FRE inference module: reconstruction error of pretrained CNN features through a shallow linear autoencoder.

Ndiour, Ahuja, Tickoo: "FRE: A Fast Method For Anomaly Detection And Segmentation", BMVC 2023; Anomalib's
``Fre`` model.

- Features: one stage of the frozen backbone, average-pooled with a ``pooling`` x ``pooling`` kernel (stride
  ``pooling``) to shrink it, then flattened per image into one vector of D = C * h * w values (the whole
  feature tensor, so the transform is position-aware, as in the paper and Anomalib).
- Tied autoencoder (trained): ``z = W x + b_e``, ``x_hat = W^T z + b_d`` with W of shape (latent, D), i.e.
  one linear hidden layer whose decoder is the encoder's transpose, the learnt counterpart of the paper's PCA
  projection.
- Feature reconstruction error (FRE): ``(x - x_hat)^2`` reshaped to (C, h, w) and summed over channels gives
  the (h, w) anomaly map, bilinearly upsampled to the input size (optionally Gaussian-smoothed, ``blur_sigma``;
  Anomalib uses none). The image score is the total FRE, the sum of the (h, w) map (Anomalib), or the
  maximum of the upsampled map.

``forward`` is plain torch: exporting the module exports the whole model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from detect.models.components.blur import AnomalyMapSmoother
from detect.models.components.feature_extractor import FeatureExtractor

SCORE_MODES = ("sum", "max")


class TiedAutoencoder(nn.Module):
    """Shallow linear autoencoder with tied weights: (N, D) -> (N, D) through a (N, latent) code."""

    def __init__(self, input_dim: int, latent_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(latent_dim, input_dim))
        self.encoder_bias = nn.Parameter(torch.zeros(latent_dim))
        self.decoder_bias = nn.Parameter(torch.zeros(input_dim))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Xavier-uniform weight (as Anomalib) drawn from ``generator``, zero biases."""
        nn.init.xavier_uniform_(self.weight, generator=generator)
        nn.init.zeros_(self.encoder_bias)
        nn.init.zeros_(self.decoder_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.weight, self.encoder_bias), self.weight.t(), self.decoder_bias)


class FreModel(nn.Module):
    """Images in [0, 1] (N, 3, S, S) -> (scores (N,), anomaly maps (N, S, S))."""

    def __init__(self, extractor: FeatureExtractor, *, feature_shape: tuple[int, int, int], pooling: int,
                 latent_dim: int, score_mode: str = "sum", blur_sigma: float = 0.0):
        super().__init__()
        if score_mode not in SCORE_MODES:
            raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
        self.extractor = extractor
        self.pooling = pooling
        self.feature_shape = tuple(int(v) for v in feature_shape)
        channels, h, w = self.feature_shape
        self.autoencoder = TiedAutoencoder(channels * h * w, latent_dim)
        self.score_mode = score_mode
        self.smoother = AnomalyMapSmoother(sigma=blur_sigma)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features of the chosen stage, flattened per image: (N, C * h * w)."""
        features = self.extractor(images)[0]
        if self.pooling > 1:
            features = F.avg_pool2d(features, kernel_size=self.pooling)
        return features.flatten(1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(images)
        error = (features - self.autoencoder(features)).pow(2)
        channels, h, w = self.feature_shape
        fre = error.view(-1, channels, h, w).sum(dim=1)  # (N, h, w)
        maps = self.smoother(fre, (images.shape[-2], images.shape[-1]))
        scores = fre.flatten(1).sum(dim=1) if self.score_mode == "sum" else maps.flatten(1).amax(dim=1)
        return scores, maps
