"""Autoencoder detector: trains :class:`AutoencoderModel`'s convolutional autoencoder on normal images only.

Training: the autoencoder (He initialisation drawn from ``seed``) learns to reconstruct the training images
with Adam under a pixel loss: L2 (default), SSIM (Bergmann et al., VISAPP 2019) or ``L2 + ssim_weight *
(1 - SSIM)``. Optional seeded flips (``augment``) enlarge tiny training sets of flip-invariant textures.

Default choice, measured on the brick crops of the tests (64 px, 13 training crops): the L2 error map gives
image AUROC about 0.97-1.0, the SSIM and L2 + SSIM maps 0.6-0.85, whichever loss is used (the planted dark
spots and bright scratches are intensity defects, and SSIM of a still-blurry reconstruction flags normal
texture everywhere). Bergmann et al. favour SSIM for structural defects on large, well-trained models; the
options stay available.

Deviations from Bergmann et al. (CPU-sized defaults): a narrower network (``width`` 32, capped at 8 x width
channels) whose depth adapts to ``image_size`` (see ``downsampling_plan``), whole images instead of random
patches, tens of epochs instead of hundreds of thousands of steps, L2 loss by default. The anomaly map is the
reconstruction error smoothed by the shared Gaussian ``AnomalyMapSmoother`` (the paper thresholds the raw
SSIM map; here detect.threshold calibrates).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from detect.base import Detector, DetectorConfig
from detect.data import ImageInput
from detect.models.components.training import TrainingConfig, check_training_config, train_loop
from detect.models.reconstruction.autoencoder.torch_model import (
    BOTTLENECKS,
    LOSSES,
    MAP_MODES,
    SCORE_MODES,
    AutoencoderModel,
)
from detect.registry import register


@dataclass
class AutoencoderConfig(DetectorConfig, TrainingConfig):
    """Convolutional autoencoder settings.

    width: channels of the first encoder stage; each further stage doubles them (at most 8 x width). The
        number of stride-2 stages follows from image_size (down to a 4..7 px grid: 4 stages at 64 px).
    latent_dim: size of the code: a vector (bottleneck "dense", Bergmann et al.: 100) or the channels of the
        4..7 px grid (bottleneck "spatial", which keeps more detail and also reconstructs more of a defect).
    extra_convs: a 3x3 convolution after every strided one (Bergmann et al.'s architecture).
    loss: training loss, "l2", "ssim" or "l2_ssim" (mse + ssim_weight * (1 - SSIM)).
    ssim_weight: weight of the SSIM term in the "l2_ssim" loss and map.
    map_mode: per-pixel error making the anomaly map: "l2" (squared error averaged over channels), "ssim"
        ((1 - SSIM) / 2 averaged over channels) or "l2_ssim" (l2 + ssim_weight * ssim).
    score_mode: image score, "max" of the map or "topk" (mean of its topk_percent % highest pixels).
    topk_percent: share of pixels averaged by score_mode "topk", in (0, 100].
    blur_sigma: Gaussian blur of the error map, pixels at the input size (0: none).
    augment: random horizontal and vertical flips of the training images (seeded).
    epochs, lr: Adam on mini-batches of batch_size; patience, min_delta: early stopping (``TrainingConfig``).
    weight_decay: Adam's L2 penalty (Bergmann et al. 1e-5).
    """

    width: int = 32
    latent_dim: int = 100
    bottleneck: str = "dense"
    extra_convs: bool = True
    loss: str = "l2"
    ssim_weight: float = 1.0
    map_mode: str = "l2"
    score_mode: str = "max"
    topk_percent: float = 1.0
    blur_sigma: float = 4.0
    augment: bool = False
    epochs: int = 50
    lr: float = 1e-3
    weight_decay: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_training_config(self)
        self.check(isinstance(self.width, int) and 1 <= self.width <= 512, "width", "an integer in [1, 512]")
        self.check(isinstance(self.latent_dim, int) and self.latent_dim >= 1, "latent_dim", "an integer >= 1")
        self.check(self.bottleneck in BOTTLENECKS, "bottleneck", f"one of {BOTTLENECKS}")
        self.check(isinstance(self.extra_convs, bool), "extra_convs", "true or false")
        self.check(self.loss in LOSSES, "loss", f"one of {LOSSES}")
        self.check(self.ssim_weight >= 0, "ssim_weight", ">= 0")
        self.check(self.map_mode in MAP_MODES, "map_mode", f"one of {MAP_MODES}")
        self.check(self.score_mode in SCORE_MODES, "score_mode", f"one of {SCORE_MODES}")
        self.check(0 < self.topk_percent <= 100, "topk_percent", "in (0, 100]")
        self.check(0 <= self.blur_sigma <= 32, "blur_sigma", "in [0, 32]")
        self.check(isinstance(self.augment, bool), "augment", "true or false")
        self.check(self.weight_decay >= 0, "weight_decay", ">= 0")


def random_flips(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image of (N, 3, H, W) horizontally and/or vertically with probability 1/2 each (seeded)."""
    flips = torch.rand(batch.shape[0], 2, generator=generator) < 0.5
    out = batch.clone()
    out[flips[:, 0]] = out[flips[:, 0]].flip(-1)
    out[flips[:, 1]] = out[flips[:, 1]].flip(-2)
    return out


@register
class Autoencoder(Detector):
    """Convolutional autoencoder baseline: per-pixel L2 / SSIM reconstruction error."""

    name = "autoencoder"
    paradigm = "reconstruction"
    Config = AutoencoderConfig
    config: AutoencoderConfig

    def build_model(self) -> AutoencoderModel:
        cfg = self.config
        self.history: list[float] = []
        return AutoencoderModel(cfg.image_size, width=cfg.width, latent_dim=cfg.latent_dim,
                                bottleneck=cfg.bottleneck, extra_convs=cfg.extra_convs, map_mode=cfg.map_mode,
                                ssim_weight=cfg.ssim_weight, score_mode=cfg.score_mode,
                                topk_percent=cfg.topk_percent, blur_sigma=cfg.blur_sigma)

    def _fit(self, images: list[ImageInput], progress: bool) -> None:
        cfg = self.config
        model: AutoencoderModel = self.model
        model.autoencoder.reset_parameters(torch.Generator().manual_seed(cfg.seed))
        pixels = self.load_tensor(images)
        optimizer = torch.optim.Adam(model.autoencoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        # Its own stream, apart from the loop's shuffling generator: same seed, same flips.
        flip_generator = torch.Generator().manual_seed(cfg.seed + 1)

        def step(batch: torch.Tensor) -> torch.Tensor:
            if cfg.augment:
                batch = random_flips(batch, flip_generator)
            return model.loss(batch, cfg.loss)

        model.train()
        self.history = train_loop(step, pixels, optimizer, epochs=cfg.epochs, batch_size=cfg.batch_size,
                                  seed=cfg.seed, progress=progress, desc=f"{self.name} fit",
                                  patience=cfg.patience, min_delta=cfg.min_delta)
        model.eval()
