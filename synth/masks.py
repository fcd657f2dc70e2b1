"""Model-free anomaly masks: Perlin noise (DRAEM), ellipses, scratches and blobs.

Every generator is a pure function of its arguments: randomness comes only from the explicit
``rng: np.random.Generator`` argument, so the same seed always gives the same mask. Masks are
``bool`` arrays of shape ``(H, W)`` where ``True`` marks the defect, and every generator here
guarantees a non-empty mask.

Perlin noise is computed in separable form. For one lattice axis, a pixel at lattice coordinate
``t`` only touches the two lattice points ``floor(t)`` and ``floor(t) + 1`` with fade weights
``1 - f(u)`` and ``f(u)`` (``u = t - floor(t)``); the gradient dot product splits into an
axis-0 part and an axis-1 part. The whole noise field is therefore

    noise = WD0 @ GX @ W1.T + W0 @ GY @ WD1.T

with ``W`` (fade weights) and ``WD`` (fade weight times offset to the lattice point) sparse
``n x (cells + 1)`` basis matrices (2 non-zeros per row) and ``GX``/``GY`` the gradient
components on the lattice. The small right-hand factors are formed first ((cells + 1) x W),
then every pixel row is a 4-term combination of their rows: 4 multiply-adds per pixel, done as a
few tiny matrix products. This replaces DRAEM's per-pixel gradient tiling, gives the same values
(up to float32 rounding) and works for any image size, because pixel ``i`` maps to lattice
coordinate ``i * cells / n`` whether or not ``n`` is divisible by ``cells`` (DRAEM requires
divisibility; Anomalib pads to a power of two and crops, which changes the number of visible
cells). No reduced-resolution shortcut is used: the noise is evaluated at every pixel.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from functools import lru_cache
from typing import Any, NamedTuple

import cv2
import numpy as np
from numpy.typing import NDArray

from synth.core.errors import InputError

__all__ = [
    "MASK_GENERATORS",
    "MaskGenerator",
    "blob_mask",
    "ellipse_mask",
    "fractal_perlin_noise",
    "perlin_mask",
    "perlin_mask_with_params",
    "perlin_noise",
    "scratch_mask",
]

BoolMask = NDArray[np.bool_]
MaskGenerator = Callable[..., BoolMask]

# DRAEM multiplies the noise by sqrt(2) so that it spans about [-1, 1]; its 0.5 threshold assumes it.
_SQRT2 = math.sqrt(2.0)


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _check_rng(rng: object) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise InputError(
            f"rng must be a numpy.random.Generator, got {type(rng).__name__}; "
            "create one with np.random.default_rng(seed)"
        )
    return rng


def _check_shape(shape: object) -> tuple[int, int]:
    ok = (
        isinstance(shape, tuple | list)
        and len(shape) == 2
        and all(isinstance(s, int | np.integer) and not isinstance(s, bool) and s > 0 for s in shape)
    )
    if not ok:
        raise InputError(
            f"shape must be a (height, width) pair of positive ints, got {shape!r}; pass image.shape[:2]"
        )
    return int(shape[0]), int(shape[1])  # type: ignore[index]


def _check_pair(name: str, value: object, *, integer: bool, positive: bool = True) -> tuple[Any, Any]:
    kind = int | np.integer if integer else int | float | np.integer | np.floating
    ok = (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)
    )
    if ok and positive:
        ok = all(v > 0 for v in value)  # type: ignore[union-attr]
    if ok and not integer:
        ok = value[0] <= value[1]  # type: ignore[index]
    if not ok:
        what = "ints" if integer else "numbers (low, high) with low <= high"
        sign = "positive " if positive else ""
        raise InputError(f"{name} must be a pair of {sign}{what}, got {value!r}")
    if integer:
        return int(value[0]), int(value[1])  # type: ignore[index]
    return float(value[0]), float(value[1])  # type: ignore[index]


def _ensure_non_empty(mask: BoolMask, rng: np.random.Generator) -> BoolMask:
    # Drawing primitives always cover their (in-image) centre, so this is only a safety net for
    # degenerate tiny images; it keeps the "never empty" promise without looping.
    if not mask.any():
        h, w = mask.shape
        mask[int(rng.integers(h)), int(rng.integers(w))] = True
    return mask


# --------------------------------------------------------------------------------------------
# Perlin noise
# --------------------------------------------------------------------------------------------


class _AxisBasis(NamedTuple):
    """Interpolation data for one axis of ``n`` pixels covering ``cells`` lattice cells.

    For pixel ``i`` with lattice coordinate ``t = i * cells / n``, ``cell[i] = floor(t)``,
    ``u = t - cell[i]`` and fade ``f = f(u)``: the lower/upper lattice points get weights
    ``w_lo = 1 - f`` / ``w_hi = f`` and offset-weighted ``wd_lo = (1 - f) * u`` /
    ``wd_hi = f * (u - 1)`` (the gradient dot product needs the offset to each lattice point).
    """

    cell: NDArray[np.intp]
    w_lo: NDArray[np.float32]
    w_hi: NDArray[np.float32]
    wd_lo: NDArray[np.float32]
    wd_hi: NDArray[np.float32]
    coef: NDArray[np.float32]  # (n, 4) rows [wd_lo, w_lo, wd_hi, w_hi], the row-axis coefficients


@lru_cache(maxsize=256)
def _axis_basis(n: int, cells: int) -> _AxisBasis:
    # Cached because DRAEM only ever uses 6 scales per axis and a handful of image sizes; arrays
    # are made read-only so no caller can corrupt the cache.
    t = np.arange(n, dtype=np.float64) * (cells / n)  # float64 so floor() is exact for large n
    cell = np.minimum(np.floor(t).astype(np.intp), cells - 1)
    u = (t - cell).astype(np.float32)
    # Quintic fade 6u^5 - 15u^4 + 10u^3 (Perlin 2002, used by DRAEM): zero first and second
    # derivatives at the lattice points, so the noise shows no grid creases.
    fade = u * u * u * (u * (u * 6.0 - 15.0) + 10.0)
    w_lo, w_hi = 1.0 - fade, fade
    wd_lo, wd_hi = w_lo * u, w_hi * (u - 1.0)
    coef = np.ascontiguousarray(np.stack([wd_lo, w_lo, wd_hi, w_hi], axis=1))
    basis = _AxisBasis(cell, w_lo, w_hi, wd_lo, wd_hi, coef)
    for arr in basis:
        arr.setflags(write=False)
    return basis


@lru_cache(maxsize=256)
def _row_chunks(n: int, cells: int, max_rows: int) -> tuple[tuple[int, int, int], ...]:
    """``(start, stop, cell)`` row ranges that lie in one lattice cell and hold <= max_rows rows."""
    cell = _axis_basis(n, cells).cell
    # Row indices where the cell changes, plus forced breaks every max_rows rows.
    starts = np.flatnonzero(np.diff(cell)) + 1
    bounds = np.union1d(np.concatenate([[0], starts, [n]]), np.arange(0, n, max_rows))
    return tuple((int(a), int(b), int(cell[a])) for a, b in zip(bounds[:-1], bounds[1:], strict=True))


# OpenBLAS runs a GEMM on one thread when m*n*k <= 65536 * 4. Keeping every product under that
# bound matters on a shared 2-core machine: its spinning worker threads made the same product up
# to 8x slower under load, while the single-threaded path is steady. Purely a speed concern.
_GEMM_SINGLE_THREAD_MACS = 65536 * 4


def _perlin(
    h: int, w: int, c0: int, c1: int, rng: np.random.Generator, out: NDArray[np.float32] | None = None
) -> NDArray[np.float32]:
    """Unchecked Perlin noise core (see module docstring); writes into ``out`` when given."""
    # Random unit gradients on the (c0+1) x (c1+1) lattice, as in DRAEM (no wrap-around). The
    # sqrt(2) normalisation DRAEM applies to the result is folded into the gradients (cheaper).
    angles = rng.random((c0 + 1, c1 + 1), dtype=np.float32) * np.float32(2.0 * math.pi)
    gx = np.cos(angles) * np.float32(_SQRT2)  # gradient component along axis 0 (rows)
    gy = np.sin(angles) * np.float32(_SQRT2)  # gradient component along axis 1 (columns)
    rows, cols = _axis_basis(h, c0), _axis_basis(w, c1)

    # Stage 1 (small, (c0+1) x w): interpolate the gradient lattice along the columns.
    #   R1 = GX @ W1.T pairs with the row offsets, R2 = GY @ WD1.T with the row weights.
    # Each column touches 2 lattice columns, so this is 2 gathers + multiply-adds, no matmul.
    # Interleaving R1/R2 rows makes the 4 rows one pixel row needs a contiguous slice:
    #   right[2c : 2c + 4] = [R1[c], R2[c], R1[c + 1], R2[c + 1]].
    d = cols.cell
    right = np.empty((2 * (c0 + 1), w), dtype=np.float32)
    r1, r2 = right[0::2], right[1::2]
    np.multiply(gx[:, d], cols.w_lo, out=r1)
    r1 += gx[:, d + 1] * cols.w_hi
    np.multiply(gy[:, d], cols.wd_lo, out=r2)
    r2 += gy[:, d + 1] * cols.wd_hi

    # Stage 2 (h x w): every pixel row is a 4-term combination of rows of `right`; rows in the
    # same lattice cell share the 4 rows, so each chunk is one (rows x 4) @ (4 x w) product.
    # Total work is 4 multiply-adds per pixel whatever the scale.
    noise = np.empty((h, w), dtype=np.float32) if out is None else out
    coef = rows.coef
    for start, stop, c in _row_chunks(h, c0, max(1, _GEMM_SINGLE_THREAD_MACS // (4 * w))):
        np.matmul(coef[start:stop], right[2 * c : 2 * c + 4], out=noise[start:stop])
    return noise


# Per-thread scratch buffers for perlin_mask's two float32 noise fields. Re-allocating them each
# call made glibc hand the memory back to the OS and page-fault it in again, which doubled the
# time of a 512x512 mask (3.6 ms -> 1.6 ms measured). Only images up to _SCRATCH_MAX_PIXELS are
# buffered so at most 2 * 4 MiB stays allocated per thread; the returned mask is always new.
_SCRATCH_MAX_PIXELS = 1024 * 1024
_scratch = threading.local()


def _scratch_buffers(h: int, w: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    if h * w > _SCRATCH_MAX_PIXELS:
        return np.empty((h, w), np.float32), np.empty((h, w), np.float32)
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None or bufs[0].shape != (h, w):
        bufs = (np.empty((h, w), np.float32), np.empty((h, w), np.float32))
        _scratch.bufs = bufs
    return bufs


def perlin_noise(
    shape: tuple[int, int], scale: tuple[int, int], rng: np.random.Generator
) -> NDArray[np.float32]:
    """2-D gradient (Perlin) noise, fully vectorised.

    Args:
        shape: ``(height, width)`` of the output in pixels. Need not be divisible by ``scale``.
        scale: ``(cells_y, cells_x)``: number of lattice cells along the height and the width
            (same axis order as ``shape``). Larger values give finer noise. DRAEM draws each
            entry as ``2**k`` with ``k`` in ``[0, 6)``.
        rng: source of randomness (gradient directions).

    Returns:
        ``float32`` array of ``shape``; values lie roughly in ``[-1, 1]`` (DRAEM's ``sqrt(2)``
        normalisation), with zeros on the lattice points.
    """
    h, w = _check_shape(shape)
    c0, c1 = _check_pair("scale", scale, integer=True)
    return _perlin(h, w, c0, c1, _check_rng(rng))


def fractal_perlin_noise(
    shape: tuple[int, int],
    scale: tuple[int, int],
    octaves: int,
    persistence: float,
    rng: np.random.Generator,
    *,
    lacunarity: int = 2,
) -> NDArray[np.float32]:
    """Fractal (multi-octave) Perlin noise: ``sum_o persistence**o * perlin(scale * lacunarity**o)``.

    Args:
        shape: ``(height, width)`` of the output in pixels.
        scale: ``(cells_y, cells_x)`` of the first (coarsest) octave.
        octaves: number of noise layers summed (DRAEM's ``rand_perlin_2d_octaves`` defaults to 1,
            i.e. plain Perlin noise; 4 is a common choice for texture-like noise).
        persistence: amplitude ratio between successive octaves; DRAEM's default is 0.5.
        rng: source of randomness.
        lacunarity: frequency ratio between successive octaves; default 2 (DRAEM's value).

    Returns:
        ``float32`` array of ``shape``. Not renormalised: the amplitude grows up to
        ``1 / (1 - persistence)``, as in the reference implementation.
    """
    h, w = _check_shape(shape)
    c0, c1 = _check_pair("scale", scale, integer=True)
    rng = _check_rng(rng)
    if not isinstance(octaves, int | np.integer) or octaves < 1:
        raise InputError(f"octaves must be a positive int, got {octaves!r}")
    if not isinstance(lacunarity, int | np.integer) or lacunarity < 1:
        raise InputError(
            f"lacunarity must be a positive int (lattice cells must be whole), got {lacunarity!r}"
        )
    if not 0.0 < float(persistence) <= 1.0:
        raise InputError(f"persistence must be in (0, 1], got {persistence!r}; the usual value is 0.5")
    total = np.zeros((h, w), dtype=np.float32)
    amplitude = 1.0
    for octave in range(int(octaves)):
        f = int(lacunarity) ** octave
        # Octave frequencies beyond the pixel grid add only aliasing; stop there.
        if c0 * f > h and c1 * f > w:
            break
        total += np.float32(amplitude) * _perlin(h, w, c0 * f, c1 * f, rng)
        amplitude *= float(persistence)
    return total


# --------------------------------------------------------------------------------------------
# DRAEM Perlin mask
# --------------------------------------------------------------------------------------------


def check_perlin_params(min_scale_exp: Any, max_scale_exp: Any, threshold: Any, min_area_fraction: Any = 0.0) -> None:
    """Validate Perlin mask parameters (types and ranges), so generators can refuse bad values when built."""
    if isinstance(min_scale_exp, bool) or isinstance(max_scale_exp, bool) or not isinstance(
            min_scale_exp, int | np.integer) or not isinstance(max_scale_exp, int | np.integer):
        raise InputError(f"min_scale_exp/max_scale_exp must be ints, got {min_scale_exp!r}/{max_scale_exp!r}")
    if not 0 <= min_scale_exp < max_scale_exp:
        raise InputError(
            f"need 0 <= min_scale_exp < max_scale_exp (exclusive upper bound), got "
            f"{min_scale_exp}, {max_scale_exp}; DRAEM uses 0 and 6"
        )
    for key, value, allowed in (("threshold", threshold, "a number"),
                                ("min_area_fraction", min_area_fraction, "a number in [0, 1)")):
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            raise InputError(f"{key} must be {allowed}, got {value!r}")
    if not 0.0 <= float(min_area_fraction) < 1.0:
        raise InputError(f"min_area_fraction must be in [0, 1), got {min_area_fraction!r}")


def perlin_mask_with_params(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    min_scale_exp: int = 0,
    max_scale_exp: int = 6,
    threshold: float = 0.5,
    rotate: bool = True,
    min_area_fraction: float = 0.0,
    max_tries: int = 20,
) -> tuple[BoolMask, dict[str, Any]]:
    """Same as :func:`perlin_mask` but also returns the JSON-serialisable sampling parameters.

    The params dict holds ``scale`` ``[cells_y, cells_x]``, ``scale_exp``, ``angle`` (degrees),
    ``threshold``, ``tries`` (attempts used), ``fallback`` (True when the bounded retries ran out
    and the mask was taken as the top-valued pixels of the last noise) and ``area_fraction``.
    """
    h, w = _check_shape(shape)
    rng = _check_rng(rng)
    check_perlin_params(min_scale_exp, max_scale_exp, threshold, min_area_fraction)
    if not isinstance(max_tries, int | np.integer) or max_tries < 1:
        raise InputError(f"max_tries must be a positive int, got {max_tries!r}")
    threshold = float(threshold)
    # At least one pixel, so "non-empty" and "min_area_fraction" are the same test.
    min_pixels = max(1, math.ceil(float(min_area_fraction) * h * w))
    center = ((w - 1) * 0.5, (h - 1) * 0.5)

    buf_noise, buf_rot = _scratch_buffers(h, w)
    noise: NDArray[np.float32] | None = None
    mask: BoolMask | None = None
    params: dict[str, Any] = {}
    for attempt in range(1, int(max_tries) + 1):
        # Independent exponents per axis, upper bound exclusive exactly like DRAEM's
        # torch.randint(0, 6): scales are 1, 2, 4, 8, 16, 32.
        e0, e1 = (int(e) for e in rng.integers(min_scale_exp, max_scale_exp, size=2))
        c0, c1 = 1 << e0, 1 << e1
        noise = _perlin(h, w, c0, c1, rng, out=buf_noise)
        angle = float(rng.uniform(-90.0, 90.0)) if rotate else 0.0
        if rotate:
            # DRAEM rotates the noise (imgaug Affine, bilinear, constant 0 border) before
            # thresholding; with a positive threshold the exposed corners never become defect.
            m = cv2.getRotationMatrix2D(center, angle, 1.0)
            noise = cv2.warpAffine(
                noise,
                m,
                (w, h),
                dst=buf_rot,
                flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=0.0,
            )
        mask = noise > threshold
        params = {
            "scale": [c0, c1],
            "scale_exp": [e0, e1],
            "angle": angle,
            "threshold": threshold,
            "tries": attempt,
            "fallback": False,
        }
        if min_pixels == 1:
            if mask.any():  # any() short-circuits; much cheaper than counting
                break
        elif int(np.count_nonzero(mask)) >= min_pixels:
            break
    else:
        # Bounded retries ran out (rare: e.g. a very high threshold). Keep the last noise's shape
        # by taking its min_pixels highest values, so the promise of a non-empty mask holds.
        assert noise is not None
        flat = noise.ravel()
        kth = np.partition(flat, flat.size - min_pixels)[flat.size - min_pixels]
        mask = noise >= kth
        params["fallback"] = True
    assert mask is not None
    params["area_fraction"] = float(np.count_nonzero(mask)) / float(h * w)
    return mask, params


def perlin_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    min_scale_exp: int = 0,
    max_scale_exp: int = 6,
    threshold: float = 0.5,
    rotate: bool = True,
    min_area_fraction: float = 0.0,
    max_tries: int = 20,
) -> BoolMask:
    """DRAEM Perlin-noise anomaly mask (Zavrtanik et al., ICCV 2021).

    Args:
        shape: ``(height, width)`` of the mask.
        rng: source of randomness.
        min_scale_exp: smallest lattice exponent; default 0 (DRAEM).
        max_scale_exp: exclusive upper bound of the exponent; default 6 (DRAEM), so the number of
            noise cells per axis is ``2**k`` for ``k`` in ``{0, ..., 5}``, drawn independently for
            the two axes. Larger scales give smaller, more fragmented defects.
        threshold: noise level above which a pixel is defect; default 0.5 (DRAEM). Higher
            values give smaller masks.
        rotate: rotate the noise by an angle drawn from ``U(-90, 90)`` degrees before
            thresholding; default True (DRAEM).
        min_area_fraction: minimum defect area as a fraction of the image; masks below it are
            re-drawn. Default 0.0, i.e. any non-empty mask (DRAEM has no such filter).
        max_tries: bounded number of draws (new scales, gradients and angle each time) before
            falling back to the top-valued pixels of the last noise field; default 20. DRAEM does
            not retry (it labels empty draws as normal); Anomalib retries 10 times.

    Returns:
        ``bool`` mask of ``shape``, never empty.
    """
    mask, _ = perlin_mask_with_params(
        shape,
        rng,
        min_scale_exp=min_scale_exp,
        max_scale_exp=max_scale_exp,
        threshold=threshold,
        rotate=rotate,
        min_area_fraction=min_area_fraction,
        max_tries=max_tries,
    )
    return mask


# --------------------------------------------------------------------------------------------
# simple shape masks
# --------------------------------------------------------------------------------------------


def ellipse_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    axis_range: tuple[float, float] = (0.03, 0.2),
) -> BoolMask:
    """Filled ellipse with random centre, semi-axes and orientation.

    Args:
        shape: ``(height, width)`` of the mask.
        rng: source of randomness.
        axis_range: range of each semi-axis as a fraction of ``min(height, width)``; default
            ``(0.03, 0.2)`` (no paper default; chosen to give spot-like defects).

    Returns:
        ``bool`` mask, never empty (the centre is always inside the image).
    """
    h, w = _check_shape(shape)
    rng = _check_rng(rng)
    lo, hi = _check_pair("axis_range", axis_range, integer=False)
    side = min(h, w)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    ax = max(1, round(rng.uniform(lo, hi) * side))
    ay = max(1, round(rng.uniform(lo, hi) * side))
    angle = float(rng.uniform(0.0, 180.0))
    canvas = np.zeros((h, w), dtype=np.uint8)
    cv2.ellipse(canvas, (cx, cy), (ax, ay), angle, 0.0, 360.0, 1, thickness=-1, lineType=cv2.LINE_8)
    return _ensure_non_empty(canvas.view(np.bool_), rng)


def scratch_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    count_range: tuple[int, int] = (1, 3),
    width_range: tuple[int, int] = (1, 4),
    length_range: tuple[float, float] = (0.15, 0.5),
    segments: int = 12,
    curvature: float = 0.25,
) -> BoolMask:
    """Thin random curved scratches drawn as polylines.

    Each scratch is a smooth random walk: a random start point and heading, then ``segments``
    equal steps whose heading changes by ``N(0, curvature)`` radians per step.

    Args:
        shape: ``(height, width)`` of the mask.
        rng: source of randomness.
        count_range: inclusive range of the number of scratches; default ``(1, 3)``.
        width_range: inclusive range of the line width in pixels; default ``(1, 4)``.
        length_range: range of the scratch length as a fraction of ``max(height, width)``;
            default ``(0.15, 0.5)``.
        segments: polyline segments per scratch (more = smoother curve); default 12.
        curvature: standard deviation of the heading change per segment in radians; 0 gives
            straight scratches; default 0.25.

    Returns:
        ``bool`` mask, never empty (every scratch starts inside the image).
    """
    h, w = _check_shape(shape)
    rng = _check_rng(rng)
    n_lo, n_hi = _check_pair("count_range", count_range, integer=True)
    w_lo, w_hi = _check_pair("width_range", width_range, integer=True)
    l_lo, l_hi = _check_pair("length_range", length_range, integer=False)
    if n_lo > n_hi or w_lo > w_hi:
        raise InputError(
            f"count_range/width_range must be (low, high) with low <= high, got {count_range}/{width_range}"
        )
    if not isinstance(segments, int | np.integer) or segments < 1:
        raise InputError(f"segments must be a positive int, got {segments!r}")
    if float(curvature) < 0:
        raise InputError(f"curvature must be >= 0, got {curvature!r}")
    canvas = np.zeros((h, w), dtype=np.uint8)
    for _ in range(int(rng.integers(n_lo, n_hi + 1))):
        length = rng.uniform(l_lo, l_hi) * max(h, w)
        step = length / segments
        heading = rng.uniform(0.0, 2.0 * math.pi) + np.cumsum(rng.normal(0.0, float(curvature), segments))
        start = np.array([rng.uniform(0, w), rng.uniform(0, h)])
        steps = np.stack([np.cos(heading), np.sin(heading)], axis=1) * step
        pts = np.vstack([start, start + np.cumsum(steps, axis=0)])
        # Clip so cv2 never sees huge coordinates; segments leaving the image are simply cut.
        pts = np.clip(np.rint(pts), -1, max(h, w) + 1).astype(np.int32)
        cv2.polylines(
            canvas, [pts], False, 1, thickness=int(rng.integers(w_lo, w_hi + 1)), lineType=cv2.LINE_8
        )
    return _ensure_non_empty(canvas.view(np.bool_), rng)


def blob_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    radius_range: tuple[float, float] = (0.04, 0.2),
    irregularity: float = 0.35,
    harmonics: int = 4,
    vertices: int = 64,
) -> BoolMask:
    """Smooth random blob: a star-shaped region with a low-frequency random boundary.

    The boundary radius is ``r0 * (1 + sum_k a_k cos(k * theta + phi_k))`` for ``k = 2..harmonics``
    with random phases and amplitudes summing to at most ``irregularity``; only low harmonics are
    used, so the outline is smooth without any blurring pass (cheap at any image size).

    Args:
        shape: ``(height, width)`` of the mask.
        rng: source of randomness.
        radius_range: range of the mean radius ``r0`` as a fraction of ``min(height, width)``;
            default ``(0.04, 0.2)``.
        irregularity: total relative amplitude of the boundary wobble, in ``[0, 1)`` so the
            radius stays positive; default 0.35.
        harmonics: highest boundary harmonic (higher = more lobes); default 4.
        vertices: polygon vertices used to draw the outline; default 64.

    Returns:
        ``bool`` mask, never empty (the centre is inside the image).
    """
    h, w = _check_shape(shape)
    rng = _check_rng(rng)
    lo, hi = _check_pair("radius_range", radius_range, integer=False)
    if not 0.0 <= float(irregularity) < 1.0:
        raise InputError(f"irregularity must be in [0, 1), got {irregularity!r}")
    if not isinstance(harmonics, int | np.integer) or harmonics < 1:
        raise InputError(f"harmonics must be a positive int, got {harmonics!r}")
    if not isinstance(vertices, int | np.integer) or vertices < 3:
        raise InputError(f"vertices must be an int >= 3, got {vertices!r}")
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    r0 = max(1.0, rng.uniform(lo, hi) * min(h, w))
    theta = np.linspace(0.0, 2.0 * math.pi, int(vertices), endpoint=False)
    radius = np.ones_like(theta)
    ks = np.arange(2, int(harmonics) + 1)
    if ks.size:
        amps = rng.dirichlet(np.ones(ks.size)) * float(irregularity) * rng.uniform(0.3, 1.0)
        phases = rng.uniform(0.0, 2.0 * math.pi, ks.size)
        radius += (amps[:, None] * np.cos(ks[:, None] * theta[None, :] + phases[:, None])).sum(axis=0)
    # Anisotropic stretch and rotation so blobs are not all roughly round.
    stretch = rng.uniform(0.6, 1.0)
    rot = rng.uniform(0.0, 2.0 * math.pi)
    x = r0 * radius * np.cos(theta)
    y = r0 * radius * np.sin(theta) * stretch
    xs = cx + x * math.cos(rot) - y * math.sin(rot)
    ys = cy + x * math.sin(rot) + y * math.cos(rot)
    pts = np.rint(np.stack([xs, ys], axis=1)).astype(np.int32)
    canvas = np.zeros((h, w), dtype=np.uint8)
    cv2.fillPoly(canvas, [pts], 1, lineType=cv2.LINE_8)
    return _ensure_non_empty(canvas.view(np.bool_), rng)


#: Name -> mask generator; every generator is called as ``gen(shape, rng, **kwargs)``.
MASK_GENERATORS: dict[str, MaskGenerator] = {
    "perlin": perlin_mask,
    "ellipse": ellipse_mask,
    "scratch": scratch_mask,
    "blob": blob_mask,
}


def overlay_mask(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` (uint8 HxWx3) with the ``mask`` pixels blended half-way to red, for previews and reports."""
    out = image.astype(np.float32)
    out[mask] = 0.5 * out[mask] + 0.5 * np.array([255, 0, 0], dtype=np.float32)
    return out.astype(np.uint8)
