"""DRAEM detector: trains both sub-networks of :class:`DraemModel` on normal images with simulated anomalies.

Training as the paper and its reference code (github.com/VitjanZ/DRAEM):

- Simulated anomalies come from ``synth.augment.DraemAugmenter`` (Perlin-noise mask x anomaly texture with 3
  of 10 photometric ops, blended with beta ~ U(``beta_range``)), applied with probability ``p_anomaly``
  (0.5, the paper) to each training image, freshly drawn every epoch: sample ``i`` of epoch ``e`` uses
  ``np.random.default_rng([seed, e, i])``, so the same seed gives the same samples, whatever the batch order.
  ``anomaly_source`` is the texture folder (the paper uses DTD's ``images/``); the default None re-augments
  the image itself, since DTD cannot be downloaded here.
- One forward pass per batch: the reconstructive net restores the augmented images, the discriminative net
  segments the concatenation (reconstruction, augmented image). Loss = L2 + (1 - SSIM) between the
  reconstruction and the anomaly-free original, + focal loss between the predicted and the simulated mask;
  the focal loss also trains the reconstructive net (no detach), as in the reference.
- Adam on both networks (one learning rate), learning rate multiplied by 0.2 after 80 % and 90 % of the
  epochs (the reference's MultiStepLR); weights initialised as the reference (N(0, 0.02) convolutions) from
  ``seed``.

Real (or ``synth generate``) anomalies (``fit(..., anomalies=...)``, ``supports_anomalies``): each slot of a
training batch is, with probability ``real_anomaly_ratio``, replaced by a randomly drawn labeled anomaly and
its mask (resized to ``image_size``). Those samples train the discriminative net (focal loss, through the
reconstruction of the anomalous image) but not the reconstruction loss: there is no anomaly-free original
to restore. Anomalies given without a mask are skipped (DRAEM needs pixel targets; an InputError when none
has one).

Deviations from the paper, for CPU-sized training (all configurable):

- Widths: the reconstructive net's base width is 32 (paper 128) and the discriminative net's 16 (paper 64),
  about 16x fewer operations; the architecture is otherwise the paper's.
- Schedule: 100 epochs at learning rate 1e-3 by default (paper: 700 epochs at 1e-4, batch 8, at 256 px on
  MVTec's 60-400 images per class); few images and few epochs need the larger step. On 13 brick crops at
  64 px, widths 8 / 16, batch 4, lr 2e-3 and 20 epochs reach image AUROC 0.93-1.0 (tests/test_model_draem.py);
  a run of a few epochs still gives near-uniform maps (about 0.5 everywhere).
- Image score window: the paper's 21 px at 256 px, scaled to ``image_size`` (5 px at 64) unless
  ``score_window`` is set.
- The reference also rotates 30 % of the normal training images by U(-90, 90) degrees before augmenting;
  that is left out (black corners on textures would be learnt as normal).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from detect.base import Detector, DetectorConfig
from detect.data import ImageInput, iter_batches, resize_mask, to_tensor
from detect.models.components.init import dcgan_init
from detect.models.components.training import TrainingConfig, check_training_config, train_loop
from detect.models.reconstruction.draem.torch_model import (
    DraemModel,
    auto_score_window,
    focal_loss,
    ssim,
)
from detect.registry import register
from synth.augment import DraemAugmenter
from synth.core.errors import InputError

logger = logging.getLogger(__name__)

# The reference's MultiStepLR: learning rate x LR_GAMMA after these fractions of the epochs.
LR_MILESTONES = (0.8, 0.9)
LR_GAMMA = 0.2


@dataclass
class DraemConfig(DetectorConfig, TrainingConfig):
    """DRAEM settings (paper values in brackets).

    batch_size: images per training step [8].
    epochs: passes over the training images, each with fresh simulated anomalies [700]; default 100.
    lr: Adam learning rate of both sub-networks [1e-4]; default 1e-3 (short CPU schedules).
    reconstructive_width: base width w of the reconstructive encoder-decoder (widths w..8w) [128]; default 32.
    discriminative_width: base width v of the discriminative U-Net (widths v..8v) [64]; default 16.
    anomaly_source: folder of anomaly texture images, e.g. DTD's ``images/`` [DTD]; None (default) uses the
        training image itself as the texture. Read at fit time only.
    p_anomaly: probability that a training image gets a simulated anomaly [0.5].
    beta_range: range of beta, the original image's weight inside the anomaly mask [0, 0.8].
    real_anomaly_ratio: when ``fit`` gets ``anomalies=``, the probability that a training-batch slot holds a
        real labeled anomaly instead of a (possibly augmented) normal image; default 0.25.
    score_window: side of the mean filter before the image-score maximum (odd); None (default): the paper's
        21 px at 256 px scaled to ``image_size``; 1 disables the filter (plain maximum, as Anomalib).
    """

    batch_size: int = 8
    epochs: int = 100
    lr: float = 1e-3
    reconstructive_width: int = 32
    discriminative_width: int = 16
    anomaly_source: str | None = None
    p_anomaly: float = 0.5
    beta_range: list[float] = field(default_factory=lambda: [0.0, 0.8])
    real_anomaly_ratio: float = 0.25
    score_window: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_training_config(self)
        for key in ("reconstructive_width", "discriminative_width"):
            value = getattr(self, key)
            self.check(isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 512, key,
                       "an integer in [1, 512]")
        if isinstance(self.anomaly_source, os.PathLike):
            self.anomaly_source = os.fspath(self.anomaly_source)  # JSON-serialisable in config.json
        self.check(self.anomaly_source is None or (isinstance(self.anomaly_source, str) and bool(self.anomaly_source)),
                   "anomaly_source", "None or a folder of texture images (e.g. DTD's images/)")
        self.check(isinstance(self.p_anomaly, (int, float)) and 0 <= self.p_anomaly <= 1, "p_anomaly", "in [0, 1]")
        beta = self.beta_range
        self.check(isinstance(beta, (list, tuple)) and len(beta) == 2
                   and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in beta)
                   and 0 <= beta[0] <= beta[1] <= 1, "beta_range", "a [low, high] pair with 0 <= low <= high <= 1")
        self.beta_range = [float(b) for b in beta]
        self.check(isinstance(self.real_anomaly_ratio, (int, float)) and 0 <= self.real_anomaly_ratio <= 1,
                   "real_anomaly_ratio", "in [0, 1]")
        window = self.score_window
        self.check(window is None or (isinstance(window, int) and not isinstance(window, bool) and window >= 1
                                      and window % 2 == 1 and window <= self.image_size),
                   "score_window", "None (auto) or an odd integer in [1, image_size]")


@register
class Draem(Detector):
    """DRAEM (Zavrtanik et al., ICCV 2021): reconstruction + discriminative segmentation of simulated anomalies."""

    name = "draem"
    paradigm = "reconstruction"
    Config = DraemConfig
    config: DraemConfig
    supports_anomalies = True

    def build_model(self) -> DraemModel:
        cfg = self.config
        self.history: list[float] = []
        # Per epoch: mean of each loss term (l2, ssim, focal), for inspection.
        self.loss_terms: list[dict[str, float]] = []
        window = cfg.score_window if cfg.score_window is not None else auto_score_window(cfg.image_size)
        return DraemModel(reconstructive_width=cfg.reconstructive_width,
                          discriminative_width=cfg.discriminative_width, score_window=window)

    def augmenter(self) -> DraemAugmenter:
        """The synth DRAEM augmenter of this config (raises InputError for a bad ``anomaly_source``)."""
        cfg = self.config
        return DraemAugmenter(anomaly_source=cfg.anomaly_source, p_anomaly=cfg.p_anomaly,
                              beta_range=(cfg.beta_range[0], cfg.beta_range[1]))

    def _real_anomalies(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The fit's labeled anomalies with masks as (images (M, 3, S, S) in [0, 1], masks (M, S, S) bool)."""
        samples = self.train_anomalies
        if samples is None:
            return None
        if self.config.real_anomaly_ratio == 0:
            logger.warning("%s: real_anomaly_ratio is 0, the %d given anomalies are not used.", self.name, len(samples))
            return None
        size = self.config.image_size
        images, masks = [], []
        for index in range(len(samples)):
            image, mask = samples.load(index)
            if mask is None:
                continue
            images.append(image)
            masks.append(torch.from_numpy(resize_mask(mask, size)))
        skipped = len(samples) - len(images)
        if not images:
            raise InputError(f"{self.name}: none of the {len(samples)} anomalies has a mask; DRAEM trains its "
                             f"segmentation net on pixel masks (give ground_truth masks, or drop anomalies=).")
        if skipped:
            logger.warning("%s: %d of %d anomalies have no mask and are not used.", self.name, skipped, len(samples))
        return to_tensor(images, size), torch.stack(masks)

    def _fit(self, images: list[ImageInput], progress: bool) -> None:
        cfg = self.config
        model: DraemModel = self.model
        # DRAEM's reference initialisation is the DCGAN one (it has no transposed convolutions).
        dcgan_init(model, torch.Generator().manual_seed(cfg.seed))
        augmenter = self.augmenter()
        real = self._real_anomalies()

        pixels = self.load_tensor(images)
        # uint8 HxWx3 copies for synth (exact: load_tensor divided uint8 values by 255).
        originals = (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        epoch = 0
        sums = {"l2": 0.0, "ssim": 0.0, "focal": 0.0}

        def sample(index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
            """(input, reconstruction target, mask, is synthetic) for training image ``index`` this epoch."""
            if real is not None:
                # Own stream: the synthetic draws below are the same with or without real anomalies.
                mix = np.random.default_rng([cfg.seed, epoch, index, 1])
                if mix.random() < cfg.real_anomaly_ratio:
                    j = int(mix.integers(len(real[0])))
                    return real[0][j], real[0][j], real[1][j], False
            result = augmenter(originals[index], np.random.default_rng([cfg.seed, epoch, index]))
            augmented = torch.from_numpy(result.image).permute(2, 0, 1).float() / 255.0
            return augmented, pixels[index], torch.from_numpy(result.mask), True

        def step(indices: torch.Tensor) -> torch.Tensor:
            inputs, targets, masks, synthetic = zip(*(sample(int(i)) for i in indices), strict=True)
            x = torch.stack(inputs)
            reconstruction, logits = model.segment(x)
            keep = torch.tensor(synthetic)
            if keep.any():
                target = torch.stack(targets)[keep]
                l2 = F.mse_loss(reconstruction[keep], target)
                ssim_loss = 1 - ssim(reconstruction[keep], target)
            else:  # a batch of real anomalies only: no anomaly-free original to reconstruct
                l2 = ssim_loss = reconstruction.sum() * 0
            focal = focal_loss(logits, torch.stack(masks))
            for key, value in (("l2", l2), ("ssim", ssim_loss), ("focal", focal)):
                sums[key] += float(value.detach()) * len(indices)
            return l2 + ssim_loss + focal

        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        milestones = sorted({max(1, int(f * cfg.epochs)) for f in LR_MILESTONES})
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=LR_GAMMA)
        count = len(pixels)

        def on_epoch_end(index: int, loss: float) -> None:
            nonlocal epoch
            self.loss_terms.append({key: value / count for key, value in sums.items()})
            for key in sums:
                sums[key] = 0.0
            scheduler.step()
            epoch = index + 1

        self.loss_terms = []
        model.train()
        self.history = train_loop(step, torch.arange(count), optimizer, epochs=cfg.epochs,
                                  batch_size=cfg.batch_size, seed=cfg.seed, progress=progress,
                                  desc=f"{self.name} fit", patience=cfg.patience, min_delta=cfg.min_delta,
                                  on_epoch_end=on_epoch_end)
        model.eval()

    def reconstruct(self, images: Any) -> np.ndarray:
        """Reconstructions of ``images`` (paths/arrays) as float (N, S, S, 3) in about [0, 1], for inspection."""
        model: DraemModel = self.model
        model.eval()
        out = []
        with torch.no_grad():
            for batch, _ in iter_batches(images, self.config.image_size, self.config.batch_size):
                out.append(model.reconstructive(batch).permute(0, 2, 3, 1).numpy())
        return np.concatenate(out)
