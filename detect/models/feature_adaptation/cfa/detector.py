"""CFA detector: trains the patch descriptor of :class:`CfaModel` with the coupled-hypersphere loss.

Training, as in the paper and the authors' reference code:

1. Memory bank initialisation: the (still untrained) descriptor's target-oriented features of every training
   image, averaged over the images per spatial position (h*w vectors); with ``gamma_c > 1`` compressed to
   h*w // gamma_c vectors by k-means. The bank stays fixed afterwards.
2. Descriptor training with the soft-boundary loss on squared distances d^2 to the memory bank, per patch
   sorted ascending: attraction ``sum_{k<=K} max(0, d_k^2 - r^2)`` to the K nearest memory features and
   repulsion ``sum_{K<j<=K+J} max(0, r^2 - d_j^2 - alpha)`` from the next J (hard negatives), both averaged
   over patches. ``r`` (radius) is a fixed hyperparameter here (as in Anomalib). AdamW optimiser.

The frozen backbone's patch features are computed once and cached when they fit in ``FEATURE_CACHE_BYTES``;
otherwise they are recomputed from the images each epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from detect.base import Detector, DetectorConfig
from detect.data import ImageInput
from detect.models.components.feature_extractor import BackboneConfig, build_feature_extractor
from detect.models.components.training import FrozenFeatures
from detect.models.feature_adaptation.cfa.torch_model import CfaModel
from detect.registry import register
from synth.core.errors import ConfigError, InputError


@dataclass
class CfaConfig(DetectorConfig, BackboneConfig):
    """CFA settings (defaults follow the paper / reference code unless noted).

    layers: backbone stages whose features are concatenated (tf_efficientnet_lite0: 1, 2, 3 = strides 4, 8, 16).
    epochs: passes over the training images for the descriptor (the reference code uses 30; 10 suffice here).
    lr, weight_decay: AdamW settings.
    gamma_c: memory compression; the bank keeps h*w // gamma_c k-means centroids (1 = no compression).
    gamma_d: feature-dimension reduction of the descriptor (output channels = input channels // gamma_d).
    k_nearest: K, memory features each patch is attracted to (also the softmin width at scoring).
    j_repulsion: J, the next-nearest memory features (hard negatives) each patch is pushed away from.
    radius: hypersphere radius r; alpha: repulsion margin.
    """

    layers: list[int] = field(default_factory=lambda: [1, 2, 3])
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 5e-4
    gamma_c: int = 1
    gamma_d: int = 1
    k_nearest: int = 3
    j_repulsion: int = 3
    radius: float = 1e-5
    alpha: float = 1e-1

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", "an integer >= 1")
        self.check(self.lr > 0, "lr", "> 0")
        self.check(self.weight_decay >= 0, "weight_decay", ">= 0")
        self.check(isinstance(self.gamma_c, int) and self.gamma_c >= 1, "gamma_c", "an integer >= 1")
        self.check(isinstance(self.gamma_d, int) and self.gamma_d >= 1, "gamma_d", "an integer >= 1")
        self.check(isinstance(self.k_nearest, int) and self.k_nearest >= 1, "k_nearest", "an integer >= 1")
        self.check(isinstance(self.j_repulsion, int) and self.j_repulsion >= 0, "j_repulsion", "an integer >= 0")
        self.check(self.radius >= 0, "radius", ">= 0")
        self.check(self.alpha >= 0, "alpha", ">= 0")


def nearest_sq_distances(phi: torch.Tensor, memory: torch.Tensor, n: int) -> torch.Tensor:
    """Ascending squared distances (N, P, n) from descriptors (N, P, D) to their n nearest memory features.

    The neighbours are searched without autograd; only the n distances that enter the loss are recomputed with
    gradients (the same values and gradients as the full distance matrix, at a fraction of the backward cost).
    """
    with torch.no_grad():
        dist = (phi.pow(2).sum(-1, keepdim=True) + memory.pow(2).sum(-1).view(1, 1, -1) - 2.0 * phi @ memory.t())
        index = dist.topk(min(n, memory.shape[0]), dim=-1, largest=False, sorted=True).indices
    return (phi.unsqueeze(-2) - memory[index]).pow(2).sum(-1)


def cfa_loss(nearest: torch.Tensor, k: int, j: int, radius: float, alpha: float) -> torch.Tensor:
    """Coupled-hypersphere soft-boundary loss from ascending squared distances (N, P, >= K+J) to the memory."""
    r2 = radius**2
    attraction = (nearest[..., :k] - r2).clamp_min(0).sum(-1).mean()
    repulsion = (r2 - nearest[..., k:k + j] - alpha).clamp_min(0).sum(-1).mean()
    return attraction + repulsion


def kmeans(x: torch.Tensor, n_clusters: int, generator: torch.Generator, max_iter: int = 300) -> torch.Tensor:
    """Lloyd's k-means with a seeded random initialisation; returns (n_clusters, D) centroids."""
    centroids = x[torch.randperm(x.shape[0], generator=generator)[:n_clusters]].clone()
    assign = None
    for _ in range(max_iter):
        new_assign = torch.cdist(x, centroids).argmin(dim=1)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=n_clusters).to(x.dtype)
        filled = counts > 0  # an emptied cluster keeps its previous centroid
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


@register
class Cfa(Detector):
    """CFA (Lee et al., IEEE Access 2022): target-oriented patch features near a memory bank of normal ones."""

    name = "cfa"
    paradigm = "feature_adaptation"
    Config = CfaConfig
    config: CfaConfig

    def build_model(self) -> nn.Module:
        extractor = build_feature_extractor(self.config, loading=self.loading)
        channels = sum(extractor.channels)
        if self.config.gamma_d > channels:
            raise ConfigError(f"{type(self.config).__qualname__}: key 'gamma_d' must be <= {channels}, the "
                              f"number of feature channels of layers {self.config.layers} "
                              f"(got {self.config.gamma_d!r})")
        self.history: list[float] = []
        return CfaModel(extractor, gamma_d=self.config.gamma_d, k_nearest=self.config.k_nearest)

    def _fit(self, images: list[ImageInput], progress: bool) -> None:
        cfg = self.config
        model: CfaModel = self.model
        generator = torch.Generator().manual_seed(cfg.seed)
        model.descriptor.reset_parameters(generator)
        model.eval()

        pixels = self.load_tensor(images)
        n = pixels.shape[0]
        bs = cfg.batch_size
        features = FrozenFeatures(model.patch_features, pixels, bs)
        _, channels, h, w = features.first.shape

        # Memory bank: the descriptor is linear, so the mean of its outputs is its output of the mean features.
        with torch.no_grad():
            total = torch.zeros(1, channels, h, w)
            for i in range(0, n, bs):
                total += features(torch.arange(i, min(i + bs, n))).sum(0, keepdim=True)
            memory = model.describe(total / n)[0]  # (h*w, D)
            if cfg.gamma_c > 1:
                n_clusters = memory.shape[0] // cfg.gamma_c
                if n_clusters < 1:
                    raise ConfigError(f"{type(cfg).__qualname__}: key 'gamma_c' must be <= {memory.shape[0]} "
                                      f"(the {h}x{w} feature positions) (got {cfg.gamma_c!r})")
                memory = kmeans(memory, n_clusters, generator)
        if memory.shape[0] < cfg.k_nearest + cfg.j_repulsion:
            raise InputError(f"{self.name}: the memory bank has {memory.shape[0]} features, fewer than "
                             f"k_nearest + j_repulsion = {cfg.k_nearest + cfg.j_repulsion}; lower gamma_c.")
        model.memory = memory.contiguous()

        model.train()
        optimizer = torch.optim.AdamW(model.descriptor.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.history = []
        with tqdm(range(cfg.epochs), desc=f"{self.name} fit", unit="epoch", disable=not progress) as bar:
            for _ in bar:
                order = torch.randperm(n, generator=generator)
                epoch_loss = 0.0
                for i in range(0, n, bs):
                    index = order[i:i + bs]
                    phi = model.describe(features(index))
                    nearest = nearest_sq_distances(phi, model.memory, cfg.k_nearest + cfg.j_repulsion)
                    loss = cfa_loss(nearest, cfg.k_nearest, cfg.j_repulsion, cfg.radius, cfg.alpha)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    epoch_loss += loss.item() * len(index)
                self.history.append(epoch_loss / n)
                bar.set_postfix(loss=f"{self.history[-1]:.4g}")
        model.eval()
