"""GANomaly detector: adversarial training of :class:`GanomalyModel`'s generator against a discriminator.

Training as the paper (Akcay et al., ACCV 2018) and its reference code, on normal images only:

- Generator loss ``w_adv * L_adv + w_con * L_con + w_enc * L_enc`` (weights 1, 50, 1):
  L_adv = mean squared difference of D's intermediate features of x and x_hat (feature matching),
  L_con = mean |x - x_hat| (contextual L1), L_enc = mean (z - z_hat)^2 (encoder L2).
- Discriminator loss: binary cross-entropy of real x (label 1) and detached x_hat (label 0), averaged;
  when it collapses below ``d_reinit_threshold`` (1e-5) D is re-initialised, as the reference does.
- Two Adam optimisers, lr 2e-4, betas (0.5, 0.999); DCGAN initialisation N(0, 0.02) drawn from ``seed``.

The step order is D first, then G (the reference's first release; the later one updates G first): both
see the same G forward pass, and the shared ``train_loop`` supplies seeded shuffling, the tqdm bar, early
stopping and the generator-loss history (D's losses and the three generator terms are kept per epoch too).

Deviations: the reference evaluates in training mode (BatchNorm batch statistics, so a score depends on the
rest of its batch); here BatchNorm's running statistics are re-estimated on the training images after
training (a plain average over one pass) and inference runs in eval mode, so scores are per image. The
pixel map ``|x - x_hat|`` is not in the paper (see ``torch_model``). Defaults are CPU-sized: the paper's
width 64 and latent 100 are kept, epochs 15 as the reference's ``niter``, batch size 16 instead of 64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from detect.base import Detector, DetectorConfig
from detect.data import ImageInput
from detect.models.components.init import dcgan_init
from detect.models.components.training import TrainingConfig, check_training_config, train_loop
from detect.models.reconstruction.ganomaly.torch_model import (
    SCORE_MODES,
    GanomalyDiscriminator,
    GanomalyModel,
)
from detect.registry import register


@dataclass
class GanomalyConfig(DetectorConfig, TrainingConfig):
    """GANomaly settings (defaults as the paper / reference code unless noted).

    latent_dim: size of z (paper 100).
    width: channels of the first encoder stage, doubled at every further stride-2 stage (reference ngf 64).
    extra_layers: 3x3 convolution blocks added to every encoder / decoder (reference ``extralayers`` 0).
    w_adv, w_con, w_enc: weights of the adversarial, contextual and encoder losses (paper 1, 50, 1).
    lr, beta1, beta2: Adam settings of both optimisers (paper 2e-4, 0.5, 0.999).
    epochs: passes over the training images (reference ``niter`` 15).
    d_reinit_threshold: re-initialise D when its loss falls below this (reference 1e-5; 0 disables).
    score_mode: "latent" (paper: mean (z - z_hat)^2) or "map_max" (maximum of the smoothed |x - x_hat| map).
    blur_sigma: Gaussian blur of the |x - x_hat| map, pixels at the input size (0: none).
    """

    latent_dim: int = 100
    width: int = 64
    extra_layers: int = 0
    w_adv: float = 1.0
    w_con: float = 50.0
    w_enc: float = 1.0
    epochs: int = 15
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    d_reinit_threshold: float = 1e-5
    score_mode: str = "latent"
    blur_sigma: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_training_config(self)
        self.check(isinstance(self.latent_dim, int) and self.latent_dim >= 1, "latent_dim", "an integer >= 1")
        self.check(isinstance(self.width, int) and 1 <= self.width <= 512, "width", "an integer in [1, 512]")
        self.check(isinstance(self.extra_layers, int) and 0 <= self.extra_layers <= 8, "extra_layers",
                   "an integer in [0, 8]")
        for key in ("w_adv", "w_con", "w_enc"):
            self.check(getattr(self, key) >= 0, key, ">= 0")
        self.check(self.w_adv + self.w_con + self.w_enc > 0, "w_con", "> 0 when w_adv and w_enc are 0")
        self.check(0 <= self.beta1 < 1, "beta1", "in [0, 1)")
        self.check(0 <= self.beta2 < 1, "beta2", "in [0, 1)")
        self.check(self.d_reinit_threshold >= 0, "d_reinit_threshold", ">= 0")
        self.check(self.score_mode in SCORE_MODES, "score_mode", f"one of {SCORE_MODES}")
        self.check(0 <= self.blur_sigma <= 32, "blur_sigma", "in [0, 32]")


@torch.no_grad()
def recompute_batchnorm_statistics(module: nn.Module, data: torch.Tensor, batch_size: int) -> None:
    """Replace the running mean / variance of every BatchNorm in ``module`` by their plain average over
    ``data`` (one pass in training mode), so eval-mode inference sees the trained network's statistics
    rather than an exponential average dominated by the last, still-changing steps."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    module.train()
    for start in range(0, data.shape[0], batch_size):
        module(data[start:start + batch_size])
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    module.eval()


@register
class Ganomaly(Detector):
    """GANomaly (Akcay et al., ACCV 2018): latent mismatch of an encoder-decoder-encoder GAN generator."""

    name = "ganomaly"
    paradigm = "reconstruction"
    Config = GanomalyConfig
    config: GanomalyConfig

    def build_model(self) -> GanomalyModel:
        cfg = self.config
        self.history: list[float] = []
        self.history_d: list[float] = []
        self.history_terms: dict[str, list[float]] = {"adv": [], "con": [], "enc": []}
        self.d_reinits = 0
        return GanomalyModel(cfg.image_size, latent_dim=cfg.latent_dim, width=cfg.width,
                             extra_layers=cfg.extra_layers, score_mode=cfg.score_mode, blur_sigma=cfg.blur_sigma)

    def _fit(self, images: list[ImageInput], progress: bool) -> None:
        cfg = self.config
        model: GanomalyModel = self.model
        generator = model.generator
        init_rng = torch.Generator().manual_seed(cfg.seed)
        dcgan_init(generator, init_rng)
        # D is needed for training only, so it is not part of the saved model.
        discriminator = GanomalyDiscriminator(cfg.image_size, cfg.width, cfg.extra_layers)
        dcgan_init(discriminator, init_rng)
        betas = (cfg.beta1, cfg.beta2)
        optimizer_g = torch.optim.Adam(generator.parameters(), lr=cfg.lr, betas=betas)
        optimizer_d = torch.optim.Adam(discriminator.parameters(), lr=cfg.lr, betas=betas)
        pixels = model.to_tanh_range(self.load_tensor(images))

        sums = {"d": 0.0, "adv": 0.0, "con": 0.0, "enc": 0.0, "steps": 0.0}
        self.history_d, self.history_terms, self.d_reinits = [], {"adv": [], "con": [], "enc": []}, 0

        def step(x: torch.Tensor) -> torch.Tensor:
            fake, latent, latent_hat = generator(x)
            # Discriminator: real -> 1, reconstruction (detached: G is not updated here) -> 0.
            logits_real, _ = discriminator(x)
            logits_fake, _ = discriminator(fake.detach())
            loss_d = 0.5 * (F.binary_cross_entropy_with_logits(logits_real, torch.ones_like(logits_real))
                            + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake)))
            optimizer_d.zero_grad(set_to_none=True)
            loss_d.backward()
            optimizer_d.step()
            if loss_d.item() < cfg.d_reinit_threshold:
                # D wins outright: its gradients would carry nothing for G any more (reference behaviour).
                dcgan_init(discriminator, init_rng)
                self.d_reinits += 1
            # Generator: feature matching against D, contextual L1, encoder L2.
            loss_adv = F.mse_loss(discriminator(fake)[1], discriminator(x)[1])
            loss_con = F.l1_loss(fake, x)
            loss_enc = F.mse_loss(latent_hat, latent)
            for key, value in (("d", loss_d), ("adv", loss_adv), ("con", loss_con), ("enc", loss_enc)):
                sums[key] += float(value.detach())
            sums["steps"] += 1
            return cfg.w_adv * loss_adv + cfg.w_con * loss_con + cfg.w_enc * loss_enc

        def on_epoch_end(epoch: int, loss: float) -> None:
            steps = max(sums["steps"], 1.0)
            self.history_d.append(sums["d"] / steps)
            for key in ("adv", "con", "enc"):
                self.history_terms[key].append(sums[key] / steps)
            for key in sums:
                sums[key] = 0.0

        generator.train()
        discriminator.train()
        self.history = train_loop(step, pixels, optimizer_g, epochs=cfg.epochs, batch_size=cfg.batch_size,
                                  seed=cfg.seed, progress=progress, desc=f"{self.name} fit",
                                  patience=cfg.patience, min_delta=cfg.min_delta, on_epoch_end=on_epoch_end)
        recompute_batchnorm_statistics(generator, pixels, cfg.batch_size)
        model.eval()
