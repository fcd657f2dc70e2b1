"""Normal-image context matching: prefer normal images that look like the ones the real defects came from.

``synth generate --normal-match exemplar`` (method ``paste``) draws the normal image of each sample with
probability proportional to a Gaussian kernel density of the exemplars' source-image descriptors, evaluated at
each normal image's descriptor: a defect seen on tall, dark images is pasted mostly onto tall, dark images.

Descriptor (:func:`image_descriptor`): ``(log(H / W), log(H * W), mean grey / 255, std grey / 255)`` of the
whole image (grey = channel mean). Exemplars known only by their mask have the first two (the mask has its
image's size) and NaN for the rest (:func:`exemplar_descriptor`); :func:`context_weights` turns descriptors
into sampling probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from synth.core.errors import InputError

__all__ = ["DESCRIPTOR_NAMES", "context_weights", "exemplar_descriptor", "image_descriptor", "weights_summary"]

DESCRIPTOR_NAMES = ("log_aspect", "log_area", "mean_gray", "std_gray")


def image_descriptor(image: np.ndarray) -> np.ndarray:
    """``(log(H/W), log(H*W), mean/255, std/255)`` of a uint8 HxW or HxWxC image (grey = channel mean)."""
    if not isinstance(image, np.ndarray) or image.ndim not in (2, 3) or image.dtype != np.uint8 or image.size == 0:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InputError(f"image_descriptor needs a non-empty uint8 HxW or HxWxC image, got {got}")
    h, w = image.shape[:2]
    gray = image.astype(np.float32) if image.ndim == 2 else image.astype(np.float32).mean(axis=2)
    return np.array(
        [math.log(h / w), math.log(h * w), float(gray.mean()) / 255.0, float(gray.std()) / 255.0], np.float64
    )


def exemplar_descriptor(exemplar: Any) -> np.ndarray:
    """Descriptor of a :class:`~synth.placement.DefectExemplar`'s source image; NaN grey levels without one."""
    if exemplar.image is not None:
        return image_descriptor(exemplar.image)
    h, w = exemplar.mask.shape[:2]
    return np.array([math.log(h / w), math.log(h * w), math.nan, math.nan], np.float64)


def context_weights(normal_descriptors: np.ndarray, exemplar_descriptors: np.ndarray) -> np.ndarray:
    """Sampling probability of each normal image: the exemplars' kernel density at its descriptor.

    Args:
        normal_descriptors: (N, d) descriptors of the normal images (no NaN).
        exemplar_descriptors: (M, d) descriptors of the exemplars' source images; NaN marks a dimension an
            exemplar doesn't have (masks only: the grey levels), which its kernel then ignores.

    Every dimension is divided by the normals' std (population std; a dimension where all normals agree says
    nothing about which to prefer and is skipped). Each exemplar j contributes ``exp(-0.5 * |(x - e_j) / h_j|^2)``
    over its d_j usable dimensions with Scott's bandwidth ``h_j = M^(-1/(d_j + 4))`` (in units of the normals'
    std). The kernels are left unnormalised (peak 1) so exemplars with and without images count equally. The
    sum is taken in log space relative to the best-matching normal, so the weights never all underflow to 0
    even when every normal is far from every exemplar.

    Returns:
        (N,) float64 probabilities summing to 1; uniform when no dimension is usable.
    """
    normals = np.asarray(normal_descriptors, np.float64)
    exemplars = np.asarray(exemplar_descriptors, np.float64)
    if normals.ndim != 2 or len(normals) == 0 or not np.isfinite(normals).all():
        raise InputError(f"normal_descriptors must be a finite (N, d) array with N >= 1, got shape {normals.shape}")
    if exemplars.ndim != 2 or len(exemplars) == 0 or exemplars.shape[1] != normals.shape[1]:
        raise InputError(
            f"exemplar_descriptors must be an (M, {normals.shape[1]}) array with M >= 1, got shape {exemplars.shape}"
        )
    std = normals.std(axis=0)
    usable = std > 1e-12
    n_normals = len(normals)
    if not usable.any():
        return np.full(n_normals, 1.0 / n_normals)
    x = normals[:, usable] / std[usable]
    e = exemplars[:, usable] / std[usable]
    m = len(exemplars)
    log_kernels = []
    for row in e:
        dims = np.isfinite(row)
        if not dims.any():
            continue
        h = m ** (-1.0 / (int(dims.sum()) + 4))
        log_kernels.append(-0.5 * (((x[:, dims] - row[dims]) / h) ** 2).sum(axis=1))
    if not log_kernels:
        return np.full(n_normals, 1.0 / n_normals)
    stacked = np.stack(log_kernels)  # (M', N)
    peak = stacked.max()
    density = np.exp(stacked - peak).sum(axis=0)
    return density / density.sum()


def weights_summary(weights: np.ndarray, names: Sequence[str], *, top: int = 5) -> dict[str, Any]:
    """Small JSON-able summary of ``weights``: effective number of normals and the ``top`` most likely."""
    weights = np.asarray(weights, np.float64)
    order = np.argsort(-weights, kind="stable")[:top]
    return {
        "effective_normals": float(1.0 / np.square(weights).sum()),
        "max_weight": float(weights.max()),
        "top": [{"image": str(names[i]), "weight": float(weights[i])} for i in order],
    }
