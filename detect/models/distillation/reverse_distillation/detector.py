"""Reverse Distillation detector: trains the OCBE bottleneck and the decoder of :class:`ReverseDistillationModel`.

Training as in the paper and the authors' code (RD4AD): the encoder is frozen (eval mode), the bottleneck and
the decoder are trained together (training mode, BatchNorm statistics learnt) with Adam (lr 0.005, betas
(0.5, 0.999)) to minimise the summed ``1 - cos`` between encoder and decoder features of normal images.
The encoder's features are computed once and cached (no augmentation); initialisation is drawn from ``seed``.
Only when the embedding is 1x1 (inputs of 32-ish px) is an incomplete last mini-batch skipped (the images are
reshuffled every epoch): a batch of one image would leave BatchNorm a single value per channel there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from detect.base import Detector, DetectorConfig
from detect.data import ImageInput
from detect.models.components.feature_extractor import BackboneConfig, build_feature_extractor
from detect.models.components.training import TrainingConfig, check_training_config, train_loop
from detect.models.distillation.reverse_distillation.torch_model import (
    MAP_MODES,
    ReverseDistillationModel,
    rd_loss,
    reset_parameters,
)
from detect.registry import register
from synth.core.errors import ConfigError


@dataclass
class ReverseDistillationConfig(DetectorConfig, BackboneConfig, TrainingConfig):
    """Reverse Distillation settings (defaults follow the paper unless noted).

    layers: three consecutive encoder stages, strides s, 2s, 4s (tf_efficientnet_lite0 1, 2, 3: strides
        4, 8, 16, channels 24, 40, 112; the paper uses WideResNet-50's layer1..layer3).
    epochs: passes over the training images (the paper: 200; 100 here, half the CPU time, brick AUROC
        0.93/0.89/0.98 over seeds 0-2 at 100 epochs vs 0.91/0.91/0.97 at 150, 64 px, blur_sigma 1).
    lr, beta1, beta2: Adam settings (paper 0.005, 0.5, 0.999).
    ocbe_blocks: bottleneck blocks of the one-class embedding (reference code: 3 for bottleneck blocks).
    decoder_blocks: blocks of the decoder stages producing stage 3, 2, 1 (WideResNet-50 mirror: 3, 4, 6).
    flatten_loss: compare each stage's whole feature map of an image as one vector (default: the authors'
        reference code and Anomalib do, and it generalises better from few images here: brick image AUROC
        0.89-0.98 over seeds 0-2 vs 0.83-0.92 per position, 100 epochs) instead of per position (the paper's Eq. 2-3).
    map_mode: "sum" of the per-stage maps (the reference code's evaluation) or "product".
    blur_sigma: Gaussian blur of the map, pixels at the input size (paper 4; 0 disables it).
    """

    layers: list[int] = field(default_factory=lambda: [1, 2, 3])
    epochs: int = 100
    lr: float = 0.005
    beta1: float = 0.5
    beta2: float = 0.999
    ocbe_blocks: int = 3
    decoder_blocks: list[int] = field(default_factory=lambda: [3, 4, 6])
    flatten_loss: bool = True
    map_mode: str = "sum"
    blur_sigma: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_training_config(self)
        # DetectorConfig has checked that layers are ascending distinct indices.
        self.check(len(self.layers) == 3, "layers", "three consecutive feature indices, e.g. [1, 2, 3]")
        self.check(0 <= self.beta1 < 1, "beta1", "in [0, 1)")
        self.check(0 <= self.beta2 < 1, "beta2", "in [0, 1)")
        self.check(isinstance(self.ocbe_blocks, int) and self.ocbe_blocks >= 1, "ocbe_blocks", "an integer >= 1")
        self.check(isinstance(self.decoder_blocks, (list, tuple)) and len(self.decoder_blocks) == 3
                   and all(isinstance(b, int) and b >= 1 for b in self.decoder_blocks), "decoder_blocks",
                   "three integers >= 1")
        self.check(isinstance(self.flatten_loss, bool), "flatten_loss", "true or false")
        self.check(self.map_mode in MAP_MODES, "map_mode", f"one of {MAP_MODES}")
        self.check(0 <= self.blur_sigma <= 32, "blur_sigma", "in [0, 32]")


@register
class ReverseDistillation(Detector):
    """Reverse Distillation (Deng & Li, CVPR 2022): a decoder student reconstructs the teacher's features from a
    one-class embedding."""

    name = "reverse_distillation"
    paradigm = "distillation"
    Config = ReverseDistillationConfig
    config: ReverseDistillationConfig

    def build_model(self) -> ReverseDistillationModel:
        cfg = self.config
        encoder = build_feature_extractor(cfg, loading=self.loading)
        r1, r2, r3 = encoder.reductions
        if not (r2 == 2 * r1 and r3 == 4 * r1):
            raise ConfigError(f"{type(cfg).__qualname__}: key 'layers' must be three consecutive stages whose strides "
                              f"double, e.g. [1, 2, 3] (got {cfg.layers!r}: strides {encoder.reductions})")
        self.history: list[float] = []
        return ReverseDistillationModel(encoder, ocbe_blocks=cfg.ocbe_blocks, decoder_blocks=cfg.decoder_blocks,
                                        map_mode=cfg.map_mode, blur_sigma=cfg.blur_sigma)

    def _fit(self, images: list[ImageInput], progress: bool) -> None:
        cfg = self.config
        model: ReverseDistillationModel = self.model
        generator = torch.Generator().manual_seed(cfg.seed)
        reset_parameters(model.bottleneck, generator)
        reset_parameters(model.decoder, generator)

        pixels = self.load_tensor(images)
        bs = cfg.batch_size
        model.eval()
        chunks = [model.encode(pixels[i:i + bs]) for i in range(0, len(pixels), bs)]
        targets = [torch.cat(stage) for stage in zip(*chunks, strict=True)]

        with torch.no_grad():
            tiny_embedding = model.bottleneck([t[:1] for t in targets]).shape[-2:].numel() == 1
        params = list(model.bottleneck.parameters()) + list(model.decoder.parameters())
        optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))

        def step(*features: torch.Tensor) -> torch.Tensor:
            return rd_loss(features, model.reconstruct(features), flatten=cfg.flatten_loss)

        model.train()  # the frozen encoder stays in eval mode (FeatureExtractor.train)
        self.history = train_loop(step, targets, optimizer, epochs=cfg.epochs, batch_size=bs, seed=cfg.seed,
                                  progress=progress, desc=f"{self.name} fit", patience=cfg.patience,
                                  min_delta=cfg.min_delta, drop_last=tiny_embedding)
        model.eval()
