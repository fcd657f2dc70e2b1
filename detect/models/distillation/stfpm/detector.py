"""STFPM detector: trains the student of :class:`StfpmModel` to match the frozen teacher's feature pyramid.

Training as in the paper: the student (same architecture as the teacher, random initialisation drawn from
``seed``) is trained on normal images only with the feature-pyramid matching loss (``stfpm_loss``). The
teacher's features are computed once and cached (no augmentation), the student runs in training mode (its
BatchNorm statistics are learnt as well) and is switched to eval mode for inference.

Optimiser: the paper's SGD (lr 0.4, momentum 0.9, weight decay 1e-4). It converges within a few dozen steps
even on a dozen 64-px images (loss / 7 in 20 steps on the brick crops), so it is the default; the paper
trains 100 epochs at batch size 32, the default here is 50 epochs (the paper's schedule costs hours on a
CPU at 256 px). ``optimizer="adam"`` (with e.g. ``lr=1e-3``) is available as an alternative.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from detect.base import Detector, DetectorConfig
from detect.data import ImageInput
from detect.models.components.feature_extractor import BackboneConfig, FeatureExtractor, build_feature_extractor
from detect.models.components.training import TrainingConfig, check_training_config, train_loop
from detect.models.distillation.stfpm.torch_model import MAP_MODES, StfpmModel, reset_parameters, stfpm_loss
from detect.registry import register

OPTIMIZERS = ("sgd", "adam")


@dataclass
class StfpmConfig(DetectorConfig, BackboneConfig, TrainingConfig):
    """STFPM settings.

    layers: pyramid levels matched (tf_efficientnet_lite0 1, 2, 3: strides 4, 8, 16; the paper uses ResNet-18's
        conv2_x..conv4_x, strides 4, 8, 16).
    epochs: passes over the training images (paper 100; 50 here, enough for small training sets).
    lr: learning rate (paper 0.4 with SGD; use about 1e-3 with Adam).
    patience, min_delta: early stopping (see ``TrainingConfig``).
    optimizer: "sgd" (the paper's, default) or "adam".
    momentum: SGD momentum (paper 0.9); ignored by Adam.
    weight_decay: L2 penalty of either optimiser (paper 1e-4).
    map_mode: "product" (paper: element-wise product of the per-level maps) or "sum".
    blur_sigma: Gaussian blur of the final map, pixels at the input size (0: none, as the paper).
    """

    layers: list[int] = field(default_factory=lambda: [1, 2, 3])
    epochs: int = 50
    lr: float = 0.4
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    map_mode: str = "product"
    blur_sigma: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_training_config(self)
        self.check(self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}")
        self.check(0 <= self.momentum < 1, "momentum", "in [0, 1)")
        self.check(self.weight_decay >= 0, "weight_decay", ">= 0")
        self.check(self.map_mode in MAP_MODES, "map_mode", f"one of {MAP_MODES}")
        self.check(0 <= self.blur_sigma <= 32, "blur_sigma", "in [0, 32]")


@register
class Stfpm(Detector):
    """STFPM (Wang et al., BMVC 2021): student-teacher feature pyramid matching."""

    name = "stfpm"
    paradigm = "distillation"
    Config = StfpmConfig
    config: StfpmConfig

    def build_model(self) -> StfpmModel:
        cfg = self.config
        teacher = build_feature_extractor(cfg, loading=self.loading)
        # Same architecture, random weights, trainable; never the pretrained (or user-supplied) weights.
        student = FeatureExtractor(cfg.backbone, cfg.layers, pretrained=False, trainable=True)
        self.history: list[float] = []
        return StfpmModel(teacher, student, map_mode=cfg.map_mode, blur_sigma=cfg.blur_sigma)

    def _fit(self, images: list[ImageInput], progress: bool) -> None:
        cfg = self.config
        model: StfpmModel = self.model
        reset_parameters(model.student, torch.Generator().manual_seed(cfg.seed))

        pixels = self.load_tensor(images)
        bs = cfg.batch_size
        model.eval()
        chunks = [model.teacher_features(pixels[i:i + bs]) for i in range(0, len(pixels), bs)]
        targets = [torch.cat(level) for level in zip(*chunks, strict=True)]

        params = [p for p in model.student.parameters() if p.requires_grad]
        if cfg.optimizer == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                                               weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

        def step(batch: torch.Tensor, *teacher: torch.Tensor) -> torch.Tensor:
            return stfpm_loss(list(teacher), model.student(batch))

        model.student.train()
        self.history = train_loop(step, [pixels, *targets], optimizer, epochs=cfg.epochs, batch_size=bs,
                                  seed=cfg.seed, progress=progress, desc=f"{self.name} fit",
                                  patience=cfg.patience, min_delta=cfg.min_delta)
        model.eval()
