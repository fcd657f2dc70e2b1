"""CFlow detector: trains the per-scale conditional flows on randomly sampled fiber batches (CFLOW-AD).

Training, as in the paper / reference code: the frozen encoder's feature maps of the training images are cut
into fibers (the C-dim feature vector of one position, with its positional encoding as condition). Every epoch
visits each scale's fibers once, in random fiber batches of ``fiber_batch_size``; each fiber batch of each scale
is one Adam step on ``-logsigmoid(log p / C)`` averaged over the batch (the reference's loss). Fiber batches of
all scales are interleaved in a seeded random order; the decoders share no parameters, so this equals the
reference's layer-by-layer loop up to the order of the steps.

The fibers are cached once (the encoder is frozen); when they would exceed ``FEATURE_CACHE_BYTES`` a seeded
random subset of each scale's fibers is kept (the positions of a feature map are highly redundant).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from detect.base import Detector, DetectorConfig
from detect.data import ImageInput
from detect.models.components.feature_extractor import BackboneConfig, build_feature_extractor
from detect.models.components.training import FEATURE_CACHE_BYTES, TrainingConfig, check_training_config, train_loop
from detect.models.flow.cflow.torch_model import CflowModel
from detect.registry import register
from synth.core.errors import ConfigError

logger = logging.getLogger(__name__)

ACTNORM_INIT_FIBERS = 4096


@dataclass
class CflowConfig(DetectorConfig, BackboneConfig, TrainingConfig):
    """CFlow settings (paper / reference defaults unless noted).

    layers: encoder stages, one decoder each (tf_efficientnet_lite0 [1, 2, 3]: strides 4/8/16; the paper uses
        three pooling layers of its encoders).
    coupling_blocks: coupling blocks per decoder (8); clamp: soft clamp of the log-scales (1.9).
    condition_vector: channels of the 2D positional encoding (128; a multiple of 4).
    permute_soft: random rotations between blocks (as the reference) instead of hard permutations.
    fiber_batch_size: fibers per optimisation step (the reference uses 256).
    actnorm_init: Glow's data-dependent initialisation of the blocks' global affine (ActNorm) on a sample of
        training fibers (not in the reference, whose global affines start at the identity). The encoder's raw
        features are far from unit scale (tf_efficientnet_lite0 stage outputs have std ~ 5-7), and at lr 2e-4
        the identity start spends most of a short CPU training learning that scale; starting standardised
        removes this. False reproduces the reference initialisation.
    epochs, lr: Adam training (paper lr 2e-4; it trains 200 epochs with warm-up and cosine decay, which are
        left out here; 10 epochs for CPU runs).
    blur_sigma: optional Gaussian blur of the anomaly map (0 = none, as the paper).
    """

    layers: list[int] = field(default_factory=lambda: [1, 2, 3])
    coupling_blocks: int = 8
    clamp: float = 1.9
    condition_vector: int = 128
    permute_soft: bool = True
    fiber_batch_size: int = 256
    actnorm_init: bool = True
    epochs: int = 10
    lr: float = 2e-4
    blur_sigma: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_training_config(self)
        self.check(isinstance(self.coupling_blocks, int) and self.coupling_blocks >= 1, "coupling_blocks",
                   "an integer >= 1")
        self.check(self.clamp > 0, "clamp", "> 0")
        self.check(isinstance(self.condition_vector, int) and self.condition_vector >= 4
                   and self.condition_vector % 4 == 0, "condition_vector", "a multiple of 4, >= 4")
        self.check(isinstance(self.permute_soft, bool), "permute_soft", "true or false")
        self.check(isinstance(self.actnorm_init, bool), "actnorm_init", "true or false")
        self.check(isinstance(self.fiber_batch_size, int) and self.fiber_batch_size >= 2, "fiber_batch_size",
                   "an integer >= 2")
        self.check(0 <= self.blur_sigma <= 32, "blur_sigma", "in [0, 32]")


@register
class Cflow(Detector):
    """CFLOW-AD (Gudovskiy et al., WACV 2022): position-conditioned flows on CNN feature vectors."""

    name = "cflow"
    paradigm = "flow"
    Config = CflowConfig
    config: CflowConfig

    def build_model(self) -> CflowModel:
        cfg = self.config
        extractor = build_feature_extractor(cfg, loading=self.loading)
        extractor.eval()
        shapes = extractor.feature_shapes(cfg.image_size)
        if any(c < 2 for c, _, _ in shapes):
            raise ConfigError(f"{type(cfg).__qualname__}: key 'layers' must select stages with >= 2 channels "
                              f"(got {cfg.layers!r})")
        self.history: list[float] = []
        return CflowModel(extractor, shapes, coupling_blocks=cfg.coupling_blocks, clamp=cfg.clamp,
                          condition_vector=cfg.condition_vector, permute_soft=cfg.permute_soft,
                          blur_sigma=cfg.blur_sigma, seed=cfg.seed)

    def _fit(self, images: list[ImageInput], progress: bool) -> None:
        cfg = self.config
        model: CflowModel = self.model
        model.reset_parameters(cfg.seed)
        model.eval()
        generator = torch.Generator().manual_seed(cfg.seed)
        pixels = self.load_tensor(images)
        n, bs = pixels.shape[0], cfg.batch_size
        features = [torch.cat(stage) for stage in zip(
            *[model.backbone_features(pixels[i:i + bs]) for i in range(0, n, bs)], strict=True)]

        # Fibers (E, C) per scale with the index of their position (for the condition).
        fibers, positions = [], []
        budget = FEATURE_CACHE_BYTES // len(features)
        for scale, feature in enumerate(features):
            _, c, h, w = feature.shape
            flat = feature.permute(0, 2, 3, 1).reshape(-1, c)
            where = torch.arange(h * w).repeat(n)
            limit = max(cfg.fiber_batch_size, budget // (c * flat.element_size()))
            if flat.shape[0] > limit:
                logger.info("cflow: scale %d keeps %d of %d training fibers (cache limit)", scale, limit, len(flat))
                keep = torch.randperm(flat.shape[0], generator=generator)[:limit]
                flat, where = flat[keep], where[keep]
            fibers.append(flat.contiguous())
            positions.append(where)
        conditions = [model.position(s).permute(1, 2, 0).reshape(-1, cfg.condition_vector)
                      for s in range(len(features))]

        # One row per optimisation step of an epoch: (scale, fiber-batch index).
        fb = cfg.fiber_batch_size
        chunks = [-(-len(f) // fb) for f in fibers]
        schedule = torch.tensor([(s, k) for s, count in enumerate(chunks) for k in range(count)], dtype=torch.long)
        orders: list[torch.Tensor] = []

        def shuffle_fibers(*_: object) -> None:
            orders[:] = [torch.randperm(len(f), generator=generator) for f in fibers]

        def step(row: torch.Tensor) -> torch.Tensor:
            scale, chunk = (int(v) for v in row[0])
            index = orders[scale][chunk * fb:(chunk + 1) * fb]
            log_prob = model.fiber_log_prob(scale, fibers[scale][index], conditions[scale][positions[scale][index]])
            return -F.logsigmoid(log_prob).mean()

        if cfg.actnorm_init:
            for scale, decoder in enumerate(model.decoders):
                sample = torch.randperm(len(fibers[scale]), generator=generator)[:ACTNORM_INIT_FIBERS]
                decoder.initialize_global_affine(fibers[scale][sample], conditions[scale][positions[scale][sample]])
        shuffle_fibers()
        optimizer = torch.optim.Adam(model.decoders.parameters(), lr=cfg.lr)
        model.train()
        self.history = train_loop(step, schedule, optimizer, epochs=cfg.epochs, batch_size=1, seed=cfg.seed,
                                  progress=progress, desc=f"{self.name} fit", patience=cfg.patience,
                                  min_delta=cfg.min_delta, on_epoch_end=shuffle_fibers)
        model.eval()
        self._set_normalisers(features)

    @torch.no_grad()
    def _set_normalisers(self, features: list[torch.Tensor]) -> None:
        """Per-scale max of log p / C and the max of the summed likelihood map over the training images."""
        model: CflowModel = self.model
        bs = self.config.batch_size
        n = features[0].shape[0]
        maxima = torch.full((len(features),), -torch.inf)
        for i in range(0, n, bs):
            maps = model.log_prob_maps([f[i:i + bs] for f in features])
            maxima = torch.maximum(maxima, torch.stack([m.amax() for m in maps]))
        model.log_prob_max.copy_(maxima)
        size = (self.config.image_size, self.config.image_size)
        score_max = max(float(model.likelihood_sum(model.log_prob_maps([f[i:i + bs] for f in features]), size).amax())
                        for i in range(0, n, bs))
        model.score_max.fill_(score_max)
