"""FastFlow detector: trains per-stage 2D normalizing flows on frozen CNN features by maximum likelihood.

Training as in the paper / reference code: the loss is the negative log-likelihood of the latents under a
standard normal (constant dropped), ``sum_stages mean_batch(0.5 * sum z^2 - log|det J|)``, minimised with Adam
(lr 1e-3, weight decay 1e-5) over the LayerNorms and flows; the backbone stays frozen. The frozen backbone's
features are computed once and cached when they fit in ``FEATURE_CACHE_BYTES`` (else recomputed per batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from detect.base import Detector, DetectorConfig
from detect.data import ImageInput
from detect.models.components.feature_extractor import BackboneConfig, build_feature_extractor
from detect.models.components.training import FrozenFeatures, TrainingConfig, check_training_config, train_loop
from detect.models.flow.fastflow.torch_model import FastflowModel
from detect.registry import register
from synth.core.errors import ConfigError


@dataclass
class FastflowConfig(DetectorConfig, BackboneConfig, TrainingConfig):
    """FastFlow settings (paper / reference defaults unless noted).

    layers: backbone stages, one flow each (tf_efficientnet_lite0 [1, 2, 3]: strides 4/8/16, 24/40/112 channels;
        the paper uses the first three stages of its CNN backbones).
    flow_steps: coupling blocks per stage (paper 8 for CNN backbones).
    hidden_ratio: subnet hidden channels / subnet input channels (paper 1.0 for ResNet-18 / WideResNet-50).
    clamp: soft clamp of the coupling log-scales (2.0).
    conv3x3_only: 3x3 subnets in every step instead of alternating 3x3 / 1x1.
    epochs, lr, weight_decay: Adam training (paper lr 1e-3, weight decay 1e-5; it trains 500 epochs on MVTec,
        30 suffice for small CPU runs here; longer training overfits small sets).
    blur_sigma: optional Gaussian blur of the anomaly map (0 = none, as the paper).
    """

    layers: list[int] = field(default_factory=lambda: [1, 2, 3])
    flow_steps: int = 8
    hidden_ratio: float = 1.0
    clamp: float = 2.0
    conv3x3_only: bool = False
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 1e-5
    blur_sigma: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_training_config(self)
        self.check(isinstance(self.flow_steps, int) and self.flow_steps >= 1, "flow_steps", "an integer >= 1")
        self.check(self.hidden_ratio > 0, "hidden_ratio", "> 0")
        self.check(self.clamp > 0, "clamp", "> 0")
        self.check(isinstance(self.conv3x3_only, bool), "conv3x3_only", "true or false")
        self.check(self.weight_decay >= 0, "weight_decay", ">= 0")
        self.check(0 <= self.blur_sigma <= 32, "blur_sigma", "in [0, 32]")


@register
class Fastflow(Detector):
    """FastFlow (Yu et al. 2021): per-position likelihood of CNN features under 2D normalizing flows."""

    name = "fastflow"
    paradigm = "flow"
    Config = FastflowConfig
    config: FastflowConfig

    def build_model(self) -> FastflowModel:
        cfg = self.config
        extractor = build_feature_extractor(cfg, loading=self.loading)
        extractor.eval()
        shapes = extractor.feature_shapes(cfg.image_size)
        if any(c < 2 for c, _, _ in shapes):
            raise ConfigError(f"{type(cfg).__qualname__}: key 'layers' must select stages with >= 2 channels "
                              f"(got {cfg.layers!r})")
        self.history: list[float] = []
        return FastflowModel(extractor, shapes, flow_steps=cfg.flow_steps, hidden_ratio=cfg.hidden_ratio,
                             clamp=cfg.clamp, conv3x3_only=cfg.conv3x3_only, blur_sigma=cfg.blur_sigma, seed=cfg.seed)

    def _fit(self, images: list[ImageInput], progress: bool) -> None:
        cfg = self.config
        model: FastflowModel = self.model
        model.reset_parameters(cfg.seed)
        model.eval()
        pixels = self.load_tensor(images)
        n, bs = pixels.shape[0], cfg.batch_size
        features = FrozenFeatures(model.backbone_features, pixels, bs)

        def step(index: torch.Tensor) -> torch.Tensor:
            return model.loss(*model.encode(features(index)))

        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        model.train()
        self.history = train_loop(step, torch.arange(n), optimizer, epochs=cfg.epochs, batch_size=bs, seed=cfg.seed,
                                  progress=progress, desc=f"{self.name} fit", patience=cfg.patience,
                                  min_delta=cfg.min_delta)
        model.eval()
