"""DFKDE detector: Gaussian KDE of PCA-reduced, pooled CNN features (see ``torch_model``). Image-level only."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from detect.base import Detector, DetectorConfig
from detect.data import ImageInput, iter_batches
from detect.models.components.feature_extractor import BackboneConfig, build_feature_extractor
from detect.models.memory.dfkde.torch_model import SCALING_METHODS, DfkdeModel
from detect.registry import register
from synth.core.errors import InputError


@dataclass
class DfkdeConfig(DetectorConfig, BackboneConfig):
    """DFKDE settings.

    layers: backbone feature indices, each globally average-pooled and concatenated
        (tf_efficientnet_lite0 [4]: 320 channels at stride 32).
    n_components: PCA dimensions (capped at training vectors - 1 and at the feature channels).
    feature_scaling: "scale" (divide by the largest training-vector norm, Anomalib's default), "norm"
        (every vector to unit length) or "none".
    max_training_points: training vectors kept for the KDE (random subsample, seeded, when there are more).

    There is no localisation: anomaly maps are the image score broadcast over the image.
    """

    layers: list[int] = field(default_factory=lambda: [4])
    n_components: int = 16
    feature_scaling: str = "scale"
    max_training_points: int = 40000

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(isinstance(self.n_components, int) and self.n_components >= 1, "n_components", "an integer >= 1")
        self.check(self.feature_scaling in SCALING_METHODS, "feature_scaling", "'scale', 'norm' or 'none'")
        self.check(isinstance(self.max_training_points, int) and self.max_training_points >= 2,
                   "max_training_points", "an integer >= 2")


@register
class Dfkde(Detector):
    """DFKDE: negative log of a kernel density estimate over normal images' pooled deep features."""

    name = "dfkde"
    paradigm = "memory"
    cheap_refit = True
    Config = DfkdeConfig
    config: DfkdeConfig

    def build_model(self) -> DfkdeModel:
        extractor = build_feature_extractor(self.config, loading=self.loading)
        return DfkdeModel(extractor, n_components=self.config.n_components,
                          feature_scaling=self.config.feature_scaling)

    @torch.no_grad()
    def _fit(self, images: list[ImageInput], progress: bool) -> None:
        if len(images) < 2:
            raise InputError(f"{self.name}: needs at least 2 training images (got {len(images)}).")
        self.model.eval()
        features = []
        with tqdm(total=len(images), desc="dfkde fit", unit="img", disable=not progress) as bar:
            for batch, _ in iter_batches(images, self.config.image_size, self.config.batch_size):
                features.append(self.model.pooled_features(batch))
                bar.update(len(batch))
        stacked = torch.cat(features)
        if len(stacked) > self.config.max_training_points:
            keep = np.random.default_rng(self.config.seed).choice(len(stacked), self.config.max_training_points,
                                                                  replace=False)
            stacked = stacked[torch.from_numpy(np.sort(keep))]
        self.model.kde.fit(stacked, self.config.n_components)
