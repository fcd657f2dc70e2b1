"""FRE detector: trains the tied autoencoder of :class:`FreModel` on pooled normal features (MSE).

Training as in Anomalib: the frozen backbone's pooled, flattened features of the training images are computed
once and cached; the tied autoencoder (Xavier initialisation drawn from ``seed``) is trained with Adam
(lr 1e-3) to minimise the mean squared reconstruction error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from detect.base import Detector, DetectorConfig
from detect.data import ImageInput
from detect.models.components.feature_extractor import BackboneConfig, build_feature_extractor
from detect.models.components.training import TrainingConfig, check_training_config, train_loop
from detect.models.reconstruction.fre.torch_model import SCORE_MODES, FreModel
from detect.registry import register
from synth.core.errors import ConfigError


@dataclass
class FreConfig(DetectorConfig, BackboneConfig, TrainingConfig):
    """FRE settings (defaults follow Anomalib unless noted).

    layers: the one backbone stage used (tf_efficientnet_lite0 3: stride 16, 112 channels, like Anomalib's
        ResNet-50 layer3 at stride 16).
    pooling: average-pooling kernel (and stride) applied to the stage before flattening (Anomalib 2).
    latent_dim: hidden size of the tied autoencoder (Anomalib 220); at most the flattened feature size
        C * (h / pooling) * (w / pooling), e.g. 112 * 2 * 2 = 448 at image_size 64, 7168 at 256.
    epochs: passes over the cached features (Anomalib's trainer default: 220; each epoch costs microseconds).
    lr: Adam learning rate (Anomalib 1e-3).
    score_mode: "sum" of the feature-resolution FRE map (Anomalib: the total reconstruction error) or "max" of
        the upsampled map.
    blur_sigma: Gaussian blur of the upsampled map, pixels at the input size (0: none, as Anomalib).
    """

    layers: list[int] = field(default_factory=lambda: [3])
    pooling: int = 2
    latent_dim: int = 220
    epochs: int = 220
    lr: float = 1e-3
    score_mode: str = "sum"
    blur_sigma: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_training_config(self)
        self.check(len(self.layers) == 1, "layers", "a list of exactly one feature index, e.g. [3]")
        self.check(isinstance(self.pooling, int) and self.pooling >= 1, "pooling", "an integer >= 1")
        self.check(isinstance(self.latent_dim, int) and self.latent_dim >= 1, "latent_dim", "an integer >= 1")
        self.check(self.score_mode in SCORE_MODES, "score_mode", f"one of {SCORE_MODES}")
        self.check(0 <= self.blur_sigma <= 32, "blur_sigma", "in [0, 32]")


@register
class Fre(Detector):
    """FRE (Ndiour et al., BMVC 2023): feature reconstruction error of a shallow linear autoencoder."""

    name = "fre"
    paradigm = "reconstruction"
    Config = FreConfig
    config: FreConfig

    def build_model(self) -> FreModel:
        cfg = self.config
        extractor = build_feature_extractor(cfg, loading=self.loading)
        size = cfg.image_size
        channels, h, w = extractor.feature_shapes(size)[0]
        qualname = type(cfg).__qualname__
        if cfg.pooling > min(h, w):
            raise ConfigError(f"{qualname}: key 'pooling' must be at most {min(h, w)}, the {h}x{w} size of layer "
                              f"{cfg.layers[0]} at image_size {size} (got {cfg.pooling!r})")
        shape = (channels, h // cfg.pooling, w // cfg.pooling)
        input_dim = shape[0] * shape[1] * shape[2]
        if cfg.latent_dim > input_dim:
            raise ConfigError(f"{qualname}: key 'latent_dim' must be at most {input_dim}, the pooled feature size "
                              f"{shape[0]}x{shape[1]}x{shape[2]} of layer {cfg.layers[0]} at image_size {size} "
                              f"(got {cfg.latent_dim!r})")
        self.history: list[float] = []
        return FreModel(extractor, feature_shape=shape, pooling=cfg.pooling, latent_dim=cfg.latent_dim,
                        score_mode=cfg.score_mode, blur_sigma=cfg.blur_sigma)

    def _fit(self, images: list[ImageInput], progress: bool) -> None:
        cfg = self.config
        model: FreModel = self.model
        model.autoencoder.reset_parameters(torch.Generator().manual_seed(cfg.seed))
        pixels = self.load_tensor(images)
        bs = cfg.batch_size
        model.eval()
        features = torch.cat([model.features(pixels[i:i + bs]) for i in range(0, len(pixels), bs)])

        optimizer = torch.optim.Adam(model.autoencoder.parameters(), lr=cfg.lr)

        def step(batch: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(model.autoencoder(batch), batch)

        self.history = train_loop(step, features, optimizer, epochs=cfg.epochs, batch_size=bs, seed=cfg.seed,
                                  progress=progress, desc=f"{self.name} fit", patience=cfg.patience,
                                  min_delta=cfg.min_delta)
