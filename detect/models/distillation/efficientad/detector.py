"""EfficientAD detector: distils the PDN teacher, then trains student + autoencoder (see ``torch_model``).

Training, as in the paper (Algorithm 1 and appendix) and the authors' reference code, with the offline
substitutions listed under "Deviations":

1. Teacher pretraining. The paper distils the PDN teacher once on ImageNet from WideResNet-101 features
   (layers 2 and 3 of a 512 px input, PatchCore's 3x3 local averaging, layer 3 upsampled to layer 2, both
   projected to 384 channels, standardised per channel) with an MSE loss, the PDN padded and fed 256 px,
   so its output (64x64) matches the target grid. Here the same recipe runs at every ``fit`` with the
   default offline backbone (``tf_efficientnet_lite0``): ``layers`` [2, 3] (strides 8 and 16) of the image
   upsampled 2x, so stride 8 of the backbone = stride 4 of the PDN input, exactly as in the paper;
   3x3 local averaging; stage 3 upsampled bilinearly to stage 2; the 40 + 112 = 152 channels standardised
   and mapped to 384 channels by a fixed, seeded matrix with orthonormal columns (an isometry; the paper's
   PatchCore pooling reduces 1536 -> 384, which would not expand 152); then standardised per channel
   (paper). Distillation images: the training normals plus a generic pool (below); random grayscale 0.1.
2. Teacher channel mean/std of the frozen, unpadded teacher on the training images (paper).
3. Student and autoencoder, jointly, with Adam (weight decay 1e-5) and the learning rate divided by 10
   after 95 % of the epochs (paper: after 95 % of 70 000 steps):
   - L_hard: per image, the mean of the largest (1 - p_hard) share (p_hard = 0.999) of the squared
     differences between the standardised teacher output and the student's first 384 channels,
   - penalty: mean squared first-half student output on pool images (paper: ImageNet; grayscale p 0.3),
   - L_AE: mean squared difference autoencoder vs teacher on an augmented copy of the image (one of
     brightness / contrast / saturation jitter, factor in [0.8, 1.2], chosen at random as in the paper),
   - L_STAE: mean squared difference of the student's second half vs the autoencoder on that copy;
   loss = L_hard + penalty + L_AE + L_STAE.
4. Map normalisation: the 0.9 and 0.995 quantiles of the local and the global maps on normal images not
   used for training (paper: a 10 % validation split of the training images). Here these are the normal
   validation images of ``fit``: the ``val_fraction`` of the training normals that ``fit`` holds out for
   threshold calibration, or the normal images of the ``val`` data given to ``fit`` (so no further images are
   taken from training). ``_fit`` first sets them from the training images (a model usable on its own);
   ``_calibrate`` replaces them from the validation normals before calibrating the threshold. Only when
   there are no held-out normals (fewer than 5 training images, or ``val_fraction`` 0) do the training
   images' quantiles stay.

Deviations from the paper (all for offline CPU training; see the config docstring for the numbers):
- Teacher: distilled from EfficientNet-Lite0 (not WideResNet-101) on the training normals plus a small
  pool of generic photos (not ImageNet), for ``teacher_epochs`` passes instead of 60 000 steps of batch 16.
  This, not the architecture, is the main accuracy gap to the paper: the PDN teacher sees a few hundred
  images instead of 1.2 M, so its features are less generic.
- Generic image pool: ``pool_size`` random crops (side 1/4 to 1 of the shorter side, random flips) of
  scikit-image's bundled photos (astronaut, camera, cat, coffee, rocket, Hubble deep field, retina,
  immunohistochemistry, coins, moon, page, text, cell, colour wheel; the brick/grass/gravel textures are
  left out because ``synth.toyset`` builds test sets from them), or of ``distillation_images`` when given.
  It serves as the distillation data and as the penalty images (paper: ImageNet for both).
- Few epochs with mini-batches (``train_batch_size``) and a larger learning rate instead of 70 000
  single-image steps at 1e-4; the hard-loss quantile is taken per image, as with the paper's batch size 1.
- The autoencoder's latent kernel and decoder sizes scale with the input size (see ``AutoEncoder``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from detect.base import Detector, DetectorConfig, ValidationData
from detect.data import ImageInput, iter_batches, load_rgb
from detect.models.components.feature_extractor import BackboneConfig, FeatureExtractor, build_feature_extractor
from detect.models.components.training import TrainingConfig, check_training_config, train_loop
from detect.models.distillation.efficientad.torch_model import MODEL_SIZES, TEACHER_CHANNELS, EfficientAdModel
from detect.registry import register
from detect.threshold import Calibration
from synth.core.errors import ConfigError, InputError
from synth.core.io import list_images

GENERIC_PHOTOS = ("astronaut", "camera", "cat", "coffee", "rocket", "hubble_deep_field", "retina",
                  "immunohistochemistry", "coins", "moon", "page", "text", "cell", "colorwheel")
"""scikit-image photos of the default generic image pool (no brick/grass/gravel: synth.toyset uses them)."""

Q_START, Q_END = 0.9, 0.995
"""Quantiles of normal-image maps mapped to 0 and 0.1 (paper)."""
LR_DECAY_AT = 0.95
"""Share of the epochs after which the learning rate drops 10x (paper: 95 % of the steps)."""
GRAYSCALE_DISTILL, GRAYSCALE_PENALTY = 0.1, 0.3
"""Random-grayscale probabilities of distillation and penalty images (reference code)."""
JITTER = 0.2
"""Brightness / contrast / saturation jitter strength of the autoencoder inputs (factor in [0.8, 1.2])."""
BACKBONE_SCALE = 2
"""The backbone sees the image upsampled 2x, so its stride 8 matches the PDN's stride 4 (paper: 512 vs 256)."""


@dataclass
class EfficientAdConfig(DetectorConfig, BackboneConfig, TrainingConfig):
    """EfficientAD settings (paper values unless noted; CPU-sized training budget).

    image_size: >= 64 (the PDN's 33x33 receptive field and the autoencoder's five 2x downsamplings;
        64 gives an 8x8 feature map).
    model_size: "small" (EfficientAD-S) or "medium" (EfficientAD-M).
    backbone, layers: teacher distillation target; tf_efficientnet_lite0 [2, 3] = strides 8 and 16 of the
        2x upsampled image (the paper's WideResNet-101 layers 2 and 3).
    distillation_images: folder of generic images (e.g. an ImageNet subset) for teacher distillation and the
        penalty; None = scikit-image's bundled photos (offline).
    pool_size: number of random crops drawn from the generic images.
    teacher_epochs, teacher_lr: teacher distillation passes over (training normals + pool) and Adam lr
        (paper: 60 000 steps of 16 ImageNet images at 1e-4).
    epochs, lr, weight_decay: student + autoencoder training (paper: 70 000 steps of batch 1, lr 1e-4,
        weight decay 1e-5); the lr is raised for short CPU training.
    train_batch_size: mini-batch of the student/autoencoder training (paper: 1).
    p_hard: hard-feature quantile of the student loss.
    blur_sigma: optional Gaussian blur of the final map (paper: none).
    """

    model_size: str = "small"
    layers: list[int] = field(default_factory=lambda: [2, 3])
    distillation_images: str | None = None
    pool_size: int = 128
    teacher_epochs: int = 10
    teacher_lr: float = 1e-3
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 1e-5
    train_batch_size: int = 4
    p_hard: float = 0.999
    blur_sigma: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_training_config(self)
        self.check(self.image_size >= 64, "image_size", ">= 64 for EfficientAD (33x33 PDN patches)")
        self.check(self.model_size in MODEL_SIZES, "model_size", f"one of {MODEL_SIZES}")
        self.check(self.distillation_images is None or (isinstance(self.distillation_images, str)
                                                        and bool(self.distillation_images)),
                   "distillation_images", "None or an image folder path")
        self.check(isinstance(self.pool_size, int) and self.pool_size >= 1, "pool_size", "an integer >= 1")
        self.check(isinstance(self.teacher_epochs, int) and self.teacher_epochs >= 0, "teacher_epochs",
                   "an integer >= 0")
        self.check(self.teacher_lr > 0, "teacher_lr", "> 0")
        self.check(isinstance(self.epochs, int), "epochs", "an integer >= 1")
        self.check(self.weight_decay >= 0, "weight_decay", ">= 0")
        self.check(isinstance(self.train_batch_size, int) and self.train_batch_size >= 1, "train_batch_size",
                   "an integer >= 1")
        self.check(0 < self.p_hard < 1, "p_hard", "in (0, 1)")
        self.check(0 <= self.blur_sigma <= 32, "blur_sigma", "in [0, 32]")


# ----- data helpers ---------------------------------------------------------------------------------------------
def _generic_sources(config: EfficientAdConfig, rng: np.random.Generator) -> list[np.ndarray]:
    if config.distillation_images is None:
        import skimage.data

        return [load_rgb(getattr(skimage.data, name)()) for name in GENERIC_PHOTOS]
    folder = Path(config.distillation_images)
    if not folder.is_dir():
        raise ConfigError(f"{type(config).__qualname__}: key 'distillation_images' must be an existing image "
                          f"folder (got {config.distillation_images!r})")
    paths = list_images(folder, recursive=True)
    if len(paths) > config.pool_size:  # one crop per image: load only the images that are used
        paths = [paths[i] for i in sorted(rng.choice(len(paths), config.pool_size, replace=False))]
    return [load_rgb(p) for p in paths]


def generic_pool(config: EfficientAdConfig, rng: np.random.Generator) -> torch.Tensor:
    """``pool_size`` random crops (side 1/4..1 of the shorter side, random flip) at ``image_size``, in [0, 1]."""
    sources = _generic_sources(config, rng)
    size = config.image_size
    crops = []
    for i in range(config.pool_size):
        image = sources[i % len(sources)] if len(sources) >= config.pool_size else sources[rng.integers(len(sources))]
        h, w = image.shape[:2]
        short = min(h, w)
        side = int(rng.integers(max(1, short // 4), short + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = image[top:top + side, left:left + side]
        crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if side > size else cv2.INTER_LINEAR)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crops.append(np.ascontiguousarray(crop))
    array = np.stack(crops).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _gray(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def random_grayscale(images: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Each image replaced by its 3-channel grayscale version with probability ``p``."""
    chosen = (torch.rand(images.shape[0], generator=generator) < p).view(-1, 1, 1, 1)
    return torch.where(chosen, _gray(images).expand_as(images), images)


def color_jitter(images: torch.Tensor, generator: torch.Generator, strength: float = JITTER) -> torch.Tensor:
    """Per image one of brightness, contrast or saturation jitter with a factor in [1 - s, 1 + s] (paper)."""
    n = images.shape[0]
    choice = torch.randint(0, 3, (n,), generator=generator).view(-1, 1, 1, 1)
    factor = (1 + strength * (2 * torch.rand(n, generator=generator) - 1)).view(-1, 1, 1, 1)
    gray = _gray(images)
    blend_to = torch.where(choice == 1, gray.mean(dim=(2, 3), keepdim=True), gray)
    blended = factor * images + (1 - factor) * blend_to  # contrast (to the mean gray) or saturation (to gray)
    out = torch.where(choice == 0, images * factor, blended)
    return out.clamp(0.0, 1.0)


def hard_loss(distance: torch.Tensor, p_hard: float) -> torch.Tensor:
    """Mean of each image's largest (1 - p_hard) share of squared differences (N, C, h, w), averaged over N.

    The paper takes the elements >= the p_hard quantile of one image (batch size 1); top-k is the same set
    (up to ties) without torch.quantile's input-size limit.
    """
    flat = distance.flatten(1)
    k = max(1, int(round((1.0 - p_hard) * flat.shape[1])))
    return flat.topk(k, dim=1, sorted=False).values.mean()


class DistillationTarget(torch.nn.Module):
    """Backbone features of the 2x upsampled image, aggregated as in the paper and mapped to 384 channels."""

    def __init__(self, extractor: FeatureExtractor, out_channels: int = TEACHER_CHANNELS):
        super().__init__()
        self.extractor = extractor
        self.in_channels = sum(extractor.channels)
        self.out_channels = out_channels
        self.register_buffer("weight", torch.eye(out_channels, self.in_channels))
        self.register_buffer("bias", torch.zeros(out_channels))

    @torch.no_grad()
    def features(self, images: torch.Tensor, size: int) -> torch.Tensor:
        """(N, 152, size, size) aggregated backbone features of [0, 1] images."""
        big = F.interpolate(images, scale_factor=BACKBONE_SCALE, mode="bilinear", align_corners=False)
        out = []
        for stage in self.extractor(big):
            stage = F.avg_pool2d(stage, kernel_size=3, stride=1, padding=1, count_include_pad=False)
            if stage.shape[-1] > size:
                stage = F.adaptive_avg_pool2d(stage, size)
            elif stage.shape[-1] < size:
                stage = F.interpolate(stage, size=(size, size), mode="bilinear", align_corners=False)
            out.append(stage)
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def fit(self, images: torch.Tensor, size: int, generator: torch.Generator, batch_size: int) -> None:
        """Per-channel standardisation, seeded orthonormal expansion to 384, per-channel standardisation."""
        c = self.in_channels
        total = torch.zeros(c, dtype=torch.float64)
        outer = torch.zeros(c, c, dtype=torch.float64)
        count = 0
        for i in range(0, images.shape[0], batch_size):
            feats = self.features(images[i:i + batch_size], size).double().permute(0, 2, 3, 1).reshape(-1, c)
            total += feats.sum(0)
            outer += feats.t() @ feats
            count += feats.shape[0]
        mean = total / count
        cov = outer / count - torch.outer(mean, mean)
        std = cov.diagonal().clamp_min(1e-12).sqrt()
        corr = cov / torch.outer(std, std)
        gaussian = torch.randn(self.out_channels, c, generator=generator, dtype=torch.float64)
        q, _ = torch.linalg.qr(gaussian)  # (384, 152) with orthonormal columns
        out_std = (q @ corr @ q.t()).diagonal().clamp_min(1e-12).sqrt()
        weight = q / out_std[:, None] / std[None, :]
        self.weight = weight.float()
        self.bias = (-(weight @ mean)).float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor, size: int) -> torch.Tensor:
        feats = self.features(images, size)
        return torch.einsum("oc,nchw->nohw", self.weight, feats) + self.bias.view(1, -1, 1, 1)


@register
class EfficientAd(Detector):
    """EfficientAD (Batzner et al., WACV 2024): PDN student-teacher + autoencoder, quantile-normalised maps."""

    name = "efficientad"
    paradigm = "distillation"
    Config = EfficientAdConfig
    config: EfficientAdConfig

    def build_model(self) -> EfficientAdModel:
        self.history: list[float] = []
        self.teacher_history: list[float] = []
        self.loss_terms: dict[str, list[float]] = {}
        return EfficientAdModel(self.config.model_size, self.config.image_size, blur_sigma=self.config.blur_sigma)

    def _fit(self, images: list[ImageInput], progress: bool) -> None:
        cfg = self.config
        model: EfficientAdModel = self.model
        generator = torch.Generator().manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        model.reset_parameters(generator)

        pixels = self.load_tensor(images)
        pool = generic_pool(cfg, rng)

        self._distill_teacher(pixels, pool, generator, progress)
        model.teacher.requires_grad_(False)
        self._teacher_statistics(pixels)
        self._train_student(pixels, pool, generator, progress)
        self._map_quantiles(pixels)  # replaced by the validation normals' quantiles in _calibrate
        model.eval()

    # ----- stage 1: teacher -------------------------------------------------------------------------------------
    def _distill_teacher(self, pixels: torch.Tensor, pool: torch.Tensor, generator: torch.Generator,
                         progress: bool) -> None:
        cfg = self.config
        model: EfficientAdModel = self.model
        self.teacher_history = []
        if cfg.teacher_epochs == 0:  # a random teacher (ablation)
            return
        target = DistillationTarget(build_feature_extractor(cfg)).eval()
        data = torch.cat([pixels, pool])
        size = model.teacher.output_size(cfg.image_size, padded=True)
        target.fit(data, size, generator, cfg.batch_size)
        model.teacher.train()
        teacher_params = list(model.teacher.parameters())
        for p in teacher_params:
            p.requires_grad_(True)

        def step(batch: torch.Tensor) -> torch.Tensor:
            batch = random_grayscale(batch, GRAYSCALE_DISTILL, generator)
            wanted = target(batch, size)
            prediction = model.teacher(model.normalize(batch), padded=True)
            return F.mse_loss(prediction, wanted)

        optimizer = torch.optim.Adam(teacher_params, lr=cfg.teacher_lr, weight_decay=cfg.weight_decay)
        self.teacher_history = train_loop(step, data, optimizer, epochs=cfg.teacher_epochs,
                                          batch_size=cfg.batch_size, seed=cfg.seed, progress=progress,
                                          desc=f"{self.name} teacher")

    @torch.no_grad()
    def _teacher_statistics(self, pixels: torch.Tensor) -> None:
        model: EfficientAdModel = self.model
        model.teacher.eval()
        outputs = [model.teacher(model.normalize(pixels[i:i + self.config.batch_size]))
                   for i in range(0, len(pixels), self.config.batch_size)]
        out = torch.cat(outputs).double()
        mean = out.mean(dim=(0, 2, 3), keepdim=True)
        std = (out - mean).pow(2).mean(dim=(0, 2, 3), keepdim=True).sqrt().clamp_min(1e-6)
        model.teacher_mean = mean.float()
        model.teacher_std = std.float()

    # ----- stage 2: student + autoencoder ---------------------------------------------------------------------
    def _train_student(self, pixels: torch.Tensor, pool: torch.Tensor, generator: torch.Generator,
                       progress: bool) -> None:
        cfg = self.config
        model: EfficientAdModel = self.model
        model.student.train()
        model.autoencoder.train()
        model.autoencoder.set_generator(generator)
        params = list(model.student.parameters()) + list(model.autoencoder.parameters())
        optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        names = ("hard", "penalty", "ae", "stae")
        sums = dict.fromkeys(names, 0.0)
        self.loss_terms = {k: [] for k in names}
        batches = [0]

        def step(batch: torch.Tensor) -> torch.Tensor:
            n = batch.shape[0]
            penalty_images = random_grayscale(pool[torch.randint(len(pool), (n,), generator=generator)],
                                              GRAYSCALE_PENALTY, generator)
            augmented = model.normalize(color_jitter(batch, generator))
            x = model.normalize(batch)
            with torch.no_grad():
                teacher = model.teacher_features(torch.cat([x, augmented]))
            student = model.student(torch.cat([x, model.normalize(penalty_images), augmented]))
            c = TEACHER_CHANNELS
            loss_hard = hard_loss((teacher[:n] - student[:n, :c]).pow(2), cfg.p_hard)
            loss_penalty = student[n:2 * n, :c].pow(2).mean()
            autoencoder = model.autoencoder(augmented)
            loss_ae = (teacher[n:] - autoencoder).pow(2).mean()
            loss_stae = (autoencoder - student[2 * n:, c:]).pow(2).mean()
            for key, value in zip(names, (loss_hard, loss_penalty, loss_ae, loss_stae), strict=True):
                sums[key] += float(value.detach())
            batches[0] += 1
            return loss_hard + loss_penalty + loss_ae + loss_stae

        decay_epoch = math.ceil(LR_DECAY_AT * cfg.epochs)  # epochs < 20: no decay

        def on_epoch_end(epoch: int, _: float) -> None:
            for key in names:
                self.loss_terms[key].append(sums[key] / max(batches[0], 1))
                sums[key] = 0.0
            batches[0] = 0
            if epoch + 1 == decay_epoch:
                for group in optimizer.param_groups:
                    group["lr"] *= 0.1

        self.history = train_loop(step, pixels, optimizer, epochs=cfg.epochs, batch_size=cfg.train_batch_size,
                                  seed=cfg.seed, progress=progress, desc=f"{self.name} fit", patience=cfg.patience,
                                  min_delta=cfg.min_delta, on_epoch_end=on_epoch_end)
        model.autoencoder.set_generator(None)

    # ----- stage 3: map normalisation -------------------------------------------------------------------------
    def _calibrate(self, data: ValidationData) -> Calibration:
        normals = [image for image, anomalous in zip(data.images, data.labels, strict=True) if not anomalous]
        if normals:
            self._map_quantiles(normals)
        return super()._calibrate(data)

    @torch.no_grad()
    def _map_quantiles(self, images: torch.Tensor | list[ImageInput]) -> None:
        """Quantiles q_a (0.9) and q_b (0.995) of the local and global maps over all pixels of ``images``."""
        model: EfficientAdModel = self.model
        model.eval()
        if len(images) == 0:
            raise InputError(f"{self.name}: no images for the map normalisation quantiles.")
        bs = self.config.batch_size
        if isinstance(images, torch.Tensor):
            maps = [model.raw_maps(images[i:i + bs]) for i in range(0, len(images), bs)]
        else:
            maps = [model.raw_maps(batch) for batch, _ in iter_batches(images, self.config.image_size, bs)]
        levels = torch.tensor([Q_START, Q_END], dtype=torch.float64)
        for index, name in enumerate(("quantiles_st", "quantiles_ae")):
            values = torch.cat([m[index] for m in maps]).flatten().double()
            q = torch.quantile(values, levels)
            if q[1] - q[0] < 1e-12:  # constant maps: keep the scale finite
                q[1] = q[0] + 1e-12
            setattr(model, name, q.float())
