"""Model-free synthetic anomaly augmenters: DRAEM, CutPaste, CutPaste-Scar and CutPaste 3-way.

Every augmenter is called as ``augmenter(image, rng)`` with a ``uint8`` ``H x W x 3`` RGB image
and an explicit ``np.random.Generator`` and returns an :class:`GeneratedDefect` holding the new
image, the ``bool`` defect mask and JSON-serialisable sampling parameters. Two guarantees hold
for every augmenter:

* pixels outside the mask are byte-identical to the input (changes are confined to the mask);
* the same seed gives identical outputs (no global random state is touched).

References:
    DRAEM: Zavrtanik, Kristan, Skocaj, "DRAEM - A discriminatively trained reconstruction
    embedding for surface anomaly detection", ICCV 2021.
    CutPaste: Li, Sohn, Yoon, Pfister, "CutPaste: Self-Supervised Learning for Anomaly Detection
    and Localization", CVPR 2021.
"""

from __future__ import annotations

import abc
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
from numpy.typing import NDArray

from synth.core.errors import InputError
from synth.core.io import is_image_file, read_image
from synth.generators import GeneratedDefect, method_params_error, register_generator
from synth.masks import _check_rng, check_perlin_params, perlin_mask_with_params, perlin_noise

__all__ = [
    "AUGMENTERS",
    "DRAEM_OPS",
    "PHOTOMETRIC_OPS",
    "Augmenter",
    "CutPaste",
    "CutPaste3Way",
    "CutPasteScar",
    "DraemAugmenter",
    "PerlinBlend",
    "blend_anomaly",
    "check_rgb_image",
    "color_jitter",
]

Image = NDArray[np.uint8]
BoolMask = NDArray[np.bool_]
PhotometricOp = Callable[[Image, np.random.Generator], tuple[Image, dict[str, Any]]]

_RGB_FIX = (
    "convert with synth.core.io.read_image(..., mode='RGB') for files "
    "or synth.core.io.ensure_rgb_uint8(array) for arrays"
)


# --------------------------------------------------------------------------------------------
# result type and validation
# --------------------------------------------------------------------------------------------


def check_rgb_image(image: object, what: str = "image") -> Image:
    """Return ``image`` if it is a non-empty ``uint8`` ``H x W x 3`` array, else raise InputError."""
    if not isinstance(image, np.ndarray):
        raise InputError(
            f"{what} must be a numpy uint8 HxWx3 RGB array, got {type(image).__name__}; {_RGB_FIX}"
        )
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or image.size == 0:
        raise InputError(
            f"{what} must be a uint8 HxWx3 RGB array, got dtype={image.dtype} shape={image.shape}; {_RGB_FIX}"
        )
    return image


def _result(image: Image, mask: BoolMask, label: str, augmenter: str, **params: Any) -> GeneratedDefect:
    has = label != "normal"
    return GeneratedDefect(image, mask, label, {"augmenter": augmenter, "label": label, "has_anomaly": has, **params})


def _normal(image: Image, augmenter: str, **params: Any) -> GeneratedDefect:
    # A copy, so callers may modify the result without touching their input.
    return _result(image.copy(), np.zeros(image.shape[:2], dtype=bool), "normal", augmenter, **params)


def blend_anomaly(image: Image, source: Image, mask: BoolMask, opacity: float) -> Image:
    """Blend ``source`` into ``image`` inside ``mask``: ``out = image`` outside,
    ``opacity * source + (1 - opacity) * image`` inside (rounded, saturated to uint8).

    Args:
        image: ``uint8`` ``H x W x 3`` RGB image.
        source: ``uint8`` ``H x W x 3`` anomaly source, same size as ``image``.
        mask: ``bool`` ``H x W`` region to change.
        opacity: weight of ``source`` in ``[0, 1]`` (DRAEM: ``1 - beta``, i.e. in ``[0.2, 1]``).

    Returns:
        New ``uint8`` image, byte-identical to ``image`` outside ``mask``.
    """
    check_rgb_image(image)
    check_rgb_image(source, "source")
    if source.shape != image.shape:
        raise InputError(
            f"source shape {source.shape} != image shape {image.shape}; resize the source with "
            "cv2.resize(source, (width, height))"
        )
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.shape != image.shape[:2]:
        got = (
            f"dtype={mask.dtype} shape={mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        )
        raise InputError(
            f"mask must be a bool array of the image size {image.shape[:2]}, got {got}; "
            "build it with mask = (array > 0) at the image's resolution"
        )
    if not 0.0 <= float(opacity) <= 1.0:
        raise InputError(f"opacity must be in [0, 1], got {opacity!r}")
    return _blend(image, source, mask, float(opacity))


def _blend(image: Image, source: Image, mask: BoolMask, opacity: float) -> Image:
    # cv2.addWeighted rounds and saturates in one pass over the image; cv2.copyTo then writes only
    # the mask's pixels, which is what makes the outside of the mask byte-identical to the input.
    # (cv2.copyTo takes the bool mask as a zero-copy uint8 view and is ~10x faster than np.copyto
    # with a broadcast where= mask.)
    blended = cv2.addWeighted(source, opacity, image, 1.0 - opacity, 0.0)
    out = image.copy()
    cv2.copyTo(blended, np.ascontiguousarray(mask).view(np.uint8), out)
    return out


# --------------------------------------------------------------------------------------------
# photometric ops (DRAEM's imgaug list, re-implemented with numpy / cv2)
# --------------------------------------------------------------------------------------------

_RAMP = np.arange(256, dtype=np.float32)


def _lut(image: Image, table: NDArray[Any]) -> Image:
    """Apply a (256,) or per-channel (256, 3) lookup table; cv2.LUT is a single fast pass."""
    table = np.clip(np.rint(table), 0, 255).astype(np.uint8)
    if table.ndim == 2:
        table = table.reshape(1, 256, 3)
    return cv2.LUT(image, table)


def _gamma_contrast(image: Image, rng: np.random.Generator) -> tuple[Image, dict[str, Any]]:
    # imgaug GammaContrast((0.5, 2.0), per_channel=True): one gamma per channel.
    gammas = rng.uniform(0.5, 2.0, size=3)
    table = 255.0 * (_RAMP[:, None] / 255.0) ** gammas[None, :]
    return _lut(image, table), {"name": "gamma_contrast", "gamma": [float(g) for g in gammas]}


def _brightness(image: Image, rng: np.random.Generator) -> tuple[Image, dict[str, Any]]:
    # imgaug MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30)): changes only the luma
    # channel (YCrCb), so hue is preserved.
    mul = float(rng.uniform(0.8, 1.2))
    add = float(rng.uniform(-30.0, 30.0))
    ycc = cv2.cvtColor(image, cv2.COLOR_RGB2YCrCb)
    # (Copy-out/copy-back of one plane measured ~3x faster than cv2.split + cv2.merge.)
    ycc[..., 0] = _lut(np.ascontiguousarray(ycc[..., 0]), _RAMP * mul + add)
    return cv2.cvtColor(ycc, cv2.COLOR_YCrCb2RGB), {"name": "brightness", "mul": mul, "add": add}


_SMOOTH_KERNEL = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13.0


def _sharpen(image: Image, rng: np.random.Generator) -> tuple[Image, dict[str, Any]]:
    # PIL ImageEnhance.Sharpness (imgaug pillike.EnhanceSharpness, factor in (0, 2)): blend between
    # PIL's SMOOTH-filtered image (factor 0) and the original (factor 1); > 1 extrapolates.
    factor = float(rng.uniform(0.0, 2.0))
    smooth = cv2.filter2D(image, -1, _SMOOTH_KERNEL, borderType=cv2.BORDER_REPLICATE)
    out = cv2.addWeighted(image, factor, smooth, 1.0 - factor, 0.0)
    return out, {"name": "sharpen", "factor": factor}


def _hue_saturation(image: Image, rng: np.random.Generator) -> tuple[Image, dict[str, Any]]:
    # imgaug AddToHueAndSaturation((-50, 50), per_channel=True): independent hue and saturation
    # offsets; imgaug's hue unit is 1/255 of the circle, cv2's uint8 hue spans 0..179.
    hue, sat = (int(v) for v in rng.integers(-50, 51, size=2))
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hue_table = np.mod(np.rint(_RAMP + hue * 180.0 / 255.0), 180.0)
    hsv[..., 0] = _lut(np.ascontiguousarray(hsv[..., 0]), hue_table)
    hsv[..., 1] = _lut(np.ascontiguousarray(hsv[..., 1]), _RAMP + sat)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), {"name": "hue_saturation", "hue": hue, "saturation": sat}


def _solarize(image: Image, rng: np.random.Generator) -> tuple[Image, dict[str, Any]]:
    # imgaug Solarize(0.5, threshold=(32, 128)): with probability 0.5 invert pixels >= threshold.
    apply = bool(rng.random() < 0.5)
    threshold = int(rng.integers(32, 129))
    if not apply:
        return image, {"name": "solarize", "applied": False, "threshold": threshold}
    table = np.where(_RAMP >= threshold, 255.0 - _RAMP, _RAMP)
    return _lut(image, table), {"name": "solarize", "applied": True, "threshold": threshold}


def _posterize(image: Image, rng: np.random.Generator) -> tuple[Image, dict[str, Any]]:
    # imgaug Posterize() default: keep nb_bits in [1, 8] most significant bits.
    bits = int(rng.integers(1, 9))
    keep = (0xFF << (8 - bits)) & 0xFF
    return cv2.bitwise_and(image, keep), {"name": "posterize", "bits": bits}


def _invert(image: Image, rng: np.random.Generator) -> tuple[Image, dict[str, Any]]:
    # imgaug Invert(): always applied (p=1).
    return cv2.bitwise_not(image), {"name": "invert"}


def _autocontrast(image: Image, rng: np.random.Generator) -> tuple[Image, dict[str, Any]]:
    # PIL ImageOps.autocontrast with cutoff in (0, 20) percent (imgaug pillike.Autocontrast):
    # per channel, drop `cutoff` % of pixels at each end of the histogram, stretch the rest.
    cutoff = float(rng.uniform(0.0, 20.0))
    n = image.shape[0] * image.shape[1]
    tables = np.empty((256, 3), dtype=np.float32)
    for c in range(3):  # 3 iterations over channels, not pixels
        # calcHist reads the interleaved channel in place (no strided copy as with bincount).
        cdf = np.cumsum(cv2.calcHist([image], [c], None, [256], [0, 256]).ravel())
        cut = n * cutoff / 100.0
        lo = int(np.searchsorted(cdf, cut, side="right"))
        hi = int(np.searchsorted(cdf, n - cut, side="left"))
        if hi <= lo:
            tables[:, c] = _RAMP  # flat channel: PIL leaves it unchanged
        else:
            tables[:, c] = (_RAMP - lo) * (255.0 / (hi - lo))
    return _lut(image, tables), {"name": "autocontrast", "cutoff": cutoff}


def _equalize(image: Image, rng: np.random.Generator) -> tuple[Image, dict[str, Any]]:
    # PIL ImageOps.equalize / imgaug pillike.Equalize: per-channel histogram equalisation.
    return cv2.merge([cv2.equalizeHist(plane) for plane in cv2.split(image)]), {"name": "equalize"}


def _affine_rotate(image: Image, rng: np.random.Generator) -> tuple[Image, dict[str, Any]]:
    # imgaug Affine(rotate=(-45, 45)): bilinear, constant black border, rotation about the centre.
    angle = float(rng.uniform(-45.0, 45.0))
    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D(((w - 1) * 0.5, (h - 1) * 0.5), angle, 1.0)
    out = cv2.warpAffine(
        image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    return out, {"name": "affine_rotate", "angle": angle}


#: Name -> photometric op ``op(image, rng) -> (image, params)``, in DRAEM's order.
PHOTOMETRIC_OPS: dict[str, PhotometricOp] = {
    "gamma_contrast": _gamma_contrast,
    "brightness": _brightness,
    "sharpen": _sharpen,
    "hue_saturation": _hue_saturation,
    "solarize": _solarize,
    "posterize": _posterize,
    "invert": _invert,
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "affine_rotate": _affine_rotate,
}
#: DRAEM's 10 source augmentations.
DRAEM_OPS: tuple[str, ...] = tuple(PHOTOMETRIC_OPS)


def color_jitter(
    image: Image,
    rng: np.random.Generator,
    brightness: float = 0.1,
    contrast: float = 0.1,
    saturation: float = 0.1,
    hue: float = 0.1,
) -> tuple[Image, dict[str, Any]]:
    """torchvision-style ColorJitter on a uint8 RGB image, in a random order of the four ops.

    Args:
        image: ``uint8`` ``H x W x 3`` RGB image (a patch).
        rng: source of randomness.
        brightness: factor drawn from ``U(1 - b, 1 + b)``; default 0.1 (CutPaste).
        contrast: factor from ``U(1 - c, 1 + c)``, blending with the mean grey; default 0.1.
        saturation: factor from ``U(1 - s, 1 + s)``, blending with the per-pixel grey; default 0.1.
        hue: hue shift from ``U(-h, h)`` turns of the colour circle (``h <= 0.5``); default 0.1.

    Returns:
        The jittered image and JSON-serialisable factors.
    """
    factors = {
        "brightness": float(rng.uniform(1.0 - brightness, 1.0 + brightness)),
        "contrast": float(rng.uniform(1.0 - contrast, 1.0 + contrast)),
        "saturation": float(rng.uniform(1.0 - saturation, 1.0 + saturation)),
        "hue": float(rng.uniform(-hue, hue)),
    }
    order = [("brightness", "contrast", "saturation", "hue")[int(i)] for i in rng.permutation(4)]
    x = image.astype(np.float32) * np.float32(1.0 / 255.0)
    grey_w = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma, as torchvision
    for op in order:
        f = np.float32(factors[op])
        if op == "brightness":
            x = x * f
        elif op == "contrast":
            mean = np.float32((x @ grey_w).mean())
            x = x * f + mean * (1.0 - f)
        elif op == "saturation":
            grey = (x @ grey_w)[..., None]
            x = x * f + grey * (1.0 - f)
        else:
            hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)  # float input: hue in degrees [0, 360)
            hsv[..., 0] = np.mod(hsv[..., 0] + f * 360.0, 360.0)
            x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        # torchvision clamps after every op; keeps later ops' statistics in range.
        np.clip(x, 0.0, 1.0, out=x)
    out = np.rint(x * 255.0).astype(np.uint8)
    return out, {**factors, "order": order}


# --------------------------------------------------------------------------------------------
# augmenters
# --------------------------------------------------------------------------------------------


class Augmenter(abc.ABC):
    """Base class: validates the input, then delegates to :meth:`_apply`."""

    name: ClassVar[str]

    def __call__(self, image: Image, rng: np.random.Generator) -> GeneratedDefect:
        """Augment ``image`` (``uint8`` ``H x W x 3`` RGB) using only ``rng`` for randomness."""
        return self._apply(check_rgb_image(image), _check_rng(rng))

    @abc.abstractmethod
    def _apply(self, image: Image, rng: np.random.Generator) -> GeneratedDefect: ...


def _check_range(name: str, value: object, lo: float, hi: float, *, integer: bool = False) -> tuple[Any, Any]:
    kind = int | np.integer if integer else int | float | np.integer | np.floating
    ok = (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(isinstance(v, kind) and not isinstance(v, bool) for v in value)
        and lo <= value[0] <= value[1] <= hi  # type: ignore[index,operator]
    )
    if not ok:
        raise InputError(f"{name} must be a (low, high) pair with {lo} <= low <= high <= {hi}, got {value!r}")
    conv = int if integer else float
    return conv(value[0]), conv(value[1])  # type: ignore[index]


def _check_jitter(**values: float) -> None:
    for key, v in values.items():
        limit = 0.5 if key == "hue" else 1.0
        if not isinstance(v, int | float) or not 0.0 <= float(v) <= limit:
            raise InputError(f"{key} jitter must be a number in [0, {limit}], got {v!r}; CutPaste uses 0.1")


@dataclass(eq=False)  # eq would compare numpy arrays in anomaly_source
class DraemAugmenter(Augmenter):
    """DRAEM synthetic anomalies: Perlin mask x augmented texture, alpha-blended into the image.

    Recipe per sample: with probability ``1 - p_anomaly`` return the image unchanged (label
    ``"normal"``). Otherwise draw a Perlin mask (:func:`synth.masks.perlin_mask`), pick an
    anomaly source (a random texture, or the image itself), resize it to the image size,
    apply ``num_ops`` photometric ops sampled without replacement, and blend inside the mask:

        out = (1 - m) * image + m * ((1 - beta) * source + beta * image),  beta ~ U(beta_range)

    i.e. ``beta`` is DRAEM's weight of the *original* image inside the mask, and the source's
    opacity is ``1 - beta`` (in ``[0.2, 1]`` with DRAEM's range), so a defect is never invisible.

    Args:
        anomaly_source: texture images: a folder (searched recursively for the extensions in
            ``synth.core.io.IMAGE_EXTENSIONS``, e.g. DTD's ``images/``), a sequence of ``uint8``
            ``H x W x 3`` RGB arrays, or None to re-augment the normal image itself (DRAEM uses
            DTD). Folder images are read lazily.
        p_anomaly: probability of adding an anomaly; default 0.5 (DRAEM's training setting).
            Use 1.0 to always produce a defect.
        beta_range: range of ``beta``, the original image's weight inside the mask; default
            ``(0.0, 0.8)`` (DRAEM).
        min_scale_exp: Perlin scale exponent lower bound; default 0 (DRAEM).
        max_scale_exp: Perlin scale exponent exclusive upper bound; default 6 (DRAEM: scales
            1..32).
        threshold: Perlin threshold; default 0.5 (DRAEM).
        rotate: rotate the Perlin noise by ``U(-90, 90)`` degrees; default True (DRAEM).
        min_area_fraction: smallest accepted mask area fraction; default 0.0 (DRAEM: none).
        ops: names from :data:`PHOTOMETRIC_OPS` to sample from; default DRAEM's 10 ops.
        num_ops: ops applied per sample, sampled without replacement; default 3 (DRAEM).
        cache_size: resized source textures kept in memory (LRU) to avoid re-decoding; 0
            disables the cache. Default 64 (not a paper parameter).
    """

    name: ClassVar[str] = "draem"

    anomaly_source: str | os.PathLike[str] | Sequence[Image] | None = None
    p_anomaly: float = 0.5
    beta_range: tuple[float, float] = (0.0, 0.8)
    min_scale_exp: int = 0
    max_scale_exp: int = 6
    threshold: float = 0.5
    rotate: bool = True
    min_area_fraction: float = 0.0
    ops: tuple[str, ...] = DRAEM_OPS
    num_ops: int = 3
    cache_size: int = 64
    _paths: list[Path] = field(init=False, repr=False, default_factory=list)
    _arrays: list[Image] = field(init=False, repr=False, default_factory=list)
    _cache: OrderedDict[tuple[int, int, int], Image] = field(
        init=False, repr=False, default_factory=OrderedDict
    )

    def __post_init__(self) -> None:
        if isinstance(self.p_anomaly, bool) or not isinstance(self.p_anomaly, int | float | np.integer | np.floating) \
                or not 0.0 <= float(self.p_anomaly) <= 1.0:
            raise InputError(f"p_anomaly must be in [0, 1], got {self.p_anomaly!r}; DRAEM uses 0.5")
        check_perlin_params(self.min_scale_exp, self.max_scale_exp, self.threshold, self.min_area_fraction)
        self.beta_range = _check_range("beta_range", self.beta_range, 0.0, 1.0)
        unknown = [op for op in self.ops if op not in PHOTOMETRIC_OPS]
        if unknown:
            raise InputError(f"unknown photometric op(s) {unknown}; choose from {sorted(PHOTOMETRIC_OPS)}")
        self.ops = tuple(self.ops)
        if not isinstance(self.num_ops, int) or not 0 <= self.num_ops <= len(self.ops):
            raise InputError(
                f"num_ops must be an int in [0, {len(self.ops)}] (len(ops)), got {self.num_ops!r}"
            )
        if not isinstance(self.cache_size, int) or self.cache_size < 0:
            raise InputError(f"cache_size must be an int >= 0, got {self.cache_size!r}")
        src = self.anomaly_source
        if src is None:
            return
        if isinstance(src, str | os.PathLike):
            folder = Path(src)
            if not folder.is_dir():
                raise InputError(
                    f"anomaly-source folder {folder} does not exist or is not a folder; pass a folder of "
                    "texture images (e.g. DTD's images/) or anomaly_source=None to use the image itself"
                )
            # Sorted relative paths: the index drawn from rng maps to the same file on every OS.
            self._paths = sorted(
                (p for p in folder.rglob("*") if p.is_file() and is_image_file(p)),
                key=lambda p: p.relative_to(folder).as_posix(),
            )
            if not self._paths:
                raise InputError(
                    f"anomaly-source folder {folder} contains no images (.png, .jpg, ...); add texture "
                    "images (e.g. DTD's images/) or pass anomaly_source=None to use the image itself"
                )
            return
        if isinstance(src, np.ndarray) and src.ndim == 3:
            raise InputError("anomaly_source must be a list of images, got a single array; wrap it: [image]")
        arrays = list(src)
        if not arrays:
            raise InputError(
                "anomaly_source is an empty list; pass at least one uint8 HxWx3 RGB texture or None"
            )
        for i, arr in enumerate(arrays):
            check_rgb_image(arr, f"anomaly_source[{i}]")
        self._arrays = arrays

    @property
    def num_sources(self) -> int:
        """Number of anomaly-source textures (0 when the image itself is the source)."""
        return len(self._paths) or len(self._arrays)

    def _source(self, index: int, h: int, w: int) -> Image:
        key = (index, h, w)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        if self._paths:
            # The project reader: same 16-bit / alpha / palette conversions as every other input,
            # and an InputError naming the file if it is corrupt.
            img = read_image(self._paths[index], mode="RGB")
        else:
            img = self._arrays[index]
        if img.shape[:2] != (h, w):
            # DRAEM: cv2.resize(..., dsize=(W, H)) with the default bilinear interpolation.
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
        elif not self._paths:
            img = img.copy()  # never hand out (or cache) a view of the caller's array
        if self.cache_size:
            img.setflags(write=False)  # ops never write in place; this enforces it for cached data
            self._cache[key] = img
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return img

    def _apply(self, image: Image, rng: np.random.Generator) -> GeneratedDefect:
        if self.p_anomaly < 1.0 and rng.random() >= self.p_anomaly:
            return _normal(image, self.name, reason="p_anomaly")
        h, w = image.shape[:2]
        mask, mparams = perlin_mask_with_params(
            (h, w),
            rng,
            min_scale_exp=self.min_scale_exp,
            max_scale_exp=self.max_scale_exp,
            threshold=self.threshold,
            rotate=self.rotate,
            min_area_fraction=self.min_area_fraction,
        )
        n = self.num_sources
        source_index = int(rng.integers(n)) if n else None
        source = image if source_index is None else self._source(source_index, h, w)
        op_params: list[dict[str, Any]] = []
        for i in rng.choice(len(self.ops), size=self.num_ops, replace=False):
            source, p = PHOTOMETRIC_OPS[self.ops[int(i)]](source, rng)
            op_params.append(p)
        beta = float(rng.uniform(*self.beta_range))
        out = _blend(image, np.ascontiguousarray(source), mask, 1.0 - beta)
        return _result(
            out,
            mask,
            self.name,
            self.name,
            mask_params=mparams,
            beta=beta,
            source_opacity=1.0 - beta,
            ops=op_params,
            source_kind="folder" if self._paths else ("arrays" if self._arrays else "self"),
            source_index=source_index,
            source_path=str(self._paths[source_index]) if self._paths and source_index is not None else None,
        )


def _jitter_of(aug: CutPaste | CutPasteScar) -> dict[str, float]:
    return {
        "brightness": aug.brightness,
        "contrast": aug.contrast,
        "saturation": aug.saturation,
        "hue": aug.hue,
    }


def _cut_and_paste(
    image: Image, rng: np.random.Generator, ph: int, pw: int, jitter: dict[str, float]
) -> tuple[Image, dict[str, Any], tuple[int, int]]:
    """Cut a ``ph x pw`` patch at a random location and colour-jitter it; return (patch, params, origin)."""
    h, w = image.shape[:2]
    y0, x0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    patch, jparams = color_jitter(image[y0 : y0 + ph, x0 : x0 + pw], rng, **jitter)
    return patch, jparams, (y0, x0)


@dataclass
class CutPaste(Augmenter):
    """CutPaste (Li et al., CVPR 2021): a jittered rectangular patch pasted elsewhere in the image.

    Args:
        area_ratio: patch area as a fraction of the image area, drawn uniformly; default
            ``(0.02, 0.15)`` (paper).
        aspect_ratio: patch width/height, drawn log-uniformly; default ``(0.3, 3.3)`` (paper).
        brightness: colour-jitter brightness; default 0.1 (paper).
        contrast: colour-jitter contrast; default 0.1 (paper).
        saturation: colour-jitter saturation; default 0.1 (paper).
        hue: colour-jitter hue; default 0.1 (paper).

    The mask is the whole pasted rectangle. Patch sides are clipped to the image, which only
    matters for very elongated images.
    """

    name: ClassVar[str] = "cutpaste"

    area_ratio: tuple[float, float] = (0.02, 0.15)
    aspect_ratio: tuple[float, float] = (0.3, 3.3)
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.1

    def __post_init__(self) -> None:
        self.area_ratio = _check_range("area_ratio", self.area_ratio, 1e-9, 1.0)
        self.aspect_ratio = _check_range("aspect_ratio", self.aspect_ratio, 1e-3, 1e3)
        _check_jitter(
            brightness=self.brightness, contrast=self.contrast, saturation=self.saturation, hue=self.hue
        )

    def _apply(self, image: Image, rng: np.random.Generator) -> GeneratedDefect:
        h, w = image.shape[:2]
        area = float(rng.uniform(*self.area_ratio)) * h * w
        # Log-uniform aspect: as many wide as tall patches (the paper samples (0.3,1) U (1,3.3)).
        aspect = float(math.exp(rng.uniform(math.log(self.aspect_ratio[0]), math.log(self.aspect_ratio[1]))))
        pw = int(min(w, max(1, round(math.sqrt(area * aspect)))))
        ph = int(min(h, max(1, round(math.sqrt(area / aspect)))))
        patch, jparams, (cy, cx) = _cut_and_paste(image, rng, ph, pw, _jitter_of(self))
        py, px = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        out = image.copy()
        out[py : py + ph, px : px + pw] = patch
        mask = np.zeros((h, w), dtype=bool)
        mask[py : py + ph, px : px + pw] = True
        return _result(
            out,
            mask,
            self.name,
            self.name,
            patch_size=[ph, pw],
            area_ratio=ph * pw / (h * w),
            aspect_ratio=aspect,
            cut_origin=[cy, cx],
            paste_origin=[py, px],
            jitter=jparams,
        )


@dataclass
class CutPasteScar(Augmenter):
    """CutPaste-Scar (Li et al., CVPR 2021): a thin, long, rotated, jittered patch pasted elsewhere.

    Args:
        width_range: inclusive patch width range in pixels at ``reference_size``; default
            ``(2, 16)`` (paper).
        length_range: inclusive patch length (height) range in pixels at ``reference_size``;
            default ``(10, 25)`` (paper).
        rotation_range: rotation in degrees; default ``(-45, 45)`` (paper).
        reference_size: image side the pixel ranges refer to; they are multiplied by
            ``min(H, W) / reference_size``. Default 256 (the paper's training resolution); None
            uses the ranges as absolute pixels.
        brightness: colour-jitter brightness; default 0.1 (paper).
        contrast: colour-jitter contrast; default 0.1 (paper).
        saturation: colour-jitter saturation; default 0.1 (paper).
        hue: colour-jitter hue; default 0.1 (paper).

    The patch is rotated with nearest-neighbour sampling (PIL's default in the reference code),
    so pasted pixels are original patch pixels; the mask is exactly the pasted pixels.
    """

    name: ClassVar[str] = "scar"

    width_range: tuple[int, int] = (2, 16)
    length_range: tuple[int, int] = (10, 25)
    rotation_range: tuple[float, float] = (-45.0, 45.0)
    reference_size: int | None = 256
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.1

    def __post_init__(self) -> None:
        self.width_range = _check_range("width_range", self.width_range, 1, 1 << 20, integer=True)
        self.length_range = _check_range("length_range", self.length_range, 1, 1 << 20, integer=True)
        self.rotation_range = _check_range("rotation_range", self.rotation_range, -360.0, 360.0)
        if self.reference_size is not None and (
            not isinstance(self.reference_size, int) or self.reference_size < 1
        ):
            raise InputError(f"reference_size must be a positive int or None, got {self.reference_size!r}")
        _check_jitter(
            brightness=self.brightness, contrast=self.contrast, saturation=self.saturation, hue=self.hue
        )

    def _apply(self, image: Image, rng: np.random.Generator) -> GeneratedDefect:
        h, w = image.shape[:2]
        s = min(h, w) / self.reference_size if self.reference_size else 1.0
        pw = int(min(w, max(1, round(int(rng.integers(self.width_range[0], self.width_range[1] + 1)) * s))))
        ph = int(min(h, max(1, round(int(rng.integers(self.length_range[0], self.length_range[1] + 1)) * s))))
        patch, jparams, (cy, cx) = _cut_and_paste(image, rng, ph, pw, _jitter_of(self))
        angle = float(rng.uniform(*self.rotation_range))
        # Rotate into an expanded canvas that holds the whole rotated rectangle (PIL expand=True).
        rad = math.radians(angle)
        cos, sin = abs(math.cos(rad)), abs(math.sin(rad))
        nw = min(w, max(1, math.ceil(pw * cos + ph * sin)))
        nh = min(h, max(1, math.ceil(pw * sin + ph * cos)))
        m = cv2.getRotationMatrix2D(((pw - 1) * 0.5, (ph - 1) * 0.5), angle, 1.0)
        m[0, 2] += (nw - pw) * 0.5
        m[1, 2] += (nh - ph) * 0.5
        warp = {"flags": cv2.INTER_NEAREST, "borderMode": cv2.BORDER_CONSTANT, "borderValue": 0}
        rotated = cv2.warpAffine(patch, m, (nw, nh), **warp)
        alpha = cv2.warpAffine(np.ones((ph, pw), dtype=np.uint8), m, (nw, nh), **warp).view(np.bool_)
        if not alpha.any():  # only possible for a 1-pixel patch mapped off-grid; keep its centre
            alpha[nh // 2, nw // 2] = True
            rotated[nh // 2, nw // 2] = patch[ph // 2, pw // 2]
        py, px = int(rng.integers(0, h - nh + 1)), int(rng.integers(0, w - nw + 1))
        out = image.copy()
        np.copyto(out[py : py + nh, px : px + nw], rotated, where=alpha[..., None])
        mask = np.zeros((h, w), dtype=bool)
        mask[py : py + nh, px : px + nw] = alpha
        return _result(
            out,
            mask,
            self.name,
            self.name,
            patch_size=[ph, pw],
            size_scale=s,
            angle=angle,
            cut_origin=[cy, cx],
            paste_origin=[py, px],
            jitter=jparams,
        )


@dataclass
class CutPaste3Way(Augmenter):
    """CutPaste 3-way (Li et al., CVPR 2021): one of normal / cutpaste / scar per sample.

    ``params["label"]`` is ``"normal"`` (image unchanged, empty mask), ``"cutpaste"`` or
    ``"scar"``, and ``params["class_index"]`` is 0, 1 or 2 respectively (the paper's classes).

    Args:
        probabilities: probabilities of (normal, cutpaste, scar); default uniform (paper).
        cutpaste: the :class:`CutPaste` used for class 1; default paper settings.
        scar: the :class:`CutPasteScar` used for class 2; default paper settings.
    """

    name: ClassVar[str] = "cutpaste3way"
    CLASSES: ClassVar[tuple[str, str, str]] = ("normal", "cutpaste", "scar")

    probabilities: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    cutpaste: CutPaste = field(default_factory=CutPaste)
    scar: CutPasteScar = field(default_factory=CutPasteScar)

    def __post_init__(self) -> None:
        p = self.probabilities
        ok = (
            isinstance(p, tuple | list)
            and len(p) == 3
            and all(isinstance(v, int | float) and v >= 0 for v in p)
            and math.isclose(sum(p), 1.0, abs_tol=1e-6)
        )
        if not ok:
            raise InputError(f"probabilities must be 3 non-negative numbers summing to 1, got {p!r}")
        self.probabilities = (float(p[0]), float(p[1]), float(p[2]))

    def _apply(self, image: Image, rng: np.random.Generator) -> GeneratedDefect:
        k = int(rng.choice(3, p=self.probabilities))
        if k == 0:
            return _normal(image, self.name, class_index=0)
        inner = (self.cutpaste if k == 1 else self.scar)._apply(image, rng)
        return GeneratedDefect(inner.image, inner.mask, inner.defect_class,
                               {**inner.params, "augmenter": self.name, "class_index": k})


@dataclass(eq=False)
class PerlinBlend(Augmenter):
    """Fast Perlin-noise anomalies without an external texture (the ``perlin`` method of ``synth generate``).

    A DRAEM Perlin mask (:func:`synth.masks.perlin_mask`) is filled with a source and alpha-blended:

    * ``source="noise"`` (default): a grey Perlin-noise texture mapped to [0.25, 0.75] of the intensity range,
      as Anomalib's ``PerlinAnomalyGenerator`` does when it has no anomaly-source folder;
    * ``source="shade"``: the image itself darkened or brightened by a factor in ``shade_range`` (keeps the
      surface texture, like a stain or a burn).

    Args:
        source: ``"noise"`` or ``"shade"``.
        beta_range: weight of the original image inside the mask (DRAEM convention); default (0.0, 0.8).
        shade_range: multiplicative intensity factor range for ``source="shade"``; default (0.3, 1.7).
        min_scale_exp / max_scale_exp / threshold / rotate: Perlin mask parameters (DRAEM defaults).
    """

    name: ClassVar[str] = "perlin"

    source: str = "noise"
    beta_range: tuple[float, float] = (0.0, 0.8)
    shade_range: tuple[float, float] = (0.3, 1.7)
    min_scale_exp: int = 0
    max_scale_exp: int = 6
    threshold: float = 0.5
    rotate: bool = True

    def __post_init__(self) -> None:
        if self.source not in ("noise", "shade"):
            raise InputError(f"source must be 'noise' or 'shade', got {self.source!r}")
        check_perlin_params(self.min_scale_exp, self.max_scale_exp, self.threshold)
        self.beta_range = _check_range("beta_range", self.beta_range, 0.0, 1.0)
        self.shade_range = _check_range("shade_range", self.shade_range, 0.0, 4.0)

    def _apply(self, image: Image, rng: np.random.Generator) -> GeneratedDefect:
        h, w = image.shape[:2]
        mask, mparams = perlin_mask_with_params(
            (h, w), rng, min_scale_exp=self.min_scale_exp, max_scale_exp=self.max_scale_exp,
            threshold=self.threshold, rotate=self.rotate,
        )
        extra: dict[str, Any] = {}
        if self.source == "noise":
            cells = (int(2 ** rng.integers(self.min_scale_exp, self.max_scale_exp)),
                     int(2 ** rng.integers(self.min_scale_exp, self.max_scale_exp)))
            noise = perlin_noise((h, w), cells, rng)
            # Perlin noise lies in about [-0.7, 0.7]; map it to [0.25, 0.75] of the 8-bit range.
            grey = np.clip((noise * 0.5 / 1.4 + 0.5) * 255.0, 0, 255).astype(np.uint8)
            fill = cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)
            extra["noise_scale"] = list(cells)
        else:
            factor = float(rng.uniform(*self.shade_range))
            fill = cv2.convertScaleAbs(image, alpha=factor)
            extra["shade_factor"] = factor
        beta = float(rng.uniform(*self.beta_range))
        out = _blend(image, fill, mask, 1.0 - beta)
        return _result(out, mask, self.name, self.name, mask_params=mparams, beta=beta, source=self.source, **extra)


#: Name -> augmenter class; instantiate with keyword arguments, then call ``aug(image, rng)``.
AUGMENTERS: dict[str, type[Augmenter]] = {
    "perlin": PerlinBlend,
    "draem": DraemAugmenter,
    "cutpaste": CutPaste,
    "scar": CutPasteScar,
    "cutpaste3way": CutPaste3Way,
}


def _from_kwargs(cls: type[Augmenter]) -> Callable[..., Augmenter]:
    def build(**kwargs: Any) -> Augmenter:
        if cls is DraemAugmenter:
            kwargs.setdefault("p_anomaly", 1.0)  # a generator asked for a defect should add one
        return cls(**kwargs)

    return build


def _from_config(cls: type[Augmenter]) -> Callable[..., Callable[[Image, np.random.Generator], GeneratedDefect]]:
    def build(cfg: Any, skipped: list[str]) -> Callable[[Image, np.random.Generator], GeneratedDefect]:
        params = dict(cfg.method_params)
        if cls is DraemAugmenter and cfg.anomaly_source is not None:
            params.setdefault("anomaly_source", cfg.anomaly_source)
        try:
            augmenter = _from_kwargs(cls)(**params)
        except (TypeError, ValueError) as exc:
            raise method_params_error(cfg.method, cls, exc) from None
        # The samples carry the user's class name (default: the method), except CutPaste-3way's own two classes.
        default_class = cfg.defect_class or cls.name

        def augment(image: Image, rng: np.random.Generator) -> GeneratedDefect:
            result = augmenter(image, rng)
            label = result.label if cls is CutPaste3Way else None
            return GeneratedDefect(result.image, result.mask, str(label or default_class), result.params)

        return augment

    return build


for _cls in AUGMENTERS.values():
    register_generator(_cls.name, from_config=_from_config(_cls), from_kwargs=_from_kwargs(_cls),
                       summary=(_cls.__doc__ or "").strip().splitlines()[0])
