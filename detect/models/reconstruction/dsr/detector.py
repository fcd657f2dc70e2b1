"""DSR detector: three training stages of :class:`DsrModel` on normal images only.

Stage 0 (``vq_epochs``, ``vq_lr``), the discrete latent model. The paper pre-trains the VQ-VAE (encoders,
codebooks ``K_lo``/``K_hi``, general decoder ``D_gen``) on ImageNet; those weights are not available offline,
so here it is trained on the training normals: MSE image reconstruction + ``commitment_cost`` x the commitment
loss of both levels, straight-through gradients, EMA codebook updates (decay ``ema_decay``), as the authors'
VQ-VAE. Three additions for small training sets (not in the paper): a share ``vq_augment`` of the images
carries synth's DRAEM image-space anomalies (``DraemAugmenter``), so that - like the ImageNet-trained original -
the codebooks and the general decoder also represent appearances absent from the normals (otherwise distant
codebook entries decode to near-normal patches and the general decoder erases real defects); the codebooks are
initialised from encoder outputs; and entries no feature was assigned to during an epoch are re-seeded from
encoder outputs (dead-code restart), so every entry is an appearance seen in training.

Stage 1 (``epochs``, ``lr``), with the VQ-VAE frozen: per image, with probability ``p_anomaly``, a Perlin mask
(``synth.masks.perlin_mask``, DRAEM's settings) is drawn; inside it, quantized vectors are replaced by codebook
entries far from the original (``replace_with_distant_codes``: uniform among distance ranks 5 %..``s`` x K,
``s ~ U(anomaly_strength, 1)`` per image and level); as the authors' code, half of the images get anomalies
at both levels (the ``F_hi`` anomalies drawn on features re-computed from the altered ``Q_lo``), the others
at ``Q_lo`` or ``Q_hi`` only. The subspace restriction modules + object-specific decoder learn to undo them
(L2 of the restricted features to the clean quantized features of both levels + 10 x L2 of the
object-specific image to the input), the anomaly detection module learns the mask (focal loss; target = the
Perlin mask max-pooled to the altered level's feature cells) from the object-specific and the general
reconstruction of the altered features. Adam, learning rate x 0.1 after 80 % of the epochs (paper).

Stage 2 (``upsampling_epochs``, ``upsampling_lr``): only the upsampling module trains, on image-space
Perlin anomalies from ``synth.augment.DraemAugmenter`` (``p_anomaly``, textures from ``anomaly_source`` or,
by default, the augmented image itself), with the focal loss against the exact pixel mask (paper; the
authors' code fills the masks with a random solid colour instead). Learning rate x 0.2 at 80 % and 90 %.

CPU-size defaults (paper in brackets): embedding_dim 64 (128), num_embeddings 512 (4096), num_hiddens 64
(128), num_residual_hiddens 32 (64), segmentation_width 32 (64); the paper's image size is 256 and the
layers need ``image_size`` a multiple of 32 (>= 64). Epoch counts are far below the paper's (which trains
stage 1 for 100 epochs of 8000 samples). Randomness: weights, masks, code sampling and augmentation all come
from generators seeded with ``seed``.

Behaviour at CPU scale (measured on 64 px brick crops, 13 training images): every stage's loss drops within a
few epochs, but the anomaly detection module needs on the order of a thousand optimiser steps before it
separates the two reconstructions (image AUROC about 0.9 after 150 + 150 + 20 epochs at batch size 4, with
a clear dependence on the seed); the object-specific reconstruction stays blurrier than the general one, and
``Q_lo``-only feature anomalies barely change the general reconstruction of a VQ-VAE trained on so few
images (its decoder relies on ``Q_hi``), so those samples act as label noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from detect.base import Detector, DetectorConfig
from detect.data import ImageInput
from detect.models.components.training import TrainingConfig, check_training_config, train_loop
from detect.models.reconstruction.dsr.torch_model import (
    NEAREST_EXCLUDED,
    DsrModel,
    focal_loss,
    replace_with_distant_codes,
)
from detect.registry import register
from synth.augment import DraemAugmenter
from synth.masks import perlin_mask

# The paper's mean filter for the image score: 21 px at 256 px input.
PAPER_SCORE_KERNEL, PAPER_IMAGE_SIZE = 21, 256


@dataclass
class DsrConfig(DetectorConfig, TrainingConfig):
    """DSR settings (paper values in the module docstring).

    embedding_dim, num_embeddings: codebook vector size and entries per codebook (two codebooks, K_lo, K_hi).
    num_hiddens, num_residual_layers, num_residual_hiddens: VQ-VAE / object-specific decoder widths.
    segmentation_width: base width of the anomaly detection and upsampling U-Nets.
    vq_epochs, vq_lr: stage 0, VQ-VAE training on the normals (Adam).
    vq_augment: share of stage-0 images given a synth DRAEM anomaly (stand-in for the paper's ImageNet
        pre-training, so the general decoder also reconstructs unseen appearances; 0: normals only).
    commitment_cost, ema_decay: VQ commitment loss weight (0.25) and codebook EMA decay (0.99).
    epochs, lr: stage 1, object-specific branch + anomaly detection module (Adam; paper lr 2e-4).
    upsampling_epochs, upsampling_lr: stage 2, upsampling module (Adam).
    patience, min_delta: early stopping, applied to each stage (see ``TrainingConfig``).
    p_anomaly: share of training images that get a simulated anomaly (paper 0.5), stages 1 and 2.
    anomaly_strength: lower bound of the per-image strength ``U(anomaly_strength, 1)`` of feature-space
        anomalies (paper 0.2): the largest codebook distance rank drawn, as a fraction of the codebook.
    anomaly_source: texture folder for stage 2's DRAEM anomalies (e.g. DTD images); None: the image itself.
    score_kernel: mean filter size for the image score (odd); 0: the paper's 21 px scaled to image_size.
    """

    embedding_dim: int = 64
    num_embeddings: int = 512
    num_hiddens: int = 64
    num_residual_layers: int = 2
    num_residual_hiddens: int = 32
    segmentation_width: int = 32
    vq_epochs: int = 60
    vq_lr: float = 1e-3
    vq_augment: float = 0.5
    commitment_cost: float = 0.25
    ema_decay: float = 0.99
    epochs: int = 40
    lr: float = 2e-4
    upsampling_epochs: int = 20
    upsampling_lr: float = 2e-4
    p_anomaly: float = 0.5
    anomaly_strength: float = 0.2
    anomaly_source: str | None = None
    score_kernel: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_training_config(self)
        self.check(self.image_size % 32 == 0 and self.image_size >= 64, "image_size",
                   "a multiple of 32, >= 64 (DSR's coarse features are pooled twice more)")
        for key in ("embedding_dim", "num_hiddens", "num_residual_hiddens", "segmentation_width"):
            value = getattr(self, key)
            self.check(isinstance(value, int) and not isinstance(value, bool) and value >= 4, key, "an integer >= 4")
        self.check(isinstance(self.num_embeddings, int) and self.num_embeddings >= 16, "num_embeddings",
                   "an integer >= 16")
        self.check(isinstance(self.num_residual_layers, int) and self.num_residual_layers >= 0,
                   "num_residual_layers", "an integer >= 0")
        for key in ("vq_epochs", "upsampling_epochs"):
            self.check(isinstance(getattr(self, key), int) and getattr(self, key) >= 1, key, "an integer >= 1")
        for key in ("vq_lr", "upsampling_lr"):
            self.check(getattr(self, key) > 0, key, "> 0")
        self.check(self.commitment_cost >= 0, "commitment_cost", ">= 0")
        self.check(0 < self.ema_decay < 1, "ema_decay", "in (0, 1)")
        self.check(0 <= self.vq_augment <= 1, "vq_augment", "in [0, 1]")
        self.check(0 < self.p_anomaly <= 1, "p_anomaly", "in (0, 1]")
        # The strength must exceed the nearest 5 % of entries the sampler skips.
        self.check(NEAREST_EXCLUDED < self.anomaly_strength <= 1, "anomaly_strength", f"in ({NEAREST_EXCLUDED}, 1]")
        self.check(self.anomaly_source is None or (isinstance(self.anomaly_source, str) and bool(self.anomaly_source)),
                   "anomaly_source", "None or a folder of texture images")
        self.check(isinstance(self.score_kernel, int) and self.score_kernel >= 0
                   and (self.score_kernel == 0 or self.score_kernel % 2 == 1), "score_kernel",
                   "0 (auto) or an odd integer >= 1")

    @property
    def effective_score_kernel(self) -> int:
        """``score_kernel``, or the paper's 21 px at 256 px scaled to ``image_size`` (odd, >= 1)."""
        if self.score_kernel:
            return self.score_kernel
        return max(1, int(round(PAPER_SCORE_KERNEL * self.image_size / PAPER_IMAGE_SIZE))) | 1


def reset_parameters(module: nn.Module, generator: torch.Generator, std: float | None = None) -> None:
    """Reproducible re-initialisation of every (transposed) convolution in ``module``.

    ``std`` None: PyTorch's default (Kaiming uniform, a = sqrt(5); bias U(+-1/sqrt(fan_in))); otherwise the
    weights are drawn from N(0, std) (the authors' ``weights_init`` for the object-specific decoder and the
    anomaly detection module) and the biases as by default.
    """
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            if std is None:
                nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            else:
                nn.init.normal_(layer.weight, 0.0, std, generator=generator)
            if layer.bias is not None:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(layer.weight)
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def block_mask(mask: torch.Tensor, cells: int) -> torch.Tensor:
    """Pixel mask (N, 1, S, S) -> feature-cell mask (N, 1, S/c, S/c): a cell is anomalous if any pixel is."""
    return F.max_pool2d(mask, mask.shape[-1] // cells)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(N, 3, S, S) in [0, 1] -> uint8 (N, S, S, 3), exact for images loaded from uint8 (synth's input type)."""
    return (pixels * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@register
class Dsr(Detector):
    """DSR (Zavrtanik et al., ECCV 2022): dual subspace re-projection with feature-space anomalies."""

    name = "dsr"
    paradigm = "reconstruction"
    Config = DsrConfig
    config: DsrConfig

    def build_model(self) -> DsrModel:
        cfg = self.config
        self.vq_history: list[float] = []
        self.history: list[float] = []
        self.upsampling_history: list[float] = []
        return DsrModel(embedding_dim=cfg.embedding_dim, num_embeddings=cfg.num_embeddings,
                        num_hiddens=cfg.num_hiddens, num_residual_layers=cfg.num_residual_layers,
                        num_residual_hiddens=cfg.num_residual_hiddens, segmentation_width=cfg.segmentation_width,
                        score_kernel=cfg.effective_score_kernel)

    # ----- training -------------------------------------------------------------------------------------------
    def _fit(self, images: list[ImageInput], progress: bool) -> None:
        cfg = self.config
        model: DsrModel = self.model
        generator = torch.Generator().manual_seed(cfg.seed)
        reset_parameters(model, generator)
        reset_parameters(model.object_decoder, generator, std=0.02)
        reset_parameters(model.detection, generator, std=0.02)
        pixels = self.load_tensor(images)
        self._train_vq(pixels, progress)
        self._train_object_branch(pixels, progress)
        self._train_upsampling(pixels, progress)
        model.eval()

    def _loop(self, step: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor,
              optimizer: torch.optim.Optimizer, epochs: int, seed: int, stage: str, progress: bool,
              on_epoch_end: Callable[[int, float], None] | None = None) -> list[float]:
        """One stage through the shared ``train_loop`` (own seed, epochs and tqdm label per stage)."""
        cfg = self.config
        return train_loop(step, data, optimizer, epochs=epochs, batch_size=cfg.batch_size, seed=seed,
                          progress=progress, desc=f"{self.name} {stage}", patience=cfg.patience,
                          min_delta=cfg.min_delta, on_epoch_end=on_epoch_end)

    def _train_vq(self, pixels: torch.Tensor, progress: bool) -> None:
        """Stage 0: VQ-VAE on the normals (reconstruction + commitment loss, EMA codebooks)."""
        cfg = self.config
        vq = self.model.vq
        generator = torch.Generator().manual_seed(cfg.seed + 10)
        for quantizer in (vq.quantizer_lo, vq.quantizer_hi):
            quantizer.decay = cfg.ema_decay
        vq.requires_grad_(True)
        vq.train()

        @torch.no_grad()
        def encoder_outputs() -> tuple[torch.Tensor, torch.Tensor]:
            outs = [vq.encode(pixels[i:i + cfg.batch_size]) for i in range(0, len(pixels), cfg.batch_size)]
            return torch.cat([o["z_lo"] for o in outs]), torch.cat([o["z_hi"] for o in outs])

        # Codebooks start at encoder outputs (lo first: F_hi depends on the quantized F_lo).
        all_entries = torch.arange(cfg.num_embeddings)
        vq.quantizer_lo.reseed(all_entries, encoder_outputs()[0], generator)
        vq.quantizer_hi.reseed(all_entries, encoder_outputs()[1], generator)
        usage = {"lo": torch.zeros(cfg.num_embeddings), "hi": torch.zeros(cfg.num_embeddings)}
        # Stand-in for the paper's ImageNet pre-training: a share of the normals carries synth's DRAEM anomalies,
        # so the codebooks and the general decoder also learn appearances that are not in the normals.
        augmenter = DraemAugmenter(anomaly_source=cfg.anomaly_source, p_anomaly=cfg.vq_augment) \
            if cfg.vq_augment > 0 else None
        rng = np.random.default_rng([cfg.seed, 0])
        originals = to_uint8(pixels)

        def step(index: torch.Tensor) -> torch.Tensor:
            batch = self._augment(originals, index, augmenter, rng)[0] if augmenter is not None else pixels[index]
            out = vq.encode(batch)
            recon = vq.decode(out["q_lo"], out["q_hi"])
            commitment = F.mse_loss(out["z_lo"], out["q_lo"].detach()) + F.mse_loss(out["z_hi"], out["q_hi"].detach())
            vq.quantizer_lo.ema_update(out["z_lo"], out["idx_lo"])
            vq.quantizer_hi.ema_update(out["z_hi"], out["idx_hi"])
            usage["lo"] += torch.bincount(out["idx_lo"].flatten(), minlength=cfg.num_embeddings)
            usage["hi"] += torch.bincount(out["idx_hi"].flatten(), minlength=cfg.num_embeddings)
            return F.mse_loss(recon, batch) + cfg.commitment_cost * commitment

        def restart_dead_codes(epoch: int, _loss: float) -> None:
            if epoch < cfg.vq_epochs - 1:  # the last epoch's codebook is kept as trained
                z_lo, z_hi = encoder_outputs()
                vq.quantizer_lo.reseed(usage["lo"] == 0, z_lo, generator)
                vq.quantizer_hi.reseed(usage["hi"] == 0, z_hi, generator)
            for counts in usage.values():
                counts.zero_()

        params = [p for p in vq.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=cfg.vq_lr)
        self.vq_history = self._loop(step, torch.arange(len(pixels)), optimizer, cfg.vq_epochs, cfg.seed, "vq-vae",
                                     progress, restart_dead_codes)
        vq.requires_grad_(False)
        vq.eval()

    @staticmethod
    def _augment(originals: np.ndarray, index: torch.Tensor, augmenter: DraemAugmenter, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """synth DRAEM anomalies on the images ``index``: (images (n, 3, S, S) in [0, 1], masks (n, 1, S, S))."""
        results = [augmenter(originals[int(i)], rng) for i in index]
        images = torch.from_numpy(np.stack([r.image for r in results])).permute(0, 3, 1, 2).float() / 255.0
        return images, torch.from_numpy(np.stack([r.mask for r in results])).unsqueeze(1).float()

    def _perlin_masks(self, count: int, rng: np.random.Generator) -> torch.Tensor:
        """(count, 1, S, S) float masks: a synth Perlin mask with probability ``p_anomaly``, else empty."""
        size = self.config.image_size
        masks = np.zeros((count, 1, size, size), np.float32)
        for i in range(count):
            if rng.random() < self.config.p_anomaly:
                masks[i, 0] = perlin_mask((size, size), rng)
        return torch.from_numpy(masks)

    @torch.no_grad()
    def simulate_feature_anomalies(self, batch: torch.Tensor, mask: torch.Tensor, generator: torch.Generator
                                   ) -> dict[str, torch.Tensor]:
        """Stage 1's feature-space anomalies inside the pixel ``mask`` (N, 1, S, S) of the images ``batch``.

        At lo, hi or both levels (authors' scheme), distant codebook entries replace the quantized vectors
        (``replace_with_distant_codes``, strength ``U(anomaly_strength, 1)`` per image and level). Returns the clean
        quantized features ``q_lo``/``q_hi``, the altered ones ``lo_in``/``hi_in``, the ``target`` mask (the
        altered level's feature cells, at image resolution) and the ``general`` reconstruction of the altered
        features.
        """
        vq = self.model.vq
        low = self.config.anomaly_strength
        n = batch.shape[0]
        out = vq.encode(batch)
        q_lo, q_hi = out["q_lo"], out["q_hi"]
        m_lo, m_hi = block_mask(mask, q_lo.shape[-1]), block_mask(mask, q_hi.shape[-1])
        s_lo = low + (1.0 - low) * torch.rand(n, generator=generator)
        s_hi = low + (1.0 - low) * torch.rand(n, generator=generator)
        lo_bad = replace_with_distant_codes(out["z_lo"], q_lo, vq.quantizer_lo.codebook, m_lo, s_lo, generator)
        z_hi_bad, q_hi_bad, _ = vq.hi_from_lo(out["enc_hi"], lo_bad)
        hi_both = replace_with_distant_codes(z_hi_bad, q_hi_bad, vq.quantizer_hi.codebook, m_hi, s_hi, generator)
        hi_only = replace_with_distant_codes(out["z_hi"], q_hi, vq.quantizer_hi.codebook, m_hi, s_hi, generator)
        both = torch.rand(n, generator=generator) < 0.5
        lo_level = torch.rand(n, generator=generator) < 0.5  # when not both: lo only, else hi only
        use_lo = (both | lo_level).view(n, 1, 1, 1)
        hi_in = torch.where(both.view(n, 1, 1, 1), hi_both, torch.where(use_lo, q_hi, hi_only))
        lo_in = torch.where(use_lo, lo_bad, q_lo)
        size = batch.shape[-1]
        target = torch.where(use_lo, F.interpolate(m_lo, size=size), F.interpolate(m_hi, size=size))
        return {"q_lo": q_lo, "q_hi": q_hi, "lo_in": lo_in, "hi_in": hi_in, "target": target,
                "general": vq.decode(lo_in, hi_in)}

    def _train_object_branch(self, pixels: torch.Tensor, progress: bool) -> None:
        """Stage 1: subspace restriction + object-specific decoder + anomaly detection module."""
        cfg = self.config
        model: DsrModel = self.model
        rng = np.random.default_rng([cfg.seed, 1])
        generator = torch.Generator().manual_seed(cfg.seed + 1)

        def step(batch: torch.Tensor) -> torch.Tensor:
            sim = self.simulate_feature_anomalies(batch, self._perlin_masks(batch.shape[0], rng), generator)
            f_lo, f_hi, specific = model.object_specific(sim["lo_in"], sim["hi_in"])
            logits = model.segment(specific.detach(), sim["general"])
            reconstruction = (F.mse_loss(f_lo, sim["q_lo"]) + F.mse_loss(f_hi, sim["q_hi"])
                              + 10.0 * F.mse_loss(specific, batch))
            return reconstruction + focal_loss(logits, sim["target"])

        modules = (model.restrict_lo, model.restrict_hi, model.object_decoder, model.detection)
        for module in modules:
            module.requires_grad_(True)
            module.train()
        params = [p for module in modules for p in module.parameters()]
        optimizer = torch.optim.Adam(params, lr=cfg.lr)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [max(1, int(0.8 * cfg.epochs))], gamma=0.1)
        self.history = self._loop(step, pixels, optimizer, cfg.epochs, cfg.seed + 1, "object branch", progress,
                                  lambda _epoch, _loss: scheduler.step())
        for module in modules:
            module.requires_grad_(False)

    def _train_upsampling(self, pixels: torch.Tensor, progress: bool) -> None:
        """Stage 2: the upsampling module on image-space DRAEM anomalies (synth), everything else frozen."""
        cfg = self.config
        model: DsrModel = self.model
        rng = np.random.default_rng([cfg.seed, 2])
        augmenter = DraemAugmenter(anomaly_source=cfg.anomaly_source, p_anomaly=cfg.p_anomaly)
        originals = to_uint8(pixels)

        def step(index: torch.Tensor) -> torch.Tensor:
            batch, mask = self._augment(originals, index, augmenter, rng)
            with torch.no_grad():
                specific, general = model.reconstructions(batch)
                coarse = torch.softmax(model.segment(specific, general), dim=1)
            return focal_loss(model.upsample(specific, general, coarse), mask)

        model.upsampling.requires_grad_(True)
        model.upsampling.train()
        optimizer = torch.optim.Adam(model.upsampling.parameters(), lr=cfg.upsampling_lr)
        epochs = cfg.upsampling_epochs
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, sorted({max(1, int(0.8 * epochs)), max(1, int(0.9 * epochs))}), gamma=0.2)
        self.upsampling_history = self._loop(step, torch.arange(len(pixels)), optimizer, epochs, cfg.seed + 2,
                                             "upsampling", progress, lambda _epoch, _loss: scheduler.step())
        model.upsampling.requires_grad_(False)
