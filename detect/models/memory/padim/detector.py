"""PaDiM detector: per-position Gaussians of pretrained CNN features (see ``torch_model``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from detect.base import Detector, DetectorConfig
from detect.data import ImageInput, iter_batches
from detect.models.components.feature_extractor import BackboneConfig, build_feature_extractor
from detect.models.memory.padim.torch_model import PadimModel, RunningGaussian
from detect.registry import register
from synth.core.errors import ConfigError


@dataclass
class PadimConfig(DetectorConfig, BackboneConfig):
    """PaDiM settings.

    layers: backbone feature indices, upsampled to the first one's resolution and concatenated
        (tf_efficientnet_lite0 [1, 2, 3]: strides 4/8/16, 24 + 40 + 112 = 176 channels).
    n_features: size of the random channel subset (seeded by ``seed``); at most the concatenated channels.
    covariance_eps: ``eps * I`` added to every position's covariance.
    blur_sigma: sigma (pixels, at the input size) of the Gaussian blur of the anomaly map; 0 disables it.
    """

    layers: list[int] = field(default_factory=lambda: [1, 2, 3])
    n_features: int = 100
    covariance_eps: float = 0.01
    blur_sigma: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(isinstance(self.n_features, int) and self.n_features >= 1, "n_features", "an integer >= 1")
        self.check(self.covariance_eps > 0, "covariance_eps", "> 0")
        self.check(0 <= self.blur_sigma <= 32, "blur_sigma", "in [0, 32]")


@register
class Padim(Detector):
    """PaDiM: Mahalanobis distance of each patch embedding to a per-position Gaussian of normal patches."""

    name = "padim"
    paradigm = "memory"
    cheap_refit = True
    Config = PadimConfig
    config: PadimConfig

    def build_model(self) -> PadimModel:
        extractor = build_feature_extractor(self.config, loading=self.loading)
        total = sum(extractor.channels)
        if self.config.n_features > total:
            raise ConfigError(f"{type(self.config).__qualname__}: key 'n_features' must be at most {total}, the "
                              f"channels of {self.config.backbone} layers {self.config.layers} "
                              f"(got {self.config.n_features})")
        return PadimModel(extractor, image_size=self.config.image_size, n_features=self.config.n_features,
                          seed=self.config.seed, blur_sigma=self.config.blur_sigma)

    @torch.no_grad()
    def _fit(self, images: list[ImageInput], progress: bool) -> None:
        self.model.eval()
        gaussian = RunningGaussian()
        with tqdm(total=len(images), desc="padim fit", unit="img", disable=not progress) as bar:
            for batch, _ in iter_batches(images, self.config.image_size, self.config.batch_size):
                embedding = self.model.embed(batch)
                gaussian.update(embedding.flatten(2))
                bar.update(len(batch))
        mean, covariance = gaussian.finalize(self.config.covariance_eps)
        self.model.set_gaussian(mean, covariance)
