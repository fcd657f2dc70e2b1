"""DFM detector: PCA of pooled CNN features, scored by reconstruction error or NLL (see ``torch_model``)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from detect.base import Detector, DetectorConfig
from detect.data import ImageInput, iter_batches
from detect.models.components.feature_extractor import BackboneConfig, build_feature_extractor
from detect.models.memory.dfm.torch_model import SCORE_TYPES, DfmModel
from detect.registry import register
from synth.core.errors import InputError

logger = logging.getLogger(__name__)


@dataclass
class DfmConfig(DetectorConfig, BackboneConfig):
    """DFM settings.

    layers: backbone feature indices (later ones upsampled to the first one's size and concatenated;
        tf_efficientnet_lite0 [3]: 112 channels at stride 16).
    pooling_kernel: average-pooling kernel (and stride) applied to the feature map; 1 keeps full resolution.
        The anomaly map has image_size / (stride * pooling_kernel) cells per side (rounded up).
    pca_level: share of the training variance the kept principal components explain, in (0, 1].
    score_type: "fre" (feature reconstruction error) or "nll" (Gaussian negative log-likelihood in PCA space).
    """

    layers: list[int] = field(default_factory=lambda: [3])
    pooling_kernel: int = 4
    pca_level: float = 0.97
    score_type: str = "fre"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(isinstance(self.pooling_kernel, int) and self.pooling_kernel >= 1, "pooling_kernel",
                   "an integer >= 1")
        self.check(0 < self.pca_level <= 1, "pca_level", "in (0, 1]")
        self.check(self.score_type in SCORE_TYPES, "score_type", "'fre' or 'nll'")


@register
class Dfm(Detector):
    """DFM: distance of pooled deep features to the principal subspace of normal features."""

    name = "dfm"
    paradigm = "memory"
    cheap_refit = True
    Config = DfmConfig
    config: DfmConfig

    def build_model(self) -> DfmModel:
        extractor = build_feature_extractor(self.config, loading=self.loading)
        side = math.ceil(math.ceil(self.config.image_size / extractor.reductions[0]) / self.config.pooling_kernel)
        if side == 1 and not self.loading:
            logger.warning("dfm: image_size %d, stride %d and pooling_kernel %d give a 1x1 map: no localisation.",
                           self.config.image_size, extractor.reductions[0], self.config.pooling_kernel)
        return DfmModel(extractor, pooling_kernel=self.config.pooling_kernel, score_type=self.config.score_type)

    @torch.no_grad()
    def _fit(self, images: list[ImageInput], progress: bool) -> None:
        self.model.eval()
        vectors = []
        with tqdm(total=len(images), desc="dfm fit", unit="img", disable=not progress) as bar:
            for batch, _ in iter_batches(images, self.config.image_size, self.config.batch_size):
                pooled = self.model.pooled_features(batch)
                vectors.append(pooled.permute(0, 2, 3, 1).reshape(-1, pooled.shape[1]))
                bar.update(len(batch))
        stacked = torch.cat(vectors)
        if len(stacked) < 2:
            raise InputError(f"{self.name}: needs at least 2 training feature vectors; add images or lower "
                             "pooling_kernel.")
        self.model.pca.fit(stacked, self.config.pca_level)
