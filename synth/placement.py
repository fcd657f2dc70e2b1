"""Mask-guided placement: new labeled defects from a few real defect masks.

An inspection engineer usually has a handful of real defect masks (optionally with the images they
were cut from) and many normal images. This module turns them into new labeled defects:

1. :func:`deform_exemplar` / :func:`deform_mask` / :func:`deform_mask_and_patch` crop a real mask to
   its bounding box and apply a random affine warp (scale, rotation, flips) plus an optional smooth
   elastic warp; the defect image patch (and any other aligned layer) gets the *identical* warp.
2. :func:`estimate_foreground` says where on a normal image a defect may go (whole image for
   textures, the object for objects on a uniform background).
3. :func:`place_mask` picks a position at which the deformed mask lies (mostly) on the foreground.
4. :func:`blend` renders the defect into the normal image: ``alpha`` (feathered paint),
   ``poisson`` (``cv2.seamlessClone`` of the real defect patch) or ``texture`` (the real defect's
   deviation from its own background added to the new surface).
5. :class:`MaskGuidedPlacer` ties the steps together for a list of :class:`DefectExemplar`. By default
   positions are uniform on the foreground, rotations uniform in a range and appearance copied as is;
   ``position="exemplar"``, ``orientation="exemplar"`` and ``harmonize=True`` instead make the new
   defects follow the statistics of the few real exemplars of their class (a smoothed bootstrap: copy
   exemplar ``j``'s normalised position / orientation, add Gaussian kernel noise whose bandwidth is
   Scott's rule over the class) and match their brightness/contrast to the target surface.

Conventions: images are ``uint8`` HxWx3 RGB, masks are ``bool`` HxW (True = defect), all randomness
comes from an explicit ``numpy.random.Generator`` (same seed -> identical output) and bad input raises
:class:`synth.core.errors.InputError`. Every blend mode changes pixels only within ``feather`` pixels
(square neighbourhood) of the returned mask, so the label covers every altered pixel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import cv2
import numpy as np
from scipy import ndimage

from synth.core.errors import InputError
from synth.generators import GeneratedDefect

__all__ = [
    "BlendMode",
    "CloneMode",
    "DefectExemplar",
    "DeformParams",
    "Deformation",
    "ForegroundKind",
    "MaskGuidedPlacer",
    "OrientationMode",
    "PlacementError",
    "PositionMode",
    "blend",
    "deform_exemplar",
    "deform_mask",
    "deform_mask_and_patch",
    "estimate_background",
    "estimate_foreground",
    "fit_to_shape",
    "place_mask",
    "principal_axis_angle",
    "resolve_foreground_kind",
]

BlendMode = Literal["alpha", "poisson", "texture"]
CloneMode = Literal["normal", "mixed"]
ForegroundKind = Literal["auto", "object", "texture"]
Polarity = Literal["dark", "bright", "random"]
PositionMode = Literal["uniform", "exemplar"]
OrientationMode = Literal["random", "exemplar"]

_BLEND_MODES: tuple[str, ...] = ("alpha", "poisson", "texture")
_CLONE_FLAGS = {"normal": cv2.NORMAL_CLONE, "mixed": cv2.MIXED_CLONE}
_FOREGROUND_KINDS: tuple[str, ...] = ("auto", "object", "texture")

# cv2.seamlessClone erodes the clone mask by 3 px (3x3 kernel, 3 iterations) before taking source
# gradients. Dilating the defect mask by 4 px first keeps the defect's border contrast against its *own*
# background in the guidance field; without it thin defects (cracks) vanish entirely.
_CLONE_DILATION = 4
# Work size for the foreground estimate: object/background separation needs no more resolution and
# keeps the estimate a few milliseconds on large images.
_FOREGROUND_WORK_SIDE = 256


class PlacementError(InputError):
    """No position puts enough of the defect mask on the foreground; callers may catch and retry."""


# --------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------


def _check_image(image: Any, name: str) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = (
            f"{image.dtype} array of shape {image.shape}"
            if isinstance(image, np.ndarray)
            else type(image).__name__
        )
        raise InputError(f"{name} must be a uint8 HxWx3 RGB array, got {got}; convert it before calling")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"{name} is empty (shape {image.shape}); pass an image with at least one pixel")
    return image


def _check_mask(mask: Any, name: str, *, allow_empty: bool = False) -> np.ndarray:
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.ndim != 2:
        got = (
            f"{mask.dtype} array of shape {mask.shape}"
            if isinstance(mask, np.ndarray)
            else type(mask).__name__
        )
        raise InputError(
            f"{name} must be a bool HxW array (True = defect), got {got}; convert with `mask > 0`"
        )
    if not allow_empty and not mask.any():
        raise InputError(f"{name} is empty (no True pixel); pass a mask that marks at least one defect pixel")
    return mask


def _check_range(
    value: Any, name: str, *, low: float | None = None, positive: bool = False
) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a (min, max) pair of numbers, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise InputError(f"{name} must be a finite (min, max) pair with min <= max, got {value!r}")
    if positive and lo <= 0:
        raise InputError(f"{name} must be positive, got {value!r}; use e.g. (0.7, 1.3)")
    if low is not None and lo < low:
        raise InputError(f"{name} must be >= {low}, got {value!r}")
    return lo, hi


def _check_rng(rng: Any) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise InputError(
            f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}"
        )
    return rng


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight bounding box (y0, y1, x0, x1) with exclusive ends; the mask must be non-empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _square(radius: int) -> np.ndarray:
    return np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilate a bool mask with a (2r+1)x(2r+1) square, i.e. Chebyshev distance <= radius."""
    if radius <= 0:
        return mask.copy()
    return cv2.dilate(mask.astype(np.uint8), _square(radius)).astype(bool)


def _crop_padded(array: np.ndarray, y0: int, y1: int, x0: int, x1: int, *, reflect: bool) -> np.ndarray:
    """``array[y0:y1, x0:x1]`` where the window may leave the array (mask: zeros, image: reflection)."""
    h, w = array.shape[:2]
    pads = (max(0, -y0), max(0, y1 - h), max(0, -x0), max(0, x1 - w))
    crop = array[max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)]
    if not any(pads):
        return crop.copy()
    border = cv2.BORDER_REFLECT_101 if reflect and min(crop.shape[:2]) > 1 else cv2.BORDER_CONSTANT
    if crop.dtype == np.bool_:
        return cv2.copyMakeBorder(crop.astype(np.uint8), *pads, cv2.BORDER_CONSTANT, value=0).astype(bool)
    return cv2.copyMakeBorder(crop, *pads, border).reshape((y1 - y0, x1 - x0) + array.shape[2:])


# --------------------------------------------------------------------------------------------------
# 1. deformation
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeformParams:
    """The random draws of one deformation (angles in degrees; flips applied before rotation)."""

    scale: float = 1.0
    rotation: float = 0.0
    flip_h: bool = False
    flip_v: bool = False
    elastic: bool = False
    fallback: bool = False  # True when every draw emptied the mask and the undeformed crop was used

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy (plain Python floats and bools)."""
        return {
            "scale": float(self.scale),
            "rotation": float(self.rotation),
            "flip_h": bool(self.flip_h),
            "flip_v": bool(self.flip_v),
            "elastic": bool(self.elastic),
            "deform_fallback": bool(self.fallback),
        }


class Deformation(NamedTuple):
    """Result of :func:`deform_exemplar`.

    ``mask`` is the deformed mask cropped to its bounding box plus ``context`` False pixels on every
    side; ``patches`` are the input layers warped identically and cropped to the same window.
    """

    mask: np.ndarray
    patches: tuple[np.ndarray, ...]
    params: DeformParams


def _warp(
    region_mask: np.ndarray,
    patches: Sequence[np.ndarray],
    params: DeformParams,
    rng: np.random.Generator,
    *,
    elastic_alpha: float,
    elastic_sigma: float,
    context: int,
) -> tuple[np.ndarray, tuple[np.ndarray, ...]] | None:
    """Warp a mask region (and aligned patches); ``None`` when the warped mask is empty."""
    by0, by1, bx0, bx1 = _bbox(region_mask)
    th, tw = by1 - by0, bx1 - bx0
    # Rotate about the centre of the tight box so context margins don't shift the defect.
    cy, cx = by0 + (th - 1) / 2.0, bx0 + (tw - 1) / 2.0
    theta = math.radians(params.rotation)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    flips = np.diag([-1.0 if params.flip_h else 1.0, -1.0 if params.flip_v else 1.0])
    linear = params.scale * rot @ flips
    corners = np.array([[-tw / 2, -th / 2], [tw / 2, -th / 2], [tw / 2, th / 2], [-tw / 2, th / 2]])
    ext = np.abs(corners @ linear.T).max(axis=0)  # half extents (x, y) of the warped box
    size_ref = params.scale * max(th, tw)
    disp_px = elastic_alpha * size_ref if params.elastic else 0.0
    pad = int(math.ceil(disp_px)) + context + 2
    out_w = int(math.ceil(2 * ext[0] - 1e-9)) + 2 * pad
    out_h = int(math.ceil(2 * ext[1] - 1e-9)) + 2 * pad
    ys, xs = np.mgrid[0:out_h, 0:out_w].astype(np.float32)
    if params.elastic and disp_px > 0:
        # Classic smooth random field: blurred uniform noise, normalised so elastic_alpha is the peak
        # displacement (a fraction of the defect size) whatever the blur strength.
        sigma = max(1.0, elastic_sigma * size_ref)
        noise = rng.uniform(-1.0, 1.0, size=(2, out_h, out_w)).astype(np.float32)
        dx = cv2.GaussianBlur(noise[0], (0, 0), sigma)
        dy = cv2.GaussianBlur(noise[1], (0, 0), sigma)
        peak = float(max(np.abs(dx).max(), np.abs(dy).max()))
        if peak > 0:
            xs += dx * (disp_px / peak)
            ys += dy * (disp_px / peak)
    inv = np.linalg.inv(linear)
    u, v = xs - (out_w - 1) / 2.0, ys - (out_h - 1) / 2.0
    map_x = (inv[0, 0] * u + inv[0, 1] * v + cx).astype(np.float32)
    map_y = (inv[1, 0] * u + inv[1, 1] * v + cy).astype(np.float32)
    warped = cv2.remap(
        region_mask.astype(np.float32),
        map_x,
        map_y,
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    out_mask = warped >= 0.5  # 0.5 keeps the area of the warped shape unbiased
    if not out_mask.any():
        return None
    y0, y1, x0, x1 = _bbox(out_mask)
    win = (y0 - context, y1 + context, x0 - context, x1 + context)
    out_patches = []
    for patch in patches:
        # Reflect at the region edge: context beyond the source image has to come from somewhere, and a
        # mirrored surface is a better background estimate than black.
        warped_patch = cv2.remap(patch, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        out_patches.append(
            _crop_padded(warped_patch.reshape(out_mask.shape + patch.shape[2:]), *win, reflect=True)
        )
    return _crop_padded(out_mask, *win, reflect=False), tuple(out_patches)


def deform_exemplar(
    mask: np.ndarray,
    rng: np.random.Generator,
    *,
    patches: Sequence[np.ndarray] = (),
    scale: tuple[float, float] = (0.7, 1.3),
    rotation: tuple[float, float] = (-180.0, 180.0),
    flip: bool = True,
    elastic_alpha: float = 0.06,
    elastic_sigma: float = 0.12,
    p_elastic: float = 0.5,
    context: int = 0,
    max_tries: int = 10,
) -> Deformation:
    """Randomly deform a defect mask and warp aligned layers (defect image, background) identically.

    Args:
        mask: bool HxW mask with at least one True pixel (e.g. a full-size real defect mask).
        rng: the only source of randomness; the same seed gives the same result.
        patches: arrays with the same HxW as ``mask`` (uint8/float32, any channel count), e.g. the
            defect image; each gets exactly the mask's warp. Default: none.
        scale: (min, max) uniform scale factor. Default ``(0.7, 1.3)``.
        rotation: (min, max) uniform rotation in degrees. Default ``(-180, 180)``.
        flip: draw independent horizontal/vertical flips with probability 0.5 each. Default True.
        elastic_alpha: peak elastic displacement as a fraction of the scaled defect size. Default 0.06.
        elastic_sigma: smoothness (Gaussian sigma) of the displacement field as a fraction of the scaled
            defect size; larger = smoother bends. Default 0.12.
        p_elastic: probability of applying the elastic warp. Default 0.5.
        context: False margin (pixels) kept around the tight crop so patches carry the defect's
            surroundings (needed by the poisson/texture blends). Default 0 (tight crop).
        max_tries: draws before falling back to the undeformed crop when a deformation empties the mask
            (e.g. a 1-px line shrunk and rotated). Default 10.

    Returns:
        :class:`Deformation` with the non-empty cropped mask, the warped patches and the drawn params.
    """
    _check_mask(mask, "mask")
    _check_rng(rng)
    lo_s, hi_s = _check_range(scale, "scale", positive=True)
    _check_range(rotation, "rotation")
    if not 0.0 <= p_elastic <= 1.0:
        raise InputError(f"p_elastic must be a probability in [0, 1], got {p_elastic}")
    if elastic_alpha < 0 or elastic_sigma <= 0:
        raise InputError(
            f"elastic_alpha must be >= 0 and elastic_sigma > 0, got {elastic_alpha} and {elastic_sigma}"
        )
    if context < 0 or max_tries < 1:
        raise InputError(f"context must be >= 0 and max_tries >= 1, got {context} and {max_tries}")
    for i, patch in enumerate(patches):
        if not isinstance(patch, np.ndarray) or patch.shape[:2] != mask.shape:
            got = patch.shape if isinstance(patch, np.ndarray) else type(patch).__name__
            raise InputError(
                f"patches[{i}] must have the mask's size {mask.shape}, got {got}; crop both alike"
            )

    # Only the bbox plus enough source context for the output window is warped, so large images cost
    # no more than small ones.
    y0, y1, x0, x1 = _bbox(mask)
    size = max(y1 - y0, x1 - x0)
    # Rotating the output window back can reach past the source bbox by up to ~0.21 * size at corners,
    # plus context and elastic displacement (both in output pixels, hence / min scale).
    margin = int(math.ceil(0.25 * size + (context + 2) / lo_s + elastic_alpha * size * hi_s / lo_s)) + 2
    win = (y0 - margin, y1 + margin, x0 - margin, x1 + margin)
    region = _crop_padded(mask, *win, reflect=False)
    region_patches = [_crop_padded(p, *win, reflect=True) for p in patches]
    warp_kw = {"elastic_alpha": elastic_alpha, "elastic_sigma": elastic_sigma, "context": context}

    for _ in range(max_tries):
        # Draw every scalar on every try, in a fixed order, so the mask-only and mask+patch calls
        # consume the generator identically and give the same mask.
        params = DeformParams(
            scale=float(rng.uniform(*scale)),
            rotation=float(rng.uniform(*rotation)),
            flip_h=bool(rng.random() < 0.5) and flip,
            flip_v=bool(rng.random() < 0.5) and flip,
            elastic=bool(rng.random() < p_elastic),
        )
        out = _warp(region, region_patches, params, rng, **warp_kw)
        if out is not None:
            return Deformation(out[0], out[1], params)
    identity = DeformParams(fallback=True)
    out = _warp(region, region_patches, identity, rng, **warp_kw)
    assert out is not None  # the identity warp samples integer positions, so it reproduces the crop
    return Deformation(out[0], out[1], identity)


def deform_mask(
    mask: np.ndarray,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (0.7, 1.3),
    rotation: tuple[float, float] = (-180.0, 180.0),
    flip: bool = True,
    elastic_alpha: float = 0.06,
    elastic_sigma: float = 0.12,
    p_elastic: float = 0.5,
) -> np.ndarray:
    """Deform a defect mask; returns a non-empty bool mask tightly cropped to its bounding box.

    Parameters and defaults are those of :func:`deform_exemplar` (scale ``(0.7, 1.3)``, rotation
    ``(-180, 180)``, flip True, elastic_alpha 0.06, elastic_sigma 0.12, p_elastic 0.5).
    """
    return deform_exemplar(
        mask,
        rng,
        scale=scale,
        rotation=rotation,
        flip=flip,
        elastic_alpha=elastic_alpha,
        elastic_sigma=elastic_sigma,
        p_elastic=p_elastic,
    ).mask


def deform_mask_and_patch(
    mask: np.ndarray,
    patch: np.ndarray,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float] = (0.7, 1.3),
    rotation: tuple[float, float] = (-180.0, 180.0),
    flip: bool = True,
    elastic_alpha: float = 0.06,
    elastic_sigma: float = 0.12,
    p_elastic: float = 0.5,
    context: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Deform a mask and its defect image identically; returns ``(mask, patch)`` of equal HxW.

    ``patch`` is the uint8 HxWx3 defect image aligned with ``mask`` (same HxW). With the same seed the
    mask equals :func:`deform_mask`'s. Defaults as in :func:`deform_exemplar` (context 0 = tight crop).
    """
    _check_image(patch, "patch")
    result = deform_exemplar(
        mask,
        rng,
        patches=(patch,),
        scale=scale,
        rotation=rotation,
        flip=flip,
        elastic_alpha=elastic_alpha,
        elastic_sigma=elastic_sigma,
        p_elastic=p_elastic,
        context=context,
    )
    return result.mask, result.patches[0]


# --------------------------------------------------------------------------------------------------
# 2. foreground
# --------------------------------------------------------------------------------------------------


def _border_distance(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lab colour distance of every (downscaled, blurred) pixel from the median border colour."""
    h, w = image.shape[:2]
    factor = _FOREGROUND_WORK_SIDE / max(h, w)
    small = image
    if factor < 1:
        small = cv2.resize(
            image, (max(1, round(w * factor)), max(1, round(h * factor))), interpolation=cv2.INTER_AREA
        )
    # Blur first so single-pixel noise and fine texture don't count as "different from the border".
    lab = cv2.cvtColor(cv2.GaussianBlur(small, (5, 5), 0), cv2.COLOR_RGB2LAB).astype(np.float32)
    sh, sw = lab.shape[:2]
    width = max(1, round(0.03 * min(sh, sw)))
    ring = np.zeros((sh, sw), bool)
    ring[:width], ring[-width:], ring[:, :width], ring[:, -width:] = True, True, True, True
    reference = np.median(lab[ring], axis=0)
    # The Euclidean norm over the 3 channels in OpenCV: one pass each, ~10x numpy's norm on a 256 px copy (this
    # runs once per generated sample).
    diff = cv2.subtract(lab, (*map(float, reference), 0.0))
    squared = cv2.multiply(diff, diff)
    return cv2.sqrt(cv2.transform(squared, np.ones((1, 3), np.float32))).reshape(sh, sw), ring


def resolve_foreground_kind(image: np.ndarray) -> Literal["object", "texture"]:
    """Decide whether ``image`` shows an object on a uniform background or a texture.

    Heuristic: measure every pixel's Lab distance from the median border colour (after a 5x5 blur, on a
    <= 256 px copy). The image is an *object* when the border is uniform relative to the centre: the
    median distance in the central half-size box exceeds both twice the 90th percentile of the border
    ring's distances and 12 (a clearly visible Lab difference). Otherwise (textures, cluttered or
    frame-filling scenes) it is a *texture* and the whole image is foreground.
    """
    _check_image(image, "image")
    dist, ring = _border_distance(image)
    h, w = dist.shape
    centre = dist[h // 4 : max(h // 4 + 1, 3 * h // 4), w // 4 : max(w // 4 + 1, 3 * w // 4)]
    border_spread = float(np.percentile(dist[ring], 90))
    return "object" if float(np.median(centre)) > max(2.0 * border_spread, 12.0) else "texture"


def estimate_foreground(image: np.ndarray, *, kind: ForegroundKind = "auto") -> np.ndarray:
    """Estimate where defects may be placed; never returns an empty mask.

    Args:
        image: uint8 HxWx3 RGB normal image.
        kind: ``"texture"`` -> the whole image; ``"object"`` -> the object that differs from the border
            colour (Lab distance from the median border colour, thresholded by Otsu capped at 3x the
            border's 90th-percentile distance, then opening/closing,
            largest connected component, holes filled); ``"auto"`` (default) picks one with
            :func:`resolve_foreground_kind`. An object estimate that comes out empty falls back to the
            whole image.

    Returns:
        bool HxW mask (True = foreground).
    """
    _check_image(image, "image")
    if kind not in _FOREGROUND_KINDS:
        raise InputError(f"foreground kind must be one of {_FOREGROUND_KINDS}, got {kind!r}")
    h, w = image.shape[:2]
    whole = np.ones((h, w), bool)
    if kind == "auto":
        kind = resolve_foreground_kind(image)
    if kind == "texture":
        return whole
    dist, ring = _border_distance(image)
    peak = float(dist.max())
    if peak < 8.0:  # nothing differs visibly from the border: there is no object to find
        return whole
    scaled = np.clip(dist * (255.0 / peak), 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(scaled, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # Otsu alone splits a multi-coloured object (e.g. foam vs cup) when that gap beats the object/background
    # one; a uniform border lets us cap the threshold just above the background's own spread. The
    # absolute floor of 8 stops pure sensor noise on a nearly uniform image from becoming foreground.
    background_level = max(8.0, 3.0 * float(np.percentile(dist[ring], 90)))
    fg = dist > max(min(otsu * peak / 255.0, background_level), 8.0)
    sh, sw = fg.shape
    fg = cv2.morphologyEx(
        fg.astype(np.uint8), cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    )
    k = max(3, int(0.02 * min(sh, sw)) | 1)
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if count <= 1:
        return whole
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    fg = ndimage.binary_fill_holes(labels == largest)
    if fg.shape != (h, w):
        fg = cv2.resize(fg.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    return fg if fg.any() else whole


# --------------------------------------------------------------------------------------------------
# 3. placement
# --------------------------------------------------------------------------------------------------


def _target_hw(target_shape: Sequence[int]) -> tuple[int, int]:
    try:
        h, w = int(target_shape[0]), int(target_shape[1])
    except (TypeError, ValueError, IndexError):
        raise InputError(f"target_shape must be (H, W) or (H, W, C), got {target_shape!r}") from None
    if h < 1 or w < 1:
        raise InputError(f"target_shape must be positive, got {target_shape!r}")
    return h, w


def fit_to_shape(
    mask: np.ndarray,
    target_shape: Sequence[int],
    *,
    patches: Sequence[np.ndarray] = (),
    context: int = 0,
) -> tuple[np.ndarray, tuple[np.ndarray, ...], float]:
    """Shrink a cropped mask (and aligned patches) so its tight part fits into ``target_shape``.

    Args:
        mask: bool crop whose defect's tight box is surrounded by ``context`` False pixels.
        target_shape: (H, W) or (H, W, C) of the image the defect goes on.
        patches: layers aligned with ``mask``, resized identically. Default none.
        context: margin around the tight box, kept in the output. Default 0.

    Returns:
        ``(mask, patches, factor)``; unchanged inputs and factor 1.0 when the defect already fits.
    """
    _check_mask(mask, "mask")
    th_img, tw_img = _target_hw(target_shape)
    y0, y1, x0, x1 = _bbox(mask)
    h, w = y1 - y0, x1 - x0
    if h <= th_img and w <= tw_img:
        return mask, tuple(patches), 1.0
    factor = min(th_img / h, tw_img / w)
    size = (max(1, int(mask.shape[1] * factor)), max(1, int(mask.shape[0] * factor)))
    soft = cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    small = soft >= 0.5
    if not small.any():  # thin structures can vanish under area averaging; keep every touched pixel
        small = soft > 0
    resized = [
        cv2.resize(p, size, interpolation=cv2.INTER_AREA).reshape(small.shape + p.shape[2:]) for p in patches
    ]
    y0, y1, x0, x1 = _bbox(small)
    # Rounding can leave the tight part one pixel too large; trim it (never empties: h,w >= 1).
    y1, x1 = min(y1, y0 + th_img), min(x1, x0 + tw_img)
    win = (y0 - context, y1 + context, x0 - context, x1 + context)
    out_mask = _crop_padded(small, *win, reflect=False)
    if context:
        out_mask[:context], out_mask[-context:], out_mask[:, :context], out_mask[:, -context:] = (False,) * 4
    return out_mask, tuple(_crop_padded(p, *win, reflect=True) for p in resized), factor


def place_mask(
    mask_crop: np.ndarray,
    target_shape: Sequence[int],
    foreground: np.ndarray,
    rng: np.random.Generator,
    *,
    max_tries: int = 50,
    min_inside: float = 0.95,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Place a cropped defect mask on an image so that it lies (mostly) on the foreground.

    Positions are uniform over all valid positions: up to ``max_tries`` uniform random probes
    (rejection sampling, cheap for large foregrounds), then an exact search over every position with
    ``cv2.matchTemplate`` when the probes all missed (small foregrounds).

    Args:
        mask_crop: non-empty bool crop of the defect (e.g. from :func:`deform_mask`). A crop larger
            than the target is shrunk to fit (see :func:`fit_to_shape`; shrink patches yourself first).
        target_shape: (H, W) or (H, W, C) of the normal image.
        foreground: bool HxW mask of allowed pixels (e.g. from :func:`estimate_foreground`).
        rng: the only source of randomness.
        max_tries: random probes before the exhaustive search. Default 50.
        min_inside: minimum fraction of the defect's pixels that must land on the foreground. Default 0.95.

    Returns:
        ``(full_mask, (top, left))``: the bool HxW placed mask and the crop's top-left corner.

    Raises:
        PlacementError: no position reaches ``min_inside`` (an :class:`InputError`; callers can catch
            it and retry with another deformation, or lower ``min_inside``).
    """
    _check_mask(mask_crop, "mask_crop")
    _check_rng(rng)
    h_img, w_img = _target_hw(target_shape)
    _check_mask(foreground, "foreground", allow_empty=True)
    if foreground.shape != (h_img, w_img):
        raise InputError(
            f"foreground is {foreground.shape} but target_shape is {(h_img, w_img)}; "
            "estimate the foreground on the target image"
        )
    if not 0.0 <= min_inside <= 1.0:
        raise InputError(f"min_inside must be a fraction in [0, 1], got {min_inside}")
    if max_tries < 0:
        raise InputError(f"max_tries must be >= 0, got {max_tries}")
    y0, y1, x0, x1 = _bbox(mask_crop)
    crop = mask_crop[y0:y1, x0:x1]
    crop, _, _ = fit_to_shape(crop, (h_img, w_img))
    h, w = crop.shape
    area = int(crop.sum())
    need = min_inside * area - 1e-6

    def placed(top: int, left: int) -> np.ndarray:
        full = np.zeros((h_img, w_img), bool)
        full[top : top + h, left : left + w] = crop
        return full

    def inside(top: int, left: int) -> int:
        return int(np.count_nonzero(foreground[top : top + h, left : left + w] & crop))

    for _ in range(max_tries):
        top, left = int(rng.integers(0, h_img - h + 1)), int(rng.integers(0, w_img - w + 1))
        if inside(top, left) >= need:
            return placed(top, left), (top, left)

    # Correlation of the foreground with the mask = inside-count for every top-left at once.
    scores = cv2.matchTemplate(foreground.astype(np.float32), crop.astype(np.float32), cv2.TM_CCORR)
    candidates = np.argwhere(scores >= need - 0.5)  # 0.5 absorbs float rounding; verified exactly below
    for idx in rng.permutation(len(candidates)):
        top, left = (int(v) for v in candidates[idx])
        if inside(top, left) >= need:
            return placed(top, left), (top, left)
    best = float(scores.max()) / area if scores.size else 0.0
    raise PlacementError(
        f"no position puts >= {min_inside:.0%} of the {area}-pixel defect ({h}x{w}) on the foreground "
        f"(best {best:.0%}); use a smaller scale, lower min_inside, or foreground kind 'texture'"
    )


# --------------------------------------------------------------------------------------------------
# 4. blending
# --------------------------------------------------------------------------------------------------


def estimate_background(image: np.ndarray, mask: np.ndarray, *, radius: int = 5) -> np.ndarray:
    """Estimate the defect-free surface under ``mask`` (uint8, same shape as ``image``).

    The mask dilated by 2 px is inpainted (Telea) from the surrounding pixels and the filled part is
    smoothed (sigma 2) so boundary texture doesn't streak into it; pixels outside stay identical, so
    ``image - background`` is exactly zero away from the defect. If nothing outside the mask is
    visible, the per-channel median is used (the defect's sign relative to its surroundings is then
    unknown). ``radius`` (default 5) is the inpainting neighbourhood.
    """
    _check_image(image, "image")
    _check_mask(mask, "mask", allow_empty=True)
    if mask.shape != image.shape[:2]:
        raise InputError(f"mask is {mask.shape} but image is {image.shape[:2]}; pass aligned arrays")
    hole = _dilate(mask, 2)
    if not hole.any():
        return image.copy()
    if hole.all():
        return np.broadcast_to(np.median(image.reshape(-1, 3), axis=0).astype(np.uint8), image.shape).copy()
    filled = cv2.inpaint(image, hole.astype(np.uint8), radius, cv2.INPAINT_TELEA)
    smooth = cv2.GaussianBlur(filled, (0, 0), 2.0)
    return np.where(hole[..., None], smooth, image)


def _feather_alpha(mask: np.ndarray, feather: int) -> np.ndarray:
    """Alpha = 1 on the mask, fading to exactly 0 beyond ``feather`` px (square neighbourhood)."""
    grow, blur = (feather + 1) // 2, feather // 2
    # Grow then blur by a kernel of radius `blur`: the support is the mask dilated by grow + blur = feather,
    # and every mask pixel keeps alpha 1 because its whole blur window lies inside the grown mask.
    alpha = _dilate(mask, grow).astype(np.float32)
    if blur:
        alpha = cv2.GaussianBlur(alpha, (2 * blur + 1, 2 * blur + 1), 0)
    alpha[mask] = 1.0
    return alpha


def _patch_overlap(
    patch_hw: tuple[int, int], offset: tuple[int, int], image_hw: tuple[int, int]
) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """Slices (image, patch) of a patch placed with its top-left at ``offset`` (may be negative)."""
    top, left = offset
    y0, x0 = max(0, top), max(0, left)
    y1, x1 = min(image_hw[0], top + patch_hw[0]), min(image_hw[1], left + patch_hw[1])
    if y0 >= y1 or x0 >= x1:
        return None
    return (slice(y0, y1), slice(x0, x1)), (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))


def _composite(normal: np.ndarray, layer: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    out = normal.astype(np.float32) + alpha[..., None] * (layer.astype(np.float32) - normal)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    # Exact copy where alpha is 0 so "unchanged outside the feathered mask" holds to the byte.
    return np.where(alpha[..., None] > 0, out, normal)


def blend(
    normal: np.ndarray,
    full_mask: np.ndarray,
    *,
    mode: BlendMode = "alpha",
    rng: np.random.Generator,
    source_patch: np.ndarray | None = None,
    source_background: np.ndarray | None = None,
    patch_offset: tuple[int, int] | None = None,
    feather: int = 3,
    clone_mode: CloneMode = "normal",
    alpha_strength: tuple[float, float] = (0.3, 0.6),
    alpha_polarity: Polarity = "random",
    texture_gain: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Render a defect into ``normal`` at ``full_mask``; returns ``(image, mask)``.

    Every mode changes only pixels within ``feather`` px (square neighbourhood) of ``full_mask``; the
    returned mask is ``full_mask`` (the defect region).

    Args:
        normal: uint8 HxWx3 RGB defect-free image.
        full_mask: bool HxW defect region (non-empty).
        mode: ``"alpha"`` (default): paint with a feathered alpha: the pasted ``source_patch`` when given,
            otherwise a darkened/brightened copy of the surface (its own texture kept) with smooth random
            strength variation. ``"poisson"``: ``cv2.seamlessClone`` of ``source_patch``; images are
            padded so masks touching the border work, and the clone is composited back over the feathered
            mask because the Poisson solve otherwise alters the whole bounding box slightly.
            ``"texture"``: adds the real defect's deviation from its own background
            (``source_patch - source_background``) to the normal pixels.
        rng: the only source of randomness (used by ``alpha`` without a patch).
        source_patch: uint8 hxwx3 real defect image aligned with the mask (e.g. from
            :func:`deform_mask_and_patch`); required by ``poisson`` and ``texture``. Include a few px of
            context (``context=`` >= 5) so those modes see the defect's own surroundings. Default None.
        source_background: uint8 hxwx3 defect-free estimate of ``source_patch`` for ``texture``; default
            None = :func:`estimate_background` on the patch.
        patch_offset: (top, left) of ``source_patch`` in ``normal`` (may be negative); default None means
            the patch has ``normal``'s size.
        feather: fade width in px outside the mask. Default 3.
        clone_mode: ``"normal"`` (default) or ``"mixed"`` (keeps the stronger of source/target gradients).
        alpha_strength: (min, max) darken/brighten fraction for synthetic alpha paint. Default (0.3, 0.6).
        alpha_polarity: ``"dark"``, ``"bright"`` or ``"random"`` (default) for synthetic alpha paint.
        texture_gain: multiplier on the transferred deviation. Default 1.0.
    """
    _check_image(normal, "normal")
    _check_mask(full_mask, "full_mask")
    _check_rng(rng)
    if full_mask.shape != normal.shape[:2]:
        raise InputError(
            f"full_mask is {full_mask.shape} but normal is {normal.shape[:2]}; place the mask on this image"
        )
    if mode not in _BLEND_MODES:
        raise InputError(f"blend mode must be one of {_BLEND_MODES}, got {mode!r}")
    if clone_mode not in _CLONE_FLAGS:
        raise InputError(f"clone_mode must be 'normal' or 'mixed', got {clone_mode!r}")
    if feather < 0:
        raise InputError(f"feather must be >= 0 pixels, got {feather}")
    if mode in ("poisson", "texture") and source_patch is None:
        raise InputError(
            f"blend mode {mode!r} needs the real defect image patch (source_patch); provide the defect "
            "images (`--defects DIR`) or use mode 'alpha'"
        )
    hw = normal.shape[:2]
    offset = (0, 0) if patch_offset is None else (int(patch_offset[0]), int(patch_offset[1]))
    if source_patch is not None:
        _check_image(source_patch, "source_patch")
        if patch_offset is None and source_patch.shape[:2] != hw:
            raise InputError(
                f"source_patch is {source_patch.shape[:2]} but normal is {hw}; pass patch_offset=(top, left)"
            )
        overlap = _patch_overlap(source_patch.shape[:2], offset, hw)
        covered = np.zeros(hw, bool)
        if overlap is not None:
            covered[overlap[0]] = True
        if (full_mask & ~covered).any():
            raise InputError(
                "source_patch does not cover full_mask at patch_offset; place the patch over the mask"
            )
    # Every mode changes only pixels near the mask, so the work is done on a window around it (a few px more
    # than the feather, and the Poisson solve's own padding): the bytes are those of the whole-image
    # computation (filters and the solve see the same neighbourhood), at a fraction of the cost on large photos.
    margin = feather + 2 + (2 * _CLONE_DILATION + 4 if mode == "poisson" else 0)
    y0, y1, x0, x1 = _bbox(full_mask)
    y0, x0 = max(0, y0 - margin), max(0, x0 - margin)
    y1, x1 = min(hw[0], y1 + margin), min(hw[1], x1 + margin)
    window = _blend_window(
        normal[y0:y1, x0:x1], full_mask[y0:y1, x0:x1], mode=mode, rng=rng, source_patch=source_patch,
        source_background=source_background, offset=(offset[0] - y0, offset[1] - x0), feather=feather,
        clone_flag=_CLONE_FLAGS[clone_mode], alpha_strength=alpha_strength, alpha_polarity=alpha_polarity,
        texture_gain=texture_gain,
    )
    image = normal.copy()
    image[y0:y1, x0:x1] = window
    return image, full_mask.copy()


def _blend_window(
    normal: np.ndarray,
    full_mask: np.ndarray,
    *,
    mode: BlendMode,
    rng: np.random.Generator,
    source_patch: np.ndarray | None,
    source_background: np.ndarray | None,
    offset: tuple[int, int],
    feather: int,
    clone_flag: int,
    alpha_strength: tuple[float, float],
    alpha_polarity: Polarity,
    texture_gain: float,
) -> np.ndarray:
    """:func:`blend` on a validated window holding the mask with its margin; ``offset`` is the patch's top-left
    in the window's coordinates."""
    hw = normal.shape[:2]
    overlap = None if source_patch is None else _patch_overlap(source_patch.shape[:2], offset, hw)
    alpha = _feather_alpha(full_mask, feather)

    if mode == "alpha":
        if source_patch is not None and overlap is not None:
            layer = normal.copy()
            layer[overlap[0]] = source_patch[overlap[1]]
        else:
            layer = _synthetic_paint(normal, full_mask, feather, rng, alpha_strength, alpha_polarity)
    elif mode == "texture":
        assert source_patch is not None and overlap is not None
        patch_mask = np.zeros(source_patch.shape[:2], bool)
        patch_mask[overlap[1]] = full_mask[overlap[0]]
        if source_background is None:
            source_background = estimate_background(source_patch, patch_mask)
        elif not isinstance(source_background, np.ndarray) or source_background.shape != source_patch.shape:
            got = getattr(source_background, "shape", type(source_background).__name__)
            raise InputError(
                f"source_background must match source_patch's shape {source_patch.shape}, got {got}"
            )
        deviation = np.zeros(normal.shape, np.float32)
        deviation[overlap[0]] = source_patch[overlap[1]].astype(np.float32) - source_background[overlap[1]]
        layer = np.clip(normal.astype(np.float32) + texture_gain * deviation, 0, 255)
    else:
        assert source_patch is not None and overlap is not None
        layer = _poisson_clone(normal, full_mask, source_patch, overlap, clone_flag)
    return _composite(normal, layer, alpha)


def _synthetic_paint(
    normal: np.ndarray,
    mask: np.ndarray,
    feather: int,
    rng: np.random.Generator,
    strength: tuple[float, float],
    polarity: str,
) -> np.ndarray:
    lo, hi = _check_range(strength, "alpha_strength", low=0.0)
    if hi > 1.0:
        raise InputError(f"alpha_strength must lie in [0, 1], got {strength!r}")
    if polarity not in ("dark", "bright", "random"):
        raise InputError(f"alpha_polarity must be 'dark', 'bright' or 'random', got {polarity!r}")
    dark = polarity == "dark" or (polarity == "random" and bool(rng.random() < 0.5))
    level = float(rng.uniform(lo, hi))
    y0, y1, x0, x1 = _bbox(_dilate(mask, feather))
    # Smooth +-35% strength variation so the painted defect isn't a flat stamp.
    noise = rng.uniform(-1.0, 1.0, size=(y1 - y0, x1 - x0)).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), max(1.0, 0.1 * max(y1 - y0, x1 - x0)))
    noise /= max(float(np.abs(noise).max()), 1e-6)
    amount = np.zeros(mask.shape, np.float32)
    amount[y0:y1, x0:x1] = np.clip(level * (1.0 + 0.35 * noise), 0.0, 1.0)
    surface = normal.astype(np.float32)
    # Multiplicative darkening / screen-like brightening keeps the surface's own texture in the defect.
    return surface * (1.0 - amount[..., None]) if dark else surface + (255.0 - surface) * amount[..., None]


def _poisson_clone(
    normal: np.ndarray,
    mask: np.ndarray,
    patch: np.ndarray,
    overlap: tuple[tuple[slice, slice], tuple[slice, slice]],
    flag: int,
) -> np.ndarray:
    source = normal.copy()
    source[overlap[0]] = patch[overlap[1]]
    clone_mask = _dilate(mask, _CLONE_DILATION).astype(np.uint8) * 255
    # seamlessClone zeroes the mask's outer pixel ring and needs the clone region inside the image, so
    # pad everything; reflected padding gives the solver a plausible boundary.
    pad = _CLONE_DILATION + 2
    src_p = cv2.copyMakeBorder(source, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
    dst_p = cv2.copyMakeBorder(normal, pad, pad, pad, pad, cv2.BORDER_REFLECT_101)
    mask_p = cv2.copyMakeBorder(clone_mask, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    x, y, w, h = cv2.boundingRect(mask_p)
    # OpenCV centres the mask's bounding box at `p` with top-left p - (w//2, h//2); this p keeps it in place.
    # It also edits the mask argument in place, hence the copy.
    cloned = cv2.seamlessClone(src_p, dst_p, mask_p.copy(), (x + w // 2, y + h // 2), flag)
    return cloned[pad:-pad, pad:-pad]


# --------------------------------------------------------------------------------------------------
# 5. high-level placer
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # arrays make field-wise == ambiguous
class DefectExemplar:
    """One real defect: its mask, optionally the image it came from, its class and where it came from.

    ``mask`` is bool HxW; ``image`` is uint8 HxWx3 of the same HxW or None (masks only: alpha blending);
    ``source`` (a file name) is quoted in error messages.
    """

    mask: np.ndarray
    image: np.ndarray | None = None
    defect_class: str = "defect"
    source: str = "<memory>"


# Exemplar statistics for position="exemplar" / orientation="exemplar". Both are a smoothed bootstrap:
# pick exemplar j, copy its statistic, add Gaussian kernel noise with the class's Scott's-rule bandwidth, i.e.
# draw from the kernel density estimate of the class's few real exemplars.
_SIDES = ("top", "bottom", "left", "right")
_MIRROR = {"top": "bottom", "bottom": "top", "left": "right", "right": "left"}
# harmonize: the "placed mask dilated by a few px" whose mean brightness is compared (2 px = the band that
# estimate_background inpaints, so source and target means cover the same surface), and the outer radius of
# the ring whose spread is compared. On a coarse texture (skimage gravel, same surface twice as bright) a
# 4-px ring gives contrast factors of 0.97-1.39 (10-90 %) instead of 1; 12 px gives 0.84-1.13 around 1.0
# and still fits the >= 16-px margin of the prepared exemplar crop.
_HARMONIZE_CORE = 2
_HARMONIZE_RING = 12
_GAIN_LIMITS = (0.25, 4.0)
# Below these (grey levels) a surface is flat or black: a std/mean ratio of it is noise, not contrast.
_MIN_STD, _MIN_MEAN = 0.5, 1.0


def principal_axis_angle(mask: np.ndarray) -> float:
    """Angle of a mask's principal axis in degrees, in [0, 180).

    From the second central moments of the True pixels, ``0.5 * atan2(2 mu11, mu20 - mu02)`` with x to the
    right and y downwards: 0 = horizontal, 90 = vertical, 45 = running right-down. Axial (an axis has no
    head), so 0 and 180 are the same; a round mask has no defined axis and gives an arbitrary angle.
    """
    _check_mask(mask, "mask")
    ys, xs = np.nonzero(mask)
    dx, dy = xs - xs.mean(), ys - ys.mean()
    mu20, mu02, mu11 = float((dx * dx).mean()), float((dy * dy).mean()), float((dx * dy).mean())
    return math.degrees(0.5 * math.atan2(2.0 * mu11, mu20 - mu02)) % 180.0


def _scott_std(values: np.ndarray, dims: int) -> float:
    """Scott's-rule bandwidth ``sample std * n^(-1/(d+4))`` of n values; 0 when n < 2."""
    n = len(values)
    if n < 2:
        return 0.0
    return float(np.std(values, ddof=1)) * n ** (-1.0 / (dims + 4))


def _axial_bandwidth(angles: Sequence[float], weights: Sequence[float] | None = None) -> float:
    """Scott's-rule bandwidth (degrees) of axial angles (period 180); 0 when fewer than two.

    Axial data wrap at 180, so the spread is the circular std of the *doubled* angles, halved back:
    ``std = degrees(sqrt(-2 ln R)) / 2`` with R the (weighted) mean resultant length of ``2 * angle``, times
    ``n_eff^(-1/5)`` (Scott, d = 1; ``n_eff = (sum w)^2 / sum w^2``). ``weights`` are the exemplars'
    elongations: a round defect has no axis, so its arbitrary angle must not widen the spread of the elongated
    ones (a class of horizontal bands plus one blob keeps its bands horizontal). All weights 0 (only round
    defects): 180, any rotation. Capped at 180: beyond that the Gaussian rotation is already uniform.
    """
    n = len(angles)
    if n < 2:
        return 0.0
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    if w.sum() <= 1e-12:
        return 180.0
    doubled = np.radians(2.0 * np.asarray(angles, np.float64))
    resultant = float(np.hypot((w * np.cos(doubled)).sum(), (w * np.sin(doubled)).sum()) / w.sum())
    resultant = min(1.0, max(resultant, 1e-12))  # rounding can give 1 + eps; 0 (no axis) would be log(0)
    # max(0.0, .): log(1.0) gives -2 * 0.0 == -0.0, and numpy's normal() refuses a scale of -0.0
    std = math.degrees(math.sqrt(max(0.0, -2.0 * math.log(resultant)))) / 2.0
    n_eff = float(w.sum() ** 2 / (w**2).sum())
    return min(180.0, std * n_eff ** (-1.0 / 5.0))


def elongation(mask: np.ndarray) -> float:
    """1 - (minor / major) second-moment eigenvalue ratio of a mask's pixels: 0 round, -> 1 a thin line."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 2:
        return 0.0
    cov = np.cov(np.stack([xs, ys]).astype(np.float64))
    low, high = np.linalg.eigvalsh(cov)
    return float(1.0 - max(low, 0.0) / high) if high > 0 else 0.0


@dataclass(frozen=True)
class _ExemplarStats:
    centroid: tuple[float, float]  # (cy / H, cx / W) in the source image; pixel i has centre i + 0.5
    extent: tuple[float, float]  # bounding-box (height / H, width / W)
    sides: frozenset[str]  # image sides the mask touches
    angle: float  # principal axis, degrees in [0, 180)
    elongation: float  # 0 round (no meaningful axis) .. 1 line


def _exemplar_stats(mask: np.ndarray) -> _ExemplarStats:
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = _bbox(mask)
    touched = (mask[0].any(), mask[-1].any(), mask[:, 0].any(), mask[:, -1].any())
    return _ExemplarStats(
        # Pixel centres at i + 0.5 make a flip exactly c -> 1 - c and the image centre exactly 0.5.
        centroid=((float(ys.mean()) + 0.5) / h, (float(xs.mean()) + 0.5) / w),
        extent=((y1 - y0) / h, (x1 - x0) / w),
        sides=frozenset(side for side, hit in zip(_SIDES, touched, strict=True) if hit),
        angle=principal_axis_angle(mask),
        elongation=elongation(mask),
    )


def _place_at_target(
    crop: np.ndarray,
    hw: tuple[int, int],
    foreground: np.ndarray,
    target: tuple[float, float],
    sides: frozenset[str],
    min_inside: float,
) -> tuple[np.ndarray, tuple[int, int]] | None:
    """Put ``crop`` (a tight mask) with its centroid at the normalised ``target``, snapped to ``sides``.

    Returns ``None`` when fewer than ``min_inside`` of its pixels land on the foreground.
    """
    h_img, w_img = hw
    h, w = crop.shape
    ys, xs = np.nonzero(crop)
    top = round(target[0] * h_img - 0.5 - float(ys.mean()))
    left = round(target[1] * w_img - 0.5 - float(xs.mean()))
    # A defect can touch only one of two opposite sides unless it spans the image; then the side nearer
    # the target wins.
    for low, high, axis in (("top", "bottom", 0), ("left", "right", 1)):
        touch_low = low in sides and (high not in sides or target[axis] < 0.5)
        touch_high = high in sides and not touch_low
        limit = (h_img - h) if axis == 0 else (w_img - w)
        value = 0 if touch_low else limit if touch_high else (top if axis == 0 else left)
        if axis == 0:
            top = int(min(max(value, 0), h_img - h))
        else:
            left = int(min(max(value, 0), w_img - w))
    area = int(crop.sum())
    inside = int(np.count_nonzero(foreground[top : top + h, left : left + w] & crop))
    if inside < min_inside * area - 1e-6:
        return None
    full = np.zeros(hw, bool)
    full[top : top + h, left : left + w] = crop
    return full, (top, left)


def _gray(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32).mean(axis=2)


class _Surface(NamedTuple):
    """Grey-level statistics of the surface around a defect (see :func:`_surface_stats`)."""

    core_mean: float  # over the mask dilated by 2 px
    ring_mean: float  # over the ring D(mask, 12) - D(mask, 2)
    ring_std: float
    region_mean: tuple[float, float, float]  # per channel over D(mask, 12)


def _surface_stats(image: np.ndarray, mask: np.ndarray) -> _Surface:
    """Statistics of ``image`` (a defect-free surface) under and around ``mask``; grey = channel mean.

    The spread is taken on the ring only: under the mask a background *estimate* is smooth inpainting, whose
    low variance says nothing about the surface.
    """
    gray = _gray(image)
    core, region = _dilate(mask, _HARMONIZE_CORE), _dilate(mask, _HARMONIZE_RING)
    ring = region & ~core
    ring_px = gray[ring] if ring.any() else gray[region]
    mean = image[region].astype(np.float64).mean(axis=0)
    return _Surface(
        float(gray[core].mean()),
        float(ring_px.mean()),
        float(ring_px.std()),
        (float(mean[0]), float(mean[1]), float(mean[2])),
    )


def _texture_gain(target: _Surface, source: _Surface) -> tuple[float, float, float]:
    """``(gain, brightness, contrast)`` for ``harmonize`` with the texture blend; see :class:`MaskGuidedPlacer`."""
    lo, hi = _GAIN_LIMITS
    brightness = float(np.clip(target.core_mean / max(source.core_mean, _MIN_MEAN), lo, hi))
    # Relative contrast (std/mean of the surrounding rings) is measured and recorded but not applied: on striped
    # surfaces it measures the texture, not how deep the defect is, and multiplying it in swung the gain of magnetic
    # tile defects between 0.2 and 2.4 (defects that vanished or burned out); brightness alone is the reflectance
    # model (a hole 45 % darker than its surface stays 45 % darker).
    contrast = 1.0
    if min(target.ring_std, source.ring_std) >= _MIN_STD and min(target.ring_mean, source.ring_mean) >= _MIN_MEAN:
        ratio = (target.ring_std / target.ring_mean) / (source.ring_std / source.ring_mean)
        contrast = float(np.clip(ratio, lo, hi))
    return brightness, brightness, contrast


def _match_patch(patch: np.ndarray, target: _Surface, source: _Surface) -> tuple[np.ndarray, float, list[float]]:
    """``harmonize`` for the alpha blend: ``patch' = gain * patch + shift`` per channel, as uint8; see the class."""
    gain = 1.0
    if min(target.ring_std, source.ring_std) >= _MIN_STD:
        gain = float(np.clip(target.ring_std / source.ring_std, *_GAIN_LIMITS))
    shift = np.asarray(target.region_mean) - gain * np.asarray(source.region_mean)
    matched = np.clip(np.rint(patch.astype(np.float32) * gain + shift.astype(np.float32)), 0, 255)
    return matched.astype(np.uint8), gain, [float(v) for v in shift]


@dataclass(frozen=True)
class _Prepared:
    mask: np.ndarray
    patches: tuple[np.ndarray, ...]  # () or (image crop, background crop)
    surface: _Surface | None = None  # background statistics around the undeformed mask (harmonize)


def _validate_exemplar(ex: Any, index: int) -> None:
    if not isinstance(ex, DefectExemplar):
        raise InputError(f"exemplars[{index}] must be a DefectExemplar, got {type(ex).__name__}")
    where = f"defect exemplar {ex.source!r}"
    mask = ex.mask
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.ndim != 2:
        got = f"{mask.dtype} {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise InputError(f"{where}: mask must be a bool HxW array, got {got}; convert with `mask > 0`")
    if not mask.any():
        raise InputError(f"{where}: mask is empty (all zero); remove this exemplar or fix its mask file")
    if ex.image is not None:
        image = ex.image
        if (
            not isinstance(image, np.ndarray)
            or image.dtype != np.uint8
            or image.ndim != 3
            or image.shape[2] != 3
        ):
            got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise InputError(f"{where}: image must be a uint8 HxWx3 RGB array, got {got}")
        if image.shape[:2] != mask.shape:
            raise InputError(
                f"{where}: mask is {mask.shape[0]}x{mask.shape[1]} but image is "
                f"{image.shape[0]}x{image.shape[1]} (HxW); use the mask drawn on this image"
            )
    if not isinstance(ex.defect_class, str) or not ex.defect_class:
        raise InputError(f"{where}: defect_class must be a non-empty string, got {ex.defect_class!r}")


class MaskGuidedPlacer:
    """Make new labeled defects by deforming real defect masks and placing them on normal images.

    Args:
        exemplars: real defects; validated here (empty masks and mask/image size mismatches raise
            :class:`InputError` naming the exemplar's source).
        blend_mode: ``"alpha"`` (default), ``"poisson"`` or ``"texture"``; the last two need every
            exemplar's image.
        foreground: ``"auto"`` (default), ``"object"`` or ``"texture"`` (see :func:`estimate_foreground`).
        min_inside: fraction of defect pixels that must lie on the foreground. Default 0.95.
        scale, rotation, flip, elastic_alpha, elastic_sigma, p_elastic: deformation ranges, defaults as in
            :func:`deform_exemplar` ((0.7, 1.3), (-180, 180), True, 0.06, 0.12, 0.5).
        size_reference: ``"pixels"`` (default) keeps defect sizes in pixels; ``"image"`` also scales by
            (min side of the normal image) / (min side of the exemplar image) for differing resolutions.
        balance: ``"uniform"`` (default): every exemplar equally likely; ``"class"``: every class equally
            likely, then an exemplar of it uniformly.
        feather, clone_mode, alpha_polarity: passed to :func:`blend` (defaults 3, "normal", "random").
        max_attempts: deformations tried before :class:`PlacementError` when placements fail. Default 5.
        position: ``"uniform"`` (default): uniform over the valid positions (:func:`place_mask`).
            ``"exemplar"``: the placed mask's centroid goes to the chosen exemplar j's normalised centroid
            (cy / H, cx / W in its own image), mirrored when the deformation flipped it (flip_h: cx -> 1 - cx,
            flip_v: cy -> 1 - cy), plus Gaussian jitter with std per axis = Scott's rule
            ``std(class centroids) * n^(-1/6)`` over the class's n exemplars, or half of exemplar j's
            normalised bounding-box extent on an axis where that is 0 (n == 1 or no spread); clipped to
            [0, 1]. If exemplar j touches image sides, the copy is snapped to the same (mirrored) sides; of
            two opposite sides only the one nearer the target. Rotation moves neither target nor sides: it
            turns the defect about its own centre, whereas the statistics say where on the part defects
            occur. A position with less than ``min_inside`` on the foreground falls back to
            :func:`place_mask` (``params["position_fallback"]``).
        orientation: ``"random"`` (default): rotation uniform in ``rotation``. ``"exemplar"``: rotation
            ~ Normal(0, s) relative to exemplar j's own orientation (``rotation`` is ignored), with s =
            Scott's-rule bandwidth of the class's principal-axis angles (see :func:`principal_axis_angle`;
            circular std of the doubled angles, halved, times n^(-1/5)); s = 0 for a single exemplar.
            Flips still happen when ``flip=True`` (a flip mirrors an axis angle a -> -a, which keeps
            horizontal/vertical defects so; pass ``flip=False`` to keep every angle).
        harmonize: match the transferred defect's brightness/contrast to the target surface (default False).
            Grey = channel mean; ``D(m, r)`` = m dilated by a (2r+1)-square; source statistics are taken on
            the exemplar's background estimate around its undeformed mask, target ones on the normal image
            around the placed mask; ``ring = D(m, 12) - D(m, 2)``; ``clip`` = clip to [0.25, 4].
            ``"texture"``: the deviation is multiplied by ``gain = brightness =
            clip(mean_t(D(m, 2)) / mean_s(D(m, 2)))``, which keeps the defect's depth relative to its surface
            (45 % darker stays 45 % darker on a brighter part). The rings' relative contrast ``clip((std_t /
            mean_t) / (std_s / mean_s))`` is recorded as ``harmonize_contrast`` but not applied (on striped
            surfaces it measures the texture, not the defect; 1 when a ring is flat or black).
            ``"alpha"`` with defect images: ``patch' = gain * patch + shift_c`` with
            ``gain = clip(std_t / std_s)`` over the rings (1 when one is flat) and ``shift_c = mean_t,c -
            gain * mean_s,c`` over ``D(m, 12)``, so the patch's surface gets the target's local mean and
            spread. ``"poisson"`` and masks-only alpha: no-op (the Poisson solve, resp. the paint, already
            use the target's intensities). Records ``harmonize_gain`` (1.0 for no-ops). Pixels still change
            only within ``feather`` px of the mask.

    The ``position``/``orientation``/``harmonize`` options add their own keys to ``params``; with their
    defaults the output (and the random stream) is exactly that of earlier versions.
    """

    # Context kept around deformed patches: covers the clone dilation and the default feather.
    _CONTEXT = 8

    def __init__(
        self,
        exemplars: Sequence[DefectExemplar],
        *,
        blend_mode: BlendMode = "alpha",
        foreground: ForegroundKind = "auto",
        min_inside: float = 0.95,
        scale: tuple[float, float] = (0.7, 1.3),
        rotation: tuple[float, float] = (-180.0, 180.0),
        flip: bool = True,
        elastic_alpha: float = 0.06,
        elastic_sigma: float = 0.12,
        p_elastic: float = 0.5,
        size_reference: Literal["pixels", "image"] = "pixels",
        balance: Literal["uniform", "class"] = "uniform",
        feather: int = 3,
        clone_mode: CloneMode = "normal",
        alpha_polarity: Polarity = "random",
        max_attempts: int = 5,
        position: PositionMode = "uniform",
        orientation: OrientationMode = "random",
        harmonize: bool = False,
    ) -> None:
        if isinstance(exemplars, DefectExemplar) or not isinstance(exemplars, Sequence) or not exemplars:
            raise InputError(
                "exemplars must be a non-empty list of DefectExemplar; load at least one defect mask"
            )
        for i, ex in enumerate(exemplars):
            _validate_exemplar(ex, i)
        if blend_mode not in _BLEND_MODES:
            raise InputError(f"blend_mode must be one of {_BLEND_MODES}, got {blend_mode!r}")
        if foreground not in _FOREGROUND_KINDS:
            raise InputError(f"foreground must be one of {_FOREGROUND_KINDS}, got {foreground!r}")
        if blend_mode in ("poisson", "texture"):
            missing = [ex.source for ex in exemplars if ex.image is None]
            if missing:
                shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
                raise InputError(
                    f"blend mode {blend_mode!r} needs the defect images (`--defects DIR`), "
                    f"but these exemplars have masks only: {shown}; "
                    "provide the images or use blend mode 'alpha'"
                )
        if size_reference not in ("pixels", "image"):
            raise InputError(f"size_reference must be 'pixels' or 'image', got {size_reference!r}")
        if balance not in ("uniform", "class"):
            raise InputError(f"balance must be 'uniform' or 'class', got {balance!r}")
        if not 0.0 <= min_inside <= 1.0:
            raise InputError(f"min_inside must be a fraction in [0, 1], got {min_inside}")
        if max_attempts < 1 or feather < 0:
            raise InputError(f"max_attempts must be >= 1 and feather >= 0, got {max_attempts} and {feather}")
        if clone_mode not in _CLONE_FLAGS:
            raise InputError(f"clone_mode must be 'normal' or 'mixed', got {clone_mode!r}")
        if position not in ("uniform", "exemplar"):
            raise InputError(f"position must be 'uniform' or 'exemplar', got {position!r}")
        if orientation not in ("random", "exemplar"):
            raise InputError(f"orientation must be 'random' or 'exemplar', got {orientation!r}")
        if not isinstance(harmonize, (bool, np.bool_)):
            raise InputError(f"harmonize must be true or false, got {harmonize!r}")
        _check_range(scale, "scale", positive=True)
        _check_range(rotation, "rotation")
        self.exemplars: tuple[DefectExemplar, ...] = tuple(exemplars)
        self.blend_mode = blend_mode
        self.foreground = foreground
        self.min_inside = float(min_inside)
        self.scale = (float(scale[0]), float(scale[1]))
        self.rotation = (float(rotation[0]), float(rotation[1]))
        self.flip = bool(flip)
        self.elastic_alpha = float(elastic_alpha)
        self.elastic_sigma = float(elastic_sigma)
        self.p_elastic = float(p_elastic)
        self.size_reference = size_reference
        self.balance = balance
        self.feather = int(feather)
        self.clone_mode = clone_mode
        self.alpha_polarity = alpha_polarity
        self.max_attempts = int(max_attempts)
        self.position: PositionMode = position
        self.orientation: OrientationMode = orientation
        self.harmonize = bool(harmonize)
        self.classes: tuple[str, ...] = tuple(sorted({ex.defect_class for ex in self.exemplars}))
        self._prepared = [self._prepare(ex) for ex in self.exemplars]
        self._stats = [_exemplar_stats(ex.mask) for ex in self.exemplars]
        # Per-class kernel bandwidths: (cy, cx) position std (0 = use the exemplar's half extent) and the
        # rotation std in degrees.
        self._position_std: dict[str, tuple[float, float]] = {}
        self._rotation_std: dict[str, float] = {}
        for cls in self.classes:
            members = [st for st, ex in zip(self._stats, self.exemplars, strict=True) if ex.defect_class == cls]
            centroids = np.array([st.centroid for st in members], np.float64)
            self._position_std[cls] = (_scott_std(centroids[:, 0], 2), _scott_std(centroids[:, 1], 2))
            self._rotation_std[cls] = _axial_bandwidth([st.angle for st in members],
                                                       [st.elongation for st in members])

    def _prepare(self, ex: DefectExemplar) -> _Prepared:
        """Crop each exemplar once and estimate its background with generous context."""
        y0, y1, x0, x1 = _bbox(ex.mask)
        margin = max(16, (max(y1 - y0, x1 - x0) + 1) // 2)
        h, w = ex.mask.shape
        win = (
            slice(max(0, y0 - margin), min(h, y1 + margin)),
            slice(max(0, x0 - margin), min(w, x1 + margin)),
        )
        mask = ex.mask[win]
        if ex.image is None:
            return _Prepared(mask, ())
        image = np.ascontiguousarray(ex.image[win])
        background = estimate_background(image, mask)
        # Measured once on the undeformed exemplar: its real surroundings, not the reflected context of a patch.
        surface = _surface_stats(background, mask) if self.harmonize else None
        return _Prepared(mask, (image, background), surface)

    def choose_exemplar(self, rng: np.random.Generator) -> int:
        """Index of the exemplar to use next (uniform or class-balanced, see ``balance``)."""
        _check_rng(rng)
        if self.balance == "class":
            cls = self.classes[int(rng.integers(len(self.classes)))]
            members = [i for i, ex in enumerate(self.exemplars) if ex.defect_class == cls]
            return members[int(rng.integers(len(members)))]
        return int(rng.integers(len(self.exemplars)))

    def _exemplar_target(
        self, index: int, deform: DeformParams, rng: np.random.Generator
    ) -> tuple[tuple[float, float], tuple[float, float], frozenset[str]]:
        """Jittered, mirrored target centroid (normalised), the jitter std and the sides to touch."""
        stats = self._stats[index]
        class_std = self._position_std[self.exemplars[index].defect_class]
        std = (
            class_std[0] if class_std[0] > 0 else 0.5 * stats.extent[0],
            class_std[1] if class_std[1] > 0 else 0.5 * stats.extent[1],
        )
        cy, cx = stats.centroid
        sides = set(stats.sides)
        if deform.flip_v:
            cy = 1.0 - cy
            sides = {_MIRROR[s] if s in ("top", "bottom") else s for s in sides}
        if deform.flip_h:
            cx = 1.0 - cx
            sides = {_MIRROR[s] if s in ("left", "right") else s for s in sides}
        ty = float(np.clip(cy + rng.normal(0.0, std[0]), 0.0, 1.0))
        tx = float(np.clip(cx + rng.normal(0.0, std[1]), 0.0, 1.0))
        return (ty, tx), std, frozenset(sides)

    def _harmonize(
        self, normal: np.ndarray, full_mask: np.ndarray, prep: _Prepared, patches: tuple[np.ndarray, ...]
    ) -> tuple[np.ndarray | None, float, dict[str, Any]]:
        """``(source_patch, texture_gain, params)`` after brightness/contrast matching (see ``harmonize``)."""
        patch = patches[0] if patches else None
        if prep.surface is None or self.blend_mode == "poisson" or patch is None:
            return patch, 1.0, {"harmonize": True, "harmonize_gain": 1.0}
        target = _surface_stats(normal, full_mask)
        if self.blend_mode == "texture":
            gain, brightness, contrast = _texture_gain(target, prep.surface)
            record = {"harmonize_brightness": brightness, "harmonize_contrast": contrast}
            return patch, gain, {"harmonize": True, "harmonize_gain": gain, **record}
        matched, gain, shift = _match_patch(patch, target, prep.surface)
        return matched, 1.0, {"harmonize": True, "harmonize_gain": gain, "harmonize_shift": shift}

    def __call__(self, normal_image: np.ndarray, rng: np.random.Generator) -> GeneratedDefect:
        """Place one new defect on ``normal_image``; raises :class:`PlacementError` if none fits."""
        _check_image(normal_image, "normal_image")
        _check_rng(rng)
        index = self.choose_exemplar(rng)
        ex, prep = self.exemplars[index], self._prepared[index]
        hw = normal_image.shape[:2]
        kind = resolve_foreground_kind(normal_image) if self.foreground == "auto" else self.foreground
        foreground = estimate_foreground(normal_image, kind=kind)
        size_factor = 1.0
        if self.size_reference == "image":
            size_factor = min(hw) / min(ex.mask.shape)
        scale = (self.scale[0] * size_factor, self.scale[1] * size_factor)
        ctx = self._CONTEXT if prep.patches else 0
        rotation_std = self._rotation_std[ex.defect_class]
        error: PlacementError | None = None
        for attempt in range(1, self.max_attempts + 1):
            extra: dict[str, Any] = {}
            rotation = self.rotation
            if self.orientation == "exemplar":
                # Drawn even when the std is 0 so the random stream doesn't depend on the class size.
                angle = float(rng.normal(0.0, rotation_std))
                rotation = (angle, angle)
                extra.update(orientation="exemplar", rotation_std=float(rotation_std))
            deformed = deform_exemplar(
                prep.mask,
                rng,
                patches=prep.patches,
                scale=scale,
                rotation=rotation,
                flip=self.flip,
                elastic_alpha=self.elastic_alpha,
                elastic_sigma=self.elastic_sigma,
                p_elastic=self.p_elastic,
                context=ctx,
            )
            mask_ctx, patches, fit = fit_to_shape(deformed.mask, hw, patches=deformed.patches, context=ctx)
            tight = mask_ctx[ctx : mask_ctx.shape[0] - ctx, ctx : mask_ctx.shape[1] - ctx]
            placed = None
            if self.position == "exemplar":
                target, std, sides = self._exemplar_target(index, deformed.params, rng)
                placed = _place_at_target(tight, hw, foreground, target, sides, self.min_inside)
                extra.update(
                    position="exemplar",
                    target_centroid=[target[0], target[1]],
                    position_std=[float(std[0]), float(std[1])],
                    target_sides=sorted(sides),
                    position_fallback=placed is None,
                )
            if placed is None:
                try:
                    placed = place_mask(tight, hw, foreground, rng, min_inside=self.min_inside)
                except PlacementError as exc:
                    error = exc
                    continue
            full_mask, (top, left) = placed
            source_patch = patches[0] if patches else None
            texture_gain = 1.0
            if self.harmonize:
                source_patch, texture_gain, record = self._harmonize(normal_image, full_mask, prep, patches)
                extra.update(record)
            image, mask = blend(
                normal_image,
                full_mask,
                mode=self.blend_mode,
                rng=rng,
                source_patch=source_patch,
                source_background=patches[1] if patches else None,
                patch_offset=(top - ctx, left - ctx),
                feather=self.feather,
                clone_mode=self.clone_mode,
                alpha_polarity=self.alpha_polarity,
                texture_gain=texture_gain,
            )
            inside = float(np.count_nonzero(full_mask & foreground)) / float(np.count_nonzero(full_mask))
            params: dict[str, Any] = {
                "exemplar_index": index,
                "source": str(ex.source),
                "defect_class": str(ex.defect_class),
                **deformed.params.to_dict(),
                "size_factor": float(size_factor),
                "fit_factor": float(fit),
                "top": int(top),
                "left": int(left),
                "height": int(tight.shape[0]),
                "width": int(tight.shape[1]),
                "inside_fraction": inside,
                "foreground_kind": kind,
                "blend_mode": self.blend_mode,
                "clone_mode": self.clone_mode if self.blend_mode == "poisson" else None,
                "feather": self.feather,
                "attempts": attempt,
                **extra,
            }
            return GeneratedDefect(image=image, mask=mask, defect_class=ex.defect_class, params=params)
        raise PlacementError(
            f"defect exemplar {ex.source!r} could not be placed on the {hw[0]}x{hw[1]} image after "
            f"{self.max_attempts} deformations: {error}"
        )
