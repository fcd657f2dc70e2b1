"""Realism metrics for a generated defect set against real defects: KID and IC-LPIPS-style diversity.

Both metrics run on the offline backbone (``tf_efficientnet_lite0`` with the ImageNet weights that ship as a
package dependency), so they work without any network. That makes them *deviations* from the published metrics,
and their values are comparable only with numbers computed by this module:

- **KID** (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased estimator of the squared MMD with the
  cubic polynomial kernel ``k(x, y) = (x·y / d + 1) ** 3``, averaged over ``subsets`` random subsets of
  ``subset_size`` images per side (clipped to the smaller set; seeded), reported as mean and std. The original
  uses InceptionV3 pool3 features, which are not available offline; here the features are Lite0's
  global-average-pooled 1280-d embeddings (``create_backbone(..., num_classes=0)``), inputs resized to
  ``image_size`` and normalised as the weights expect. Lower is more realistic; the unbiased estimator can be
  slightly negative for two samples of one distribution. Lite0's embeddings (ReLU6 outputs) are larger than
  Inception's, so the values are on another scale than published KIDs (on 64 px skimage textures: about -1 for
  two samples of one texture, 30-90 between textures) and they change with ``image_size``.
- **IC-LPIPS** (Ojha et al. 2021, "Few-shot image generation via cross-domain correspondence"): every generated
  image joins the cluster of its nearest real image, then the mean pairwise distance inside each cluster is
  averaged over clusters. Higher means more diverse; a generator that copies its few real images scores ~0.
  LPIPS needs learned per-channel linear weights (and AlexNet/VGG) that are not available offline, so the
  distance here is LPIPS-*style*: for each of several backbone stages (``create_feature_extractor``) the feature
  vector at every position is scaled to unit length over channels, the squared difference is summed over
  channels and averaged over positions (LPIPS with uniform weights), and the stages are averaged with equal
  weight (LPIPS sums its layers). The value per stage lies in [0, 4]. Clusters with fewer than two generated
  images carry no pair and are skipped (as in Ojha et al.'s code); at most ``max_pairs`` pairs per cluster are
  evaluated (sampled with the seed), which keeps large sets fast. The stage features are held in memory, about
  0.6 MB per image at ``image_size=224`` (0.05 MB at 64).

Defect-level realism: a small defect changes few pixels, so whole-image features mostly measure the background.
When masks are given, both metrics by default look at a square crop around each mask's bounding box (plus a
margin) instead of the whole image (``crop_to_mask``); images with an empty or missing mask stay whole.

Same inputs and seed -> same numbers (inference in eval mode; subsets and pairs drawn from ``seed``).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipelines.stage import (
    LoadedConfig,
    Stage,
    StageContext,
    fewshot_makes_own_set,
    run_synthetic_sets,
    shared_set_stage,
)
from synth.core.backbones import DEFAULT_BACKBONE, create_backbone, create_feature_extractor, imagenet_normalization
from synth.core.defect_set import read_defect_set
from synth.core.errors import ConfigError, InputError
from synth.core.io import ensure_rgb_uint8, read_image, read_json_if_exists, read_mask, write_json

__all__ = [
    "LPIPS_STAGES",
    "PIPELINE_STAGES",
    "RealismResult",
    "crop_to_defect",
    "embed_images",
    "ic_lpips",
    "kid",
    "lpips_style_distances",
    "lpips_style_features",
    "mmd2_unbiased",
    "polynomial_kernel",
    "realism_metrics",
]

logger = logging.getLogger(__name__)

ImageLike = np.ndarray | str | Path
MaskLike = np.ndarray | str | Path | None

LPIPS_STAGES = (1, 2, 3, 4)
"""Lite0 feature levels used by the LPIPS-style distance (strides 4, 8, 16, 32): low-level texture up to parts,
like the five AlexNet/VGG layers of LPIPS. Level 0 (stride 2) is left out because it costs most memory."""

# Full kernel matrices are computed once and indexed per subset when both sets are at most this large
# (3000^2 float64 = 72 MB per matrix); beyond that each subset gets its own kernel blocks.
_KID_CACHE_MAX = 3000
_PAIR_CHUNK = 64


# --------------------------------------------------------------------------------------------------
# KID
# --------------------------------------------------------------------------------------------------

def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KID's cubic polynomial kernel ``(a @ b.T / d + 1) ** 3`` in float64, ``d`` the feature dimension."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _mmd2_from_blocks(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    m = kxx.shape[0]
    # Dropping the diagonals k(x_i, x_i) is what makes the estimator unbiased (a U-statistic).
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within_x + within_y - 2.0 * kxy.sum() / (m * m))


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased squared MMD of two equally sized feature samples (rows) under :func:`polynomial_kernel`."""
    x = _check_features(x, "x")
    y = _check_features(y, "y")
    if len(x) != len(y) or len(x) < 2:
        raise InputError(f"mmd2_unbiased needs two samples of equal size >= 2, got {len(x)} and {len(y)}.")
    return _mmd2_from_blocks(polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y))


def kid(
    feats_a: np.ndarray,
    feats_b: np.ndarray,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Kernel Inception Distance (on whatever features are given) between two sets of feature rows.

    Args:
        feats_a, feats_b: ``(n, d)`` feature matrices (e.g. real and generated embeddings).
        subsets: number of random subsets averaged.
        subset_size: images per side in each subset; clipped to ``min(len(feats_a), len(feats_b))``.
        seed: seeds the subset draws.

    Returns:
        ``{"kid_mean", "kid_std", "kid_subsets", "kid_subset_size"}`` (std over subsets, ``ddof=0`` as in
        the reference implementations).

    Raises:
        ConfigError: ``subsets`` or ``subset_size`` below their minimum (1 and 2).
        InputError: a set has fewer than 2 rows, or the feature dimensions differ.
    """
    if int(subsets) < 1:
        raise ConfigError(f"kid_subsets must be >= 1, got {subsets}.")
    if int(subset_size) < 2:
        raise ConfigError(f"kid_subset_size must be >= 2 (the unbiased estimator needs pairs), got {subset_size}.")
    a = _check_features(feats_a, "feats_a")
    b = _check_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise InputError(f"KID feature dimensions differ: {a.shape[1]} vs {b.shape[1]}; use one backbone for both.")
    m = min(int(subset_size), len(a), len(b))
    rng = np.random.default_rng(seed)
    cached = max(len(a), len(b)) <= _KID_CACHE_MAX
    if cached:
        kaa, kbb, kab = polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b)
    values = np.empty(int(subsets), dtype=np.float64)
    for s in range(int(subsets)):
        ia = np.sort(rng.choice(len(a), size=m, replace=False))
        ib = np.sort(rng.choice(len(b), size=m, replace=False))
        if cached:
            values[s] = _mmd2_from_blocks(kaa[np.ix_(ia, ia)], kbb[np.ix_(ib, ib)], kab[np.ix_(ia, ib)])
        else:
            values[s] = mmd2_unbiased(a[ia], b[ib])
    return {
        "kid_mean": float(values.mean()),
        "kid_std": float(values.std()),
        "kid_subsets": int(subsets),
        "kid_subset_size": int(m),
    }


def _check_features(feats: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(feats, dtype=np.float64)
    if arr.ndim != 2:
        raise InputError(f"{name}: expected an (n, d) feature matrix, got shape {arr.shape}.")
    if len(arr) < 2:
        raise InputError(f"{name}: KID needs at least 2 feature rows, got {len(arr)}.")
    if not np.isfinite(arr).all():
        raise InputError(f"{name}: features contain NaN or inf.")
    return arr


# --------------------------------------------------------------------------------------------------
# IC-LPIPS
# --------------------------------------------------------------------------------------------------

def lpips_style_distances(feats_a: Sequence[np.ndarray], feats_b: Sequence[np.ndarray]) -> np.ndarray:
    """All-pairs LPIPS-style distances ``(len(a), len(b))`` between two sets of :func:`lpips_style_features`."""
    _check_stages(feats_a, feats_b)
    total = np.zeros((len(feats_a[0]), len(feats_b[0])), dtype=np.float64)
    for fa, fb in zip(feats_a, feats_b, strict=True):
        # ||u - v||^2 = |u|^2 + |v|^2 - 2 u.v; one matmul instead of n*m difference vectors.
        sq_a = np.einsum("ij,ij->i", fa, fa, dtype=np.float64)
        sq_b = np.einsum("ij,ij->i", fb, fb, dtype=np.float64)
        cross = (torch.from_numpy(fa) @ torch.from_numpy(fb).T).double().numpy()
        total += np.maximum(sq_a[:, None] + sq_b[None, :] - 2.0 * cross, 0.0)
    return total / len(feats_a)


def _pair_distances(feats: Sequence[np.ndarray], i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """LPIPS-style distances of the index pairs ``(i[k], j[k])`` inside one set, from explicit differences (exact
    zero for identical images, unlike the matmul form)."""
    out = np.zeros(len(i), dtype=np.float64)
    for start in range(0, len(i), _PAIR_CHUNK):
        sl = slice(start, start + _PAIR_CHUNK)
        for f in feats:
            diff = f[i[sl]] - f[j[sl]]
            out[sl] += np.einsum("ij,ij->i", diff, diff, dtype=np.float64)
    return out / len(feats)


def _sample_pairs(n: int, max_pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """All unordered pairs of ``range(n)`` when there are at most ``max_pairs``, else ``max_pairs`` distinct ones
    drawn uniformly (unranked from the row-major upper triangle, so no ``n^2`` pair list is built)."""
    total = n * (n - 1) // 2
    if total <= max_pairs:
        i, j = np.triu_indices(n, k=1)
        return i, j
    ranks = np.sort(rng.choice(total, size=max_pairs, replace=False))
    row_len = np.arange(n - 1, 0, -1)  # pairs starting at row i: n-1-i
    row_start = np.concatenate([[0], np.cumsum(row_len)[:-1]])
    i = np.searchsorted(row_start, ranks, side="right") - 1
    j = i + 1 + (ranks - row_start[i])
    return i, j


def ic_lpips(
    real_feats: Sequence[np.ndarray],
    gen_feats: Sequence[np.ndarray],
    *,
    max_pairs: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Intra-cluster LPIPS-style diversity of generated images, clustered to their nearest real image.

    Args:
        real_feats, gen_feats: per-stage feature lists from :func:`lpips_style_features`.
        max_pairs: most pairs evaluated per cluster (all pairs when a cluster has fewer).
        seed: seeds the pair sampling.

    Returns:
        ``{"ic_lpips": float | None, "ic_lpips_clusters": int, "ic_lpips_cluster_sizes": [int per real image],
        "ic_lpips_pairs": int, "lpips_to_nearest_real": float}``. ``ic_lpips_clusters`` counts the clusters
        that contributed (>= 2 generated members); ``ic_lpips`` is ``None`` when none did (every generated
        image nearest to a different real image). ``lpips_to_nearest_real`` is the mean distance of each
        generated image to its nearest real one (near 0 means copies of the real images).
    """
    if int(max_pairs) < 1:
        raise ConfigError(f"ic_lpips_max_pairs must be >= 1, got {max_pairs}.")
    _check_stages(real_feats, gen_feats)
    n_real, n_gen = len(real_feats[0]), len(gen_feats[0])
    if n_real < 1:
        raise InputError("IC-LPIPS needs at least 1 real image to cluster around, got 0.")
    if n_gen < 2:
        raise InputError(f"IC-LPIPS needs at least 2 generated images (it measures pairs), got {n_gen}.")
    to_real = lpips_style_distances(gen_feats, real_feats)
    nearest = to_real.argmin(axis=1)  # ties -> the lowest real index, deterministic
    rng = np.random.default_rng(seed)
    cluster_means: list[float] = []
    n_pairs = 0
    sizes = np.bincount(nearest, minlength=n_real)
    for r in range(n_real):
        members = np.flatnonzero(nearest == r)
        if len(members) < 2:
            continue
        i, j = _sample_pairs(len(members), int(max_pairs), rng)
        cluster_means.append(float(_pair_distances(gen_feats, members[i], members[j]).mean()))
        n_pairs += len(i)
    return {
        "ic_lpips": float(np.mean(cluster_means)) if cluster_means else None,
        "ic_lpips_clusters": len(cluster_means),
        "ic_lpips_cluster_sizes": [int(s) for s in sizes],
        "ic_lpips_pairs": int(n_pairs),
        "lpips_to_nearest_real": float(to_real.min(axis=1).mean()),
    }


def _check_stages(feats_a: Sequence[np.ndarray], feats_b: Sequence[np.ndarray]) -> None:
    if len(feats_a) == 0 or len(feats_a) != len(feats_b):
        raise InputError(
            f"LPIPS-style features need the same non-zero number of stages on both sides, got {len(feats_a)} and "
            f"{len(feats_b)}; compute both with lpips_style_features and the same backbone."
        )
    for k, (fa, fb) in enumerate(zip(feats_a, feats_b, strict=True)):
        if fa.ndim != 2 or fb.ndim != 2 or fa.shape[1] != fb.shape[1]:
            raise InputError(
                f"LPIPS-style stage {k}: feature shapes {fa.shape} and {fb.shape} do not match; use one backbone "
                "and one image_size for both sets."
            )


# --------------------------------------------------------------------------------------------------
# Images -> features
# --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _embedder(name: str) -> torch.nn.Module:
    return create_backbone(name, num_classes=0)


@functools.lru_cache(maxsize=2)
def _extractor(name: str, stages: tuple[int, ...]) -> torch.nn.Module:
    return create_feature_extractor(name, out_indices=stages)


def _batches(
    images: Sequence[np.ndarray], model: torch.nn.Module, image_size: int, batch_size: int, desc: str, progress: bool
):
    """Yield model outputs for resized, normalised batches of uint8 RGB images."""
    mean, std = imagenet_normalization(model)
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress) as bar, torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            # Images may differ in size (crops); each is resized on its own, antialiased so downscaling a large
            # photo does not alias fine texture into the features.
            batch = torch.cat([
                F.interpolate(
                    torch.from_numpy(np.array(im, dtype=np.float32) / 255.0).permute(2, 0, 1)[None],
                    size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True,
                )
                for im in chunk
            ])
            yield model((batch - mean_t) / std_t)
            bar.update(len(chunk))


def embed_images(
    images: Sequence[ImageLike],
    *,
    backbone: str = DEFAULT_BACKBONE,
    image_size: int = 224,
    batch_size: int = 32,
    progress: bool = False,
) -> np.ndarray:
    """Pooled backbone embeddings ``(n, d)`` float64 of images (paths or arrays; the KID features)."""
    images = _load_images(images, "images")
    model = _embedder(backbone)
    parts = [out.double().numpy() for out in _batches(images, model, image_size, batch_size, "KID features", progress)]
    return np.concatenate(parts) if parts else np.zeros((0, 0))


def lpips_style_features(
    images: Sequence[ImageLike],
    *,
    backbone: str = DEFAULT_BACKBONE,
    image_size: int = 224,
    stages: Sequence[int] = LPIPS_STAGES,
    batch_size: int = 32,
    progress: bool = False,
) -> list[np.ndarray]:
    """Per-stage flattened features ``(n, C*H*W)`` float32, prepared so that a squared Euclidean distance is the
    LPIPS-style stage distance: unit length over channels at every position, scaled by ``1/sqrt(H*W)`` (so the
    sum over positions becomes the spatial mean). Images are paths or arrays."""
    images = _load_images(images, "images")
    model = _extractor(backbone, tuple(int(s) for s in stages))
    per_stage: list[list[np.ndarray]] = []
    for outs in _batches(images, model, image_size, batch_size, "LPIPS features", progress):
        if not per_stage:
            per_stage = [[] for _ in outs]
        for k, f in enumerate(outs):
            # Same eps as LPIPS' normalize_tensor; a zero vector (dead ReLU6 position) stays zero.
            unit = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            per_stage[k].append((unit / math.sqrt(f.shape[2] * f.shape[3])).flatten(1).numpy().astype(np.float32))
    return [np.concatenate(parts) for parts in per_stage]


def crop_to_defect(
    image: np.ndarray, mask: np.ndarray | None, *, margin: float = 0.25, min_size: int = 16
) -> np.ndarray:
    """Square crop around the mask's bounding box, grown by ``margin`` x its longer side on every side.

    The crop is square so resizing it to the backbone input keeps the defect's aspect ratio; it is at least
    ``min_size`` px (context for tiny defects), shifted to stay inside the image and clipped to the image size.
    An empty or missing mask returns the whole image.
    """
    if mask is None or not mask.any():
        return image
    height, width = image.shape[:2]
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    side = max(int(math.ceil(max(y1 - y0, x1 - x0) * (1.0 + 2.0 * margin))), int(min_size))
    side_y, side_x = min(side, height), min(side, width)
    top = min(max((y0 + y1 - side_y) // 2, 0), height - side_y)
    left = min(max((x0 + x1 - side_x) // 2, 0), width - side_x)
    return image[top:top + side_y, left:left + side_x]


def _load_images(items: Sequence[ImageLike], which: str) -> list[np.ndarray]:
    images = []
    for k, item in enumerate(items):
        if isinstance(item, str | Path):
            images.append(read_image(item))
        else:
            images.append(ensure_rgb_uint8(item, source=f"{which}[{k}]"))
    return images


def _load_masks(masks: Sequence[MaskLike], images: Sequence[np.ndarray], which: str) -> list[np.ndarray | None]:
    if len(masks) != len(images):
        raise InputError(
            f"masks_{which} has {len(masks)} entries but there are {len(images)} {which} images; give one mask "
            "(or None) per image, in the same order."
        )
    out: list[np.ndarray | None] = []
    for k, (mask, image) in enumerate(zip(masks, images, strict=True)):
        if mask is None:
            out.append(None)
            continue
        if isinstance(mask, str | Path):
            out.append(read_mask(mask, shape=image.shape[:2]))
            continue
        arr = np.asarray(mask)
        if arr.ndim == 3:
            arr = arr.max(axis=2)
        if arr.shape != image.shape[:2]:
            raise InputError(
                f"masks_{which}[{k}]: mask shape {arr.shape} differs from its image's {image.shape[:2]}; masks must "
                "have the image's height and width."
            )
        out.append(arr > 0)
    return out


# --------------------------------------------------------------------------------------------------
# One call for the report
# --------------------------------------------------------------------------------------------------

def realism_metrics(
    real: Sequence[ImageLike],
    generated: Sequence[ImageLike],
    *,
    masks_real: Sequence[MaskLike] | None = None,
    masks_generated: Sequence[MaskLike] | None = None,
    backbone: str = DEFAULT_BACKBONE,
    image_size: int = 224,
    seed: int = 0,
    progress: bool = False,
    crop_to_mask: bool | None = None,
    crop_margin: float = 0.25,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    ic_lpips_max_pairs: int = 1000,
    batch_size: int = 32,
) -> dict[str, Any]:
    """KID and IC-LPIPS-style diversity of ``generated`` against ``real`` (see the module docstring).

    Args:
        real, generated: images as paths or arrays (uint8/float, gray/RGB/RGBA); at least 2 per set.
        masks_real, masks_generated: optional defect masks (path, array or ``None``), one per image.
        backbone: timm model for both metrics (the offline Lite0 by default).
        image_size: side the images (or crops) are resized to.
        seed: seeds KID subsets and IC-LPIPS pair sampling.
        progress: show tqdm bars for feature extraction.
        crop_to_mask: look at the defect crop instead of the whole image; ``None`` -> on when both mask lists are
            given. Needs masks on both sides, so real and generated are measured alike.
        crop_margin: crop margin as a fraction of the mask's longer bounding-box side.
        kid_subsets, kid_subset_size: KID subset count and size (size clipped to the smaller set).
        ic_lpips_max_pairs: most pairs per IC-LPIPS cluster.
        batch_size: images per forward pass.

    Returns:
        JSON-safe ``{"kid_mean", "kid_std", "kid_subsets", "kid_subset_size", "ic_lpips", "ic_lpips_clusters",
        "ic_lpips_cluster_sizes", "ic_lpips_pairs", "lpips_to_nearest_real", "n_real", "n_generated",
        "backbone", "image_size", "crop_to_mask", "seed"}``.

    Raises:
        InputError: a set has fewer than 2 images, an image/mask is unreadable, mask counts or shapes differ,
            or masks are given for one side only while ``crop_to_mask`` is not False.
        ConfigError: a numeric option is out of range.
    """
    for which, items in (("real", real), ("generated", generated)):
        if items is None or len(items) < 2:
            n = 0 if items is None else len(items)
            raise InputError(
                f"realism metrics need at least 2 {which} images (KID and IC-LPIPS compare pairs), got {n}."
            )
    if int(image_size) < 32:
        raise ConfigError(f"image_size must be >= 32 for the backbone's strided stages, got {image_size}.")
    if crop_margin < 0:
        raise ConfigError(f"crop_margin must be >= 0, got {crop_margin}.")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
    have_real, have_gen = masks_real is not None, masks_generated is not None
    if crop_to_mask is None:
        if have_real != have_gen:
            raise InputError(
                f"masks given for the {'real' if have_real else 'generated'} images only; give masks_real and "
                "masks_generated both to compare defect crops, or crop_to_mask=False to compare whole images."
            )
        crop_to_mask = have_real and have_gen
    elif crop_to_mask and not (have_real and have_gen):
        raise InputError("crop_to_mask=True needs masks_real and masks_generated (one mask or None per image).")

    real_images = _load_images(real, "real")
    gen_images = _load_images(generated, "generated")
    if crop_to_mask:
        real_images = [
            crop_to_defect(im, m, margin=crop_margin)
            for im, m in zip(real_images, _load_masks(masks_real, real_images, "real"), strict=True)
        ]
        gen_images = [
            crop_to_defect(im, m, margin=crop_margin)
            for im, m in zip(gen_images, _load_masks(masks_generated, gen_images, "generated"), strict=True)
        ]

    options = {"backbone": backbone, "image_size": int(image_size), "batch_size": int(batch_size), "progress": progress}
    kid_result = kid(
        embed_images(real_images, **options), embed_images(gen_images, **options),
        subsets=kid_subsets, subset_size=kid_subset_size, seed=seed,
    )
    ic_result = ic_lpips(
        lpips_style_features(real_images, **options), lpips_style_features(gen_images, **options),
        max_pairs=ic_lpips_max_pairs, seed=seed,
    )
    return {
        **kid_result,
        **ic_result,
        "n_real": len(real_images),
        "n_generated": len(gen_images),
        "backbone": backbone,
        "image_size": int(image_size),
        "crop_to_mask": bool(crop_to_mask),
        "seed": int(seed),
    }


# --------------------------------------------------------------------------------------------------
# the pipeline stage
# --------------------------------------------------------------------------------------------------

class RealismResult(TypedDict):
    """What the realism stage records: KID and IC-LPIPS per synthetic set label."""

    reference: str  # which real defects the sets were compared with
    n_real_available: int
    options: dict[str, Any]
    seed: int
    sets: dict[str, dict[str, Any]]


def stage_realism(ctx: StageContext) -> RealismResult:
    """The ``realism`` stage of ``pipelines run``: KID and IC-LPIPS of every synthetic set of the run against real
    defects none of them was made from (each set's metrics cached under ``sets/``)."""
    from pipelines.classification import seeded_subset  # its module pulls in the classifier: loaded on use

    options = ctx.cfg.realism
    assert options is not None, "the realism stage runs only when the config enables it"
    seed = int(ctx.plan.seed or 0)
    real_set = read_defect_set(ctx.cfg.data)
    split = (ctx.deps.get("classification") or {}).get("split")
    if split:
        # The classification held-out parts: no generated set of this run was made from them.
        held_out = {path for part in split.values() for path in part.get("test", [])}
        real = [s for s in real_set.select(split="test", anomalous=True) if s.image in held_out]
        reference = "classification held-out real defects"
    else:
        real = real_set.select(split="test", anomalous=True)
        reference = "all real test defects"
    if len(real) < 2:
        raise InputError(f"{ctx.cfg.data}: realism needs at least 2 real defect images, found {len(real)}.")
    real = seeded_subset(real, options.max_images, seed)
    results: dict[str, Any] = {}
    for label, folder in run_synthetic_sets(ctx.deps).items():
        cache = ctx.plan.dir / "sets" / f"{label.replace(':', '_')}.json"
        cached = read_json_if_exists(cache)
        if isinstance(cached, dict):
            results[label] = cached
            continue
        generated_set = read_defect_set(folder)
        generated = seeded_subset(generated_set.select(anomalous=True), options.max_images, seed + 1)
        if len(generated) < 2:
            logger.warning("%s: fewer than 2 generated defects; realism skipped", folder)
            results[label] = {"skipped": "fewer than 2 generated defects"}
            continue
        masks = options.crop_to_mask
        metrics = realism_metrics(
            [real_set.image_path(s) for s in real], [generated_set.image_path(s) for s in generated],
            masks_real=[real_set.mask_path(s) for s in real] if masks else None,
            masks_generated=[generated_set.mask_path(s) for s in generated] if masks else None,
            backbone=options.backbone, image_size=options.image_size, seed=seed, progress=ctx.progress,
            crop_to_mask=masks, kid_subsets=options.kid_subsets, kid_subset_size=options.kid_subset_size,
            ic_lpips_max_pairs=options.ic_lpips_max_pairs)
        metrics["set"] = str(folder)
        write_json(cache, metrics)
        results[label] = metrics
    return {"reference": reference, "n_real_available": len(real), "options": options.model_dump(mode="json"),
            "seed": seed, "sets": results}


def _realism_dependencies(loaded: LoadedConfig, enabled: set[str]) -> list[str]:
    wanted = [shared_set_stage(enabled), "classification"] + (["fewshot"] if fewshot_makes_own_set(loaded) else [])
    return [s for s in wanted if s in enabled]


# Configured by the top-level ``realism`` key (no section model of its own).
PIPELINE_STAGES = {"realism": Stage(stage_realism, depends=_realism_dependencies)}
