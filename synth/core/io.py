"""Image and mask I/O with clear errors, documented conversions and atomic writes.

Conversions applied by :func:`read_image` (documented so users know what the models see):

- 16-bit and 32-bit integer images are scaled to 8 bits by their dtype range (``value / 257`` for 16-bit).
- Grayscale images are replicated to three channels when ``mode="RGB"``.
- RGBA / LA images: the alpha channel is dropped (the colour values are kept as stored).
- Palette images are expanded to RGB.
- Images with more than ``max_pixels`` pixels are refused (default 8192 x 8192) instead of exhausting memory;
  pass a larger limit or downscale the file first.

Masks (:func:`read_mask`): any single- or multi-channel image; a pixel is a defect when its grayscale
value is ``> 0`` for masks stored as 0/1 and ``>= 128`` otherwise
(so JPEG-compressed 0/255 masks still binarise cleanly).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from synth.core.errors import InputError


def stable_hash(obj: object, digits: int = 64) -> str:
    """The first ``digits`` hex digits of the sha256 of ``obj`` as sorted JSON (``str`` for what JSON cannot hold):
    a cache key that does not move between runs or machines."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:digits]


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_MAX_PIXELS = 8192 * 8192

# We enforce our own limit with a clear message; PIL's bomb check would raise a less helpful error first.
Image.MAX_IMAGE_PIXELS = None


def is_image_file(path: Path) -> bool:
    """True when ``path`` has one of the supported image extensions (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | Path, *, recursive: bool = False, allow_empty: bool = False) -> list[Path]:
    """Sorted image files in ``folder``; a missing folder (or an empty one, unless allowed) is an error."""
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{folder}: folder not found; check the path.")
    if not folder.is_dir():
        raise InputError(f"{folder}: expected a folder of images, got a file.")
    pattern = "**/*" if recursive else "*"
    files = sorted(p for p in folder.glob(pattern) if p.is_file() and is_image_file(p))
    if not files and not allow_empty:
        # A folder of class subfolders (e.g. test/ of MVTec) is a common mistake: say where the images are.
        subfolders = [] if recursive else sorted(p.name for p in folder.iterdir() if p.is_dir())
        hint = (f"; subfolders are not searched: pass them instead ({', '.join(subfolders[:5])}"
                f"{', ...' if len(subfolders) > 5 else ''})" if subfolders else "")
        raise InputError(
            f"{folder}: no images found (supported extensions: {', '.join(IMAGE_EXTENSIONS)}){hint}."
        )
    return files


def _open_checked(path: Path, max_pixels: int) -> Image.Image:
    if not path.exists():
        raise InputError(f"{path}: file not found; check the path.")
    if path.is_dir():
        raise InputError(f"{path}: expected an image file, got a folder.")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty (0 bytes); re-export the image or remove it.")
    try:
        img = Image.open(path)
        width, height = img.size
        if width * height > max_pixels:
            raise InputError(
                f"{path}: image is {width}x{height} = {width * height} pixels, above the limit of "
                f"{max_pixels}; downscale it first or raise max_pixels."
            )
        img.load()
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(
            f"{path}: cannot decode image (corrupt, truncated or not an image: {exc}); "
            "re-export or remove it."
        ) from exc
    return img


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        # Scale by the dtype's range, not the image's max, so two 16-bit images stay comparable.
        info = np.iinfo(arr.dtype)
        if arr.max(initial=0) <= 255 and info.max > 65535:
            # PIL decodes 8/16-bit grayscale TIFF/PNG as int32 "I" mode; values that fit 8 bits stay as is.
            return arr.astype(np.uint8)
        scale = 65535 if info.max > 65535 else info.max
        return np.clip(arr.astype(np.float64) * (255.0 / scale), 0, 255).round().astype(np.uint8)
    # Float images: assume [0, 1] when they fit, else [0, 255].
    arr = arr.astype(np.float64)
    if arr.max(initial=0) <= 1.0:
        arr = arr * 255.0
    return np.clip(arr, 0, 255).round().astype(np.uint8)


def pil_to_array(img: Image.Image, mode: str = "RGB", *, source: str = "image") -> np.ndarray:
    """Convert a PIL image to uint8 ``HxWx3`` (``mode="RGB"``) or ``HxW`` (``mode="L"``)."""
    if mode not in ("RGB", "L"):
        raise InputError(f"{source}: unsupported mode {mode!r}; use 'RGB' or 'L'.")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = _to_uint8(np.asarray(img))
        img = Image.fromarray(arr, mode="L")
    elif img.mode in ("RGBA", "LA", "P", "PA", "CMYK", "YCbCr", "HSV", "1", "LAB", "RGBX"):
        img = img.convert("RGB" if img.mode not in ("LA", "1") else "L")
    arr = np.asarray(img.convert(mode))
    return np.ascontiguousarray(arr)


def read_image(path: str | Path, mode: str = "RGB", *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as uint8 ``HxWx3`` RGB (or ``HxW`` for ``mode="L"``) with clear errors.

    Raises :class:`InputError` naming the file for a missing, empty, corrupt, truncated or oversized file.
    """
    path = Path(path)
    img = _open_checked(path, max_pixels)
    return pil_to_array(img, mode, source=str(path))


def binarize_mask(arr: np.ndarray) -> np.ndarray:
    """Binarise a mask array (see module docstring for the rule); multi-channel masks use their maximum."""
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if arr.dtype == bool:
        return arr.copy()
    arr = _to_uint8(arr) if arr.dtype != np.uint8 else arr
    if arr.max(initial=0) <= 1:
        return arr > 0
    return arr >= 128


def read_mask(
    path: str | Path,
    *,
    shape: tuple[int, int] | None = None,
    image_path: str | Path | None = None,
    allow_empty: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Read a defect mask as bool ``HxW``.

    ``shape`` (height, width) is the expected size, usually that of the image the mask belongs to
    (``image_path`` is only used to name that image in the error).
    ``allow_empty=False`` refuses all-zero masks.
    """
    path = Path(path)
    img = _open_checked(path, max_pixels)
    arr = np.asarray(img)
    if img.mode == "P":
        arr = np.asarray(img.convert("L"))
    mask = binarize_mask(arr)
    if shape is not None and tuple(mask.shape) != tuple(shape[:2]):
        other = f" of image {image_path}" if image_path is not None else ""
        raise InputError(
            f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but the size{other} is "
            f"{shape[1]}x{shape[0]}; masks must match their image pixel for pixel — re-export the mask at "
            f"the image's size."
        )
    if not allow_empty and not mask.any():
        raise InputError(f"{path}: mask is empty (no defect pixel); draw the defect or remove the mask.")
    return mask


def durable_writes() -> bool:
    """Whether writes are fsynced (``PIXELVISION_FSYNC=1``).

    Atomic rename alone makes every file complete-or-absent when a process is killed (the page cache
    survives a process); fsync is only needed to survive a power loss or kernel crash, and costs ~10x
    in write throughput on small PNGs, so it is opt-in.
    """
    return os.environ.get("PIXELVISION_FSYNC", "0").lower() in ("1", "true", "yes", "on")


def _atomic_write_bytes(path: Path, write: Callable[[object], object]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except (FileExistsError, NotADirectoryError) as exc:
        # An output folder given as (or inside) an existing file: a user error, not a crash.
        raise InputError(f"{path.parent}: cannot create the output folder, a file is in the way ({exc.strerror}: "
                         f"{exc.filename}); choose a folder for the output.") from None
    except PermissionError as exc:
        raise InputError(f"{path.parent}: cannot write there ({exc.strerror}); choose a writable output "
                         f"folder.") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            if durable_writes():
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# PNG zlib level of every image the toolkit writes (0-9; lossless at every level). Measured on one 500x1263
# grayscale KolektorSDD photo (2 cores): level 1 encodes in 18 ms (PIL's default level 6: 146 ms) for a file 14 %
# larger than PIL's; level 0 is 10 ms but 2.4x the bytes; level 3: 33 ms, 9 % smaller than level 1.
DEFAULT_PNG_COMPRESSION = 1
# PNG row filter of encode_png: "up" (each row minus the row above) instead of libpng's adaptive choice per row.
# Measured at level 1 (10 encodes each, one ad-hoc timing, 2 cores): KolektorSDD gray 14.1 -> 8.8 ms (+1 % bytes),
# 512 px RGB coffee 19.7 -> 13.8 ms (+4 %), a 500x2500 heat-map overlay 77 -> 49 ms (-4 %). Lossless like every
# filter.


def smallest_lossless_mode(image: np.ndarray) -> np.ndarray:
    """``HxW`` when the three channels of an ``HxWx3`` image are equal (a grayscale photo read as RGB), else as is.

    Readers replicate grayscale to RGB, so writing such an image with one channel is lossless and a third of the
    bytes: a grayscale input stays grayscale in the generated set, as in MVTec's grayscale categories.
    """
    if image.ndim == 3 and is_grayscale(image):
        return np.ascontiguousarray(image[..., 0])
    return image


def is_grayscale(image: np.ndarray) -> bool:
    """True for ``HxW`` images and ``HxWx3`` images whose three channels are equal (grayscale read as RGB)."""
    return image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3 and np.array_equal(image[..., 0], image[..., 1])
                               and np.array_equal(image[..., 0], image[..., 2]))


def in_mode_of(image: np.ndarray, source: np.ndarray) -> np.ndarray:
    """``image`` in the mode of the photo it was made from: its luma (ITU-R 601, OpenCV) when ``source`` is
    grayscale, so a defect generated on a grayscale camera's image carries no colour it could not have; unchanged
    otherwise. Gray pixels keep their exact value (the luma weights sum to one in OpenCV's fixed point)."""
    import cv2

    if image.ndim == 3 and image.shape[2] == 3 and is_grayscale(source) and not is_grayscale(image):
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return image


def encode_png(array: np.ndarray, compression: int = DEFAULT_PNG_COMPRESSION) -> bytes:
    """PNG bytes of uint8 ``HxW`` (grayscale) or ``HxWx3`` (RGB) at zlib level ``compression`` (OpenCV's libpng:
    deterministic bytes for the same pixels and level, 4-8x faster than PIL at its default level)."""
    import cv2

    if not 0 <= compression <= 9:
        raise InputError(f"PNG compression must be 0-9 (zlib level), got {compression}.")
    pixels = array if array.ndim == 2 else cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_PNG_COMPRESSION, int(compression)]
    if hasattr(cv2, "IMWRITE_PNG_FILTER"):  # older OpenCV builds lack the flag: libpng's adaptive filter
        params += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP]
    ok, encoded = cv2.imencode(".png", pixels, params)
    if not ok:
        raise InputError(f"could not encode an image of shape {array.shape} as PNG.")
    return encoded.tobytes()


def write_image(path: str | Path, array: np.ndarray, *, png_compression: int = DEFAULT_PNG_COMPRESSION) -> None:
    """Write uint8 ``HxW``/``HxWx3`` (or bool mask, stored 0/255) atomically; format from the extension.

    PNG goes through :func:`encode_png` at zlib level ``png_compression``; other formats through PIL.
    """
    path = Path(path)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        raise InputError(f"{path}: refusing to write dtype {array.dtype}; convert to uint8 first.")
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"{path}: unknown image extension; use .png (lossless) or .jpg.")
    if fmt == "PNG" and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        data = encode_png(array, png_compression)
        _atomic_write_bytes(path, lambda handle: handle.write(data))
        return
    img = Image.fromarray(array)
    _atomic_write_bytes(path, lambda handle: img.save(handle, format=fmt))


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write bytes atomically (temporary file in the same folder, rename; fsync if durable_writes())."""
    _atomic_write_bytes(Path(path), lambda handle: handle.write(data))


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (temporary file in the same folder, rename; fsync if durable_writes())."""
    _atomic_write_bytes(Path(path), lambda handle: handle.write(text.encode("utf-8")))


def write_json(path: str | Path, obj: object) -> None:
    """Write JSON atomically with sorted keys (stable bytes for the same content)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def copy_file(src: str | Path, dst: str | Path) -> None:
    """Copy a file's bytes atomically."""
    data = Path(src).read_bytes()
    _atomic_write_bytes(Path(dst), lambda handle: handle.write(data))


def ensure_rgb_uint8(image: np.ndarray, *, source: str = "image") -> np.ndarray:
    """Validate an in-memory image; grayscale ``HxW``/``HxWx1`` and RGBA are converted, others refused."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"{source}: expected a numpy array, got {type(image).__name__}.")
    if image.dtype != np.uint8:
        image = _to_uint8(image)
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 4:
        return np.ascontiguousarray(image[:, :, :3])
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise InputError(f"{source}: expected an HxW, HxWx1, HxWx3 or HxWx4 image, got shape {image.shape}.")


def iter_paths(values: Iterable[str | Path]) -> list[Path]:
    """Expand a mix of image files and folders into a sorted list of image paths."""
    out: list[Path] = []
    for value in values:
        path = Path(value)
        if path.is_dir():
            out.extend(list_images(path))
        elif path.exists():
            out.append(path)
        else:
            raise InputError(f"{path}: file or folder not found; check the path.")
    return out


def read_json_if_exists(path: str | Path) -> object | None:
    """Parsed JSON of ``path``, or None when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: invalid JSON ({exc}); delete the file to regenerate it.") from exc
