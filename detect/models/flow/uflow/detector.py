"""U-Flow detector: trains the U-shaped flow by maximum likelihood; NFA gives the automatic pixel threshold.

Training as the reference code: the loss is the negative log-likelihood of all scales' latents under a standard
normal (constant dropped), ``mean_batch(sum_scales 0.5 * sum z^2 - log|det J|)``, minimised with Adam over the
LayerNorms and flow stages (frozen backbone; its features cached once when they fit in memory).

Automatic threshold (``use_nfa_threshold``, default): the anomaly map is ``-log10 NFA`` (see ``torch_model``),
so the a-contrario rule "anomalous where NFA < epsilon = 1" is ``map > 0``: the calibration's pixel threshold is
set to 0 whatever the validation data, and ``predict`` masks follow the NFA rule. The image threshold is
calibrated as for every detector. With ``use_nfa_threshold=False`` the map is the paper's likelihood map
``1 - mean_scales exp(-0.5 mean_c z^2)`` and its pixel threshold is calibrated like any other detector's.
The image score is always the maximum of the likelihood map (as the paper).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from detect.base import Detector, DetectorConfig, ValidationData
from detect.data import ImageInput
from detect.models.components.feature_extractor import BackboneConfig, build_feature_extractor
from detect.models.components.training import FrozenFeatures, TrainingConfig, check_training_config, train_loop
from detect.models.flow.uflow.torch_model import UflowModel
from detect.registry import register
from detect.threshold import Calibration
from synth.core.errors import ConfigError

NFA_PIXEL_THRESHOLD = 0.0  # -log10 NFA > 0  <=>  NFA < epsilon = 1


@dataclass
class UflowConfig(DetectorConfig, BackboneConfig, TrainingConfig):
    """U-Flow settings (reference-code defaults unless noted).

    layers: consecutive backbone stages forming the pyramid, each twice the resolution of the next
        (tf_efficientnet_lite0 [1, 2, 3]: strides 4/8/16, as the reference's ResNet option layers 1-3; the
        paper's default MS-CaiT transformer backbone is not used here).
    flow_steps: coupling blocks per scale (4); hidden_ratio: subnet hidden / input channels (1.0);
    clamp: soft clamp of the log-scales (2.0); permute_soft: rotations instead of hard permutations (off).
    epochs, lr, weight_decay: Adam training (reference lr 1e-3, weight decay 1e-5; it trains 200 epochs with a
        linear lr decay to 0.4x, left out here; 30 epochs for small CPU runs).
    use_nfa_threshold: the anomaly map is -log10 NFA and the pixel threshold its automatic value 0 (NFA < 1);
        false: the likelihood map with a calibrated pixel threshold.
    nfa_window: side of the finest scale's counting window (halved per coarser scale, >= 3x3) (5);
    nfa_probability: per-latent candidate test ``z^2 >= chi2_1 quantile(nfa_probability)`` (0.9).
    blur_sigma: optional Gaussian blur of the likelihood map (0 = none, as the paper).
    """

    layers: list[int] = field(default_factory=lambda: [1, 2, 3])
    flow_steps: int = 4
    hidden_ratio: float = 1.0
    clamp: float = 2.0
    permute_soft: bool = False
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 1e-5
    use_nfa_threshold: bool = True
    nfa_window: int = 5
    nfa_probability: float = 0.9
    blur_sigma: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_training_config(self)
        # (DetectorConfig checked ``layers`` is a non-empty ascending list of indices)
        self.check(list(self.layers) == list(range(self.layers[0], self.layers[0] + len(self.layers))),
                   "layers", "a list of consecutive feature indices (a pyramid halving from scale to scale)")
        self.check(isinstance(self.flow_steps, int) and self.flow_steps >= 1, "flow_steps", "an integer >= 1")
        self.check(self.hidden_ratio > 0, "hidden_ratio", "> 0")
        self.check(self.clamp > 0, "clamp", "> 0")
        self.check(isinstance(self.permute_soft, bool), "permute_soft", "true or false")
        self.check(self.weight_decay >= 0, "weight_decay", ">= 0")
        self.check(isinstance(self.use_nfa_threshold, bool), "use_nfa_threshold", "true or false")
        self.check(isinstance(self.nfa_window, int) and self.nfa_window >= 1, "nfa_window", "an integer >= 1")
        self.check(0 < self.nfa_probability < 1, "nfa_probability", "in (0, 1)")
        self.check(0 <= self.blur_sigma <= 32, "blur_sigma", "in [0, 32]")


@register
class Uflow(Detector):
    """U-Flow (Tailanian et al. 2022): U-shaped multi-scale flow with an a-contrario (NFA) automatic threshold."""

    name = "uflow"
    paradigm = "flow"
    Config = UflowConfig
    config: UflowConfig

    def build_model(self) -> UflowModel:
        cfg = self.config
        extractor = build_feature_extractor(cfg, loading=self.loading)
        extractor.eval()
        shapes = extractor.feature_shapes(cfg.image_size)
        for finer, coarser in zip(shapes[:-1], shapes[1:], strict=True):
            if finer[1] != 2 * coarser[1] or finer[2] != 2 * coarser[2]:
                spatial = [s[1:] for s in shapes]
                raise ConfigError(f"{type(cfg).__qualname__}: key 'image_size' must give feature maps that halve "
                                  f"from scale to scale (layers {cfg.layers} give {spatial}); use a multiple of "
                                  f"{max(extractor.reductions)} (got {cfg.image_size!r})")
        if any(s[0] < 8 for s in shapes[1:]) or shapes[0][0] < 2:
            raise ConfigError(f"{type(cfg).__qualname__}: key 'layers' must select stages with >= 8 channels "
                              f"(got {cfg.layers!r})")
        self.history: list[float] = []
        return UflowModel(extractor, shapes, flow_steps=cfg.flow_steps, hidden_ratio=cfg.hidden_ratio,
                          clamp=cfg.clamp, permute_soft=cfg.permute_soft, nfa_map=cfg.use_nfa_threshold,
                          nfa_window=cfg.nfa_window, nfa_probability=cfg.nfa_probability,
                          blur_sigma=cfg.blur_sigma, seed=cfg.seed)

    def _fit(self, images: list[ImageInput], progress: bool) -> None:
        cfg = self.config
        model: UflowModel = self.model
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

    def _calibrate(self, data: ValidationData) -> Calibration:
        calibration = super()._calibrate(data)
        if self.config.use_nfa_threshold:
            calibration.pixel_threshold = NFA_PIXEL_THRESHOLD
        return calibration
