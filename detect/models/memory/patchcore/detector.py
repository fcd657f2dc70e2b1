"""PatchCore detector: memory bank of locally aware patch features, greedy coreset, nearest-neighbour scores.

Training streams the normal images in batches, keeps every patch feature (or, above ``max_patches``, a uniform
random subset chosen up front, so memory stays bounded however many images there are), selects a greedy
k-center coreset of ``coreset_ratio`` of them and stores it as the model's ``memory_bank`` buffer.

The coreset sampler (:func:`k_center_greedy`) is the paper's greedy k-center selection on a Johnson-Lindenstrauss
random projection of the features, made fast on CPU:

- the minimum distance of every point to the chosen centers is updated incrementally (one distance per point
  and new center, as |x|^2 - 2 x.c + |c|^2 on mean-centred float32 projections), never recomputed;
- those updates are done lazily, block by block: the points are split into blocks of ``block_size`` rows, each
  with an upper bound (its largest, possibly stale, minimum distance). Only the block with the largest bound is
  brought up to date, with all centers added since its last update at once (one matrix product instead of many
  matrix-vector products, so the points are read from memory once per update rather than once per center);
  when that block is up to date and still holds the largest bound, its farthest point is the farthest point
  overall, because distances only shrink as centers are added. The selection is therefore exactly the one of
  the plain greedy algorithm, only computed with far less memory traffic.
- it runs on one thread: thousands of small matrix products, where thread synchronisation costs more than it
  saves (several times more on a busy machine).

Measured with scripts/bench_patchcore.py on the 2-core development machine (shared, load average ~7): 10% of
100_000 random 384-d patches in 15 s against ~43 min for Anomalib 2.7's KCenterGreedy (one full distance pass per
center, at its projection to 284 dimensions; extrapolated from 1000 centers): 170x; on 102_400 magnetic-tile
patches 14 s against 41 min (178x).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from detect.base import Detector, DetectorConfig
from detect.data import ImageInput, iter_batches
from detect.models.components.feature_extractor import BackboneConfig, build_feature_extractor
from detect.models.memory.patchcore.torch_model import PatchcoreModel
from detect.registry import register
from synth.core.errors import InputError

__all__ = ["Patchcore", "PatchcoreConfig", "coreset_size", "k_center_greedy", "random_projection"]


@dataclass
class PatchcoreConfig(DetectorConfig, BackboneConfig):
    """PatchCore settings.

    layers: backbone feature indices (tf_efficientnet_lite0 [2, 3]: strides 8 and 16, 40 + 112 = 152 channels).
    feature_dim: channels after adaptive average pooling over the concatenated stages (paper: 1024 for a
        WideResNet-50 with 1536 channels); values at or above the backbone's channel count keep every channel
        unpooled (pooling to more bins would only repeat channels). Default 384: all 152 channels of the default
        tf_efficientnet_lite0 [2, 3], because pooling them lost accuracy on magnetic-tile (100 train images at
        256 px, 50 good + 50 defect: image AUROC 0.890 with 152 channels, 0.879 with 128, 0.862 with 96, 0.849
        with 64) for at most ~15% faster inference; for wider backbones (ResNet-18 [2, 3]: 384 channels,
        WideResNet-50: 1536) it caps the nearest-neighbour search cost, which grows linearly with the dimension.
    coreset_ratio: share of the training patches kept in the memory bank, in (0, 1]; ceil(ratio * N) patches.
    projection_dim: dimension of the Gaussian random projection used only for coreset selection (distances
        there need not be exact, Johnson-Lindenstrauss); at or above feature_dim no projection is done.
    num_neighbors: b in the paper's image-score reweighting (1 disables the reweighting: score = max distance).
    max_patches: most patches the coreset is selected from; above it a uniform random subset (seeded) is kept
        before the coreset. It bounds the training memory (max_patches * feature_dim * 4 bytes: 122 MB with the
        default 152 channels) and the selection time, which grows as ratio * N^2 (N = 200_000: ~4x the time of
        100_000). 200_000 patches are about 195 images at image_size 256 (1024 patches each).
    """

    image_size: int = 256
    feature_dim: int = 384
    coreset_ratio: float = 0.1
    projection_dim: int = 128
    num_neighbors: int = 9
    max_patches: int = 200_000
    layers: list[int] = field(default_factory=lambda: [2, 3])

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(_is_int(self.feature_dim) and self.feature_dim >= 1, "feature_dim", "an integer >= 1")
        self.check(isinstance(self.coreset_ratio, (int, float)) and not isinstance(self.coreset_ratio, bool)
                   and 0 < self.coreset_ratio <= 1, "coreset_ratio",
                   "a number in (0, 1]")
        self.check(_is_int(self.projection_dim) and self.projection_dim >= 1, "projection_dim", "an integer >= 1")
        self.check(_is_int(self.num_neighbors) and self.num_neighbors >= 1, "num_neighbors", "an integer >= 1")
        self.check(_is_int(self.max_patches) and self.max_patches >= 1, "max_patches", "an integer >= 1")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def coreset_size(n: int, ratio: float) -> int:
    """ceil(ratio * n), at least 1 (rounded first so 0.07 * 100 gives 7, not 8)."""
    return max(1, min(n, math.ceil(round(ratio * n, 6))))


def random_projection(features: torch.Tensor, dim: int, generator: torch.Generator,
                      chunk_rows: int = 65_536) -> torch.Tensor:
    """Gaussian Johnson-Lindenstrauss projection (N, D) -> (N, dim), float32, computed in row chunks."""
    n, d = features.shape
    if dim >= d:
        return features.float().clone()
    matrix = torch.randn(d, dim, generator=generator) / math.sqrt(dim)
    out = torch.empty(n, dim)
    for start in range(0, n, chunk_rows):
        torch.mm(features[start:start + chunk_rows].float(), matrix, out=out[start:start + chunk_rows])
    return out


@torch.no_grad()
def k_center_greedy(features: torch.Tensor, k: int, *, projection_dim: int = 128, seed: int = 0,
                    block_size: int = 512, progress: bool = False) -> torch.Tensor:
    """Greedy k-center coreset: indices (k,) of distinct rows of ``features`` (N, D), in selection order.

    Starts from a seeded random row; each next row is the one farthest (Euclidean) from the rows chosen so far,
    measured after a seeded Gaussian random projection to ``projection_dim`` (none when D <= projection_dim).
    Exactly the plain greedy selection, computed with lazy blockwise updates (see the module docstring).
    """
    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, {n}]")
    with _single_thread():
        return _k_center_greedy(features, k, projection_dim, seed, block_size, progress)


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch on one thread: the selection is thousands of small matrix products, for which thread
    start-up and barriers cost more than they gain (and, on a busy machine, many times more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _k_center_greedy(features: torch.Tensor, k: int, projection_dim: int, seed: int, block_size: int,
                     progress: bool) -> torch.Tensor:
    n = features.shape[0]
    generator = torch.Generator().manual_seed(seed)
    z = random_projection(features, projection_dim, generator)
    start = int(torch.randint(n, (1,), generator=generator))
    if k == n:  # every point is a center
        return torch.arange(n)
    z -= z.mean(0)  # distances are translation invariant; centring keeps |x|^2 - 2x.c + |c|^2 accurate
    sq = z.pow(2).sum(1)
    blocks = [(s, min(s + block_size, n)) for s in range(0, n, block_size)]
    min_sq = torch.full((n,), float("inf"))  # squared distance to the nearest center (-inf: a center)
    upper = torch.full((len(blocks),), float("inf"))  # per block: >= every min_sq in it
    applied = [0] * len(blocks)  # per block: centers [0, applied) are in its min_sq
    centers = torch.empty(k, z.shape[1])
    centers_sq = torch.empty(k)
    selected = torch.empty(k, dtype=torch.long)
    max_pending = max(1, (1 << 21) // block_size)  # bounds the (block, centers) distance matrix to 8 MiB

    chosen = start
    for count in tqdm(range(1, k + 1), desc="patchcore coreset", unit="center", disable=not progress,
                      mininterval=0.5):
        selected[count - 1] = chosen
        centers[count - 1] = z[chosen]
        centers_sq[count - 1] = sq[chosen]
        min_sq[chosen] = float("-inf")
        if count == k:
            break
        while True:
            b = int(upper.argmax())
            lo, hi = blocks[b]
            block_min = min_sq[lo:hi]
            if applied[b] == count:
                chosen = lo + int(block_min.argmax())
                break
            zb = z[lo:hi]
            for c0 in range(applied[b], count, max_pending):
                c1 = min(count, c0 + max_pending)
                dist = torch.addmm(centers_sq[c0:c1], zb, centers[c0:c1].t(), alpha=-2).amin(1)
                torch.minimum(block_min, dist.add_(sq[lo:hi]), out=block_min)
            applied[b] = count
            upper[b] = block_min.max()
    return selected


@register
class Patchcore(Detector):
    """PatchCore: distance of each patch feature to a coreset memory bank of normal patch features."""

    name = "patchcore"
    paradigm = "memory"
    cheap_refit = True
    Config = PatchcoreConfig
    config: PatchcoreConfig

    def build_model(self) -> PatchcoreModel:
        extractor = build_feature_extractor(self.config, loading=self.loading)
        return PatchcoreModel(extractor, feature_dim=self.config.feature_dim,
                              num_neighbors=self.config.num_neighbors)

    @torch.no_grad()
    def extract_patches(self, images: list[ImageInput], progress: bool = False) -> torch.Tensor:
        """Patch features (P, feature_dim) of ``images``; above ``max_patches`` a seeded uniform subset."""
        self.model.eval()
        cap = self.config.max_patches
        keep: np.ndarray | None = None
        out: torch.Tensor | None = None
        offset = filled = 0
        with tqdm(total=len(images), desc="patchcore features", unit="img", disable=not progress) as bar:
            for batch, _ in iter_batches(images, self.config.image_size, self.config.batch_size):
                patches = self.model.to_patches(self.model.embed(batch))
                raw = patches.shape[0]
                if out is None:
                    total = len(images) * (raw // len(batch))
                    if total > cap:
                        rng = np.random.default_rng([self.config.seed, 1])
                        keep = np.sort(rng.choice(total, size=cap, replace=False))
                    out = torch.empty(min(total, cap), patches.shape[1])
                if keep is not None:
                    lo, hi = np.searchsorted(keep, [offset, offset + raw])
                    patches = patches[torch.from_numpy(keep[lo:hi] - offset)]
                out[filled:filled + patches.shape[0]] = patches
                offset += raw
                filled += patches.shape[0]
                bar.update(len(batch))
        if out is None:
            raise InputError(f"{self.name}: no training images.")
        return out[:filled]

    def _fit(self, images: list[ImageInput], progress: bool) -> None:
        patches = self.extract_patches(images, progress)
        k = coreset_size(patches.shape[0], self.config.coreset_ratio)
        index = k_center_greedy(patches, k, projection_dim=self.config.projection_dim, seed=self.config.seed,
                                progress=progress)
        self.model.memory_bank = patches[index].contiguous()
