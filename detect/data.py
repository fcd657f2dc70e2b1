"""Turning user inputs (a defect set, a folder, file paths, arrays) into model-ready batches.

Every image is resized to the model's square input size (``image_size``, default 256) with area
interpolation, whatever its original size or aspect ratio, like Anomalib's default pre-processing;
anomaly maps come back at that size and :func:`resize_map` maps them to an original image's size.
Grayscale, RGBA and 16-bit images are converted by :func:`synth.core.io.read_image`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from synth.core.defect_set import DefectSet, read_defect_set
from synth.core.errors import InputError
from synth.core.io import ensure_rgb_uint8, list_images, read_image

ImageInput = str | Path | np.ndarray


def resolve_images(data: DefectSet | str | Path | Sequence[ImageInput], *, split: str = "train",
                   anomalous: bool | None = False) -> list[ImageInput]:
    """Images to use: ``train/good`` of a defect set or MVTec folder, all images of a plain folder, or a list."""
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.exists():
            raise InputError(f"{path}: not found; pass a defect-set folder, an image folder or image files.")
        if path.is_dir() and ((path / "train").is_dir() or (path / "test").is_dir()
                              or (path / "manifest.jsonl").exists()):
            data = read_defect_set(path)
        elif path.is_dir():
            return list(list_images(path))
        else:
            return [path]
    if isinstance(data, DefectSet):
        samples = data.select(split=split, anomalous=anomalous)
        if not samples:
            raise InputError(f"{data.root}: no {'normal ' if anomalous is False else ''}images in split "
                             f"'{split}'; a detector trains on {split}/good/.")
        return [data.image_path(s) for s in samples]
    items = list(data)
    if not items:
        raise InputError("no images given: pass at least one training image.")
    return items


def load_rgb(item: ImageInput) -> np.ndarray:
    """An input (path or array) as uint8 HxWx3."""
    if isinstance(item, np.ndarray):
        return ensure_rgb_uint8(item)
    return read_image(item)


def to_tensor(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """uint8 HxWx3 images -> float tensor (N, 3, size, size) in [0, 1]."""
    resized = [
        image if image.shape[:2] == (size, size) else cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        for image in images
    ]
    array = np.stack(resized).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def iter_batches(items: Iterable[ImageInput], size: int, batch_size: int = 16
                 ) -> Iterator[tuple[torch.Tensor, list[tuple[int, int]]]]:
    """Stream (batch tensor, original (H, W) sizes) without holding every image in memory."""
    batch: list[np.ndarray] = []
    shapes: list[tuple[int, int]] = []
    for item in items:
        image = load_rgb(item)
        batch.append(image)
        shapes.append(image.shape[:2])
        if len(batch) == batch_size:
            yield to_tensor(batch, size), shapes
            batch, shapes = [], []
    if batch:
        yield to_tensor(batch, size), shapes


def load_tensor(items: Sequence[ImageInput], size: int) -> torch.Tensor:
    """All ``items`` as one tensor (N, 3, size, size); for training sets that fit in memory."""
    return torch.cat([batch for batch, _ in iter_batches(items, size, batch_size=64)]) if items else torch.empty(0)


def resize_map(anomaly_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize an anomaly map (H, W) to an original image size (bilinear)."""
    if anomaly_map.shape == tuple(shape):
        return anomaly_map
    return cv2.resize(anomaly_map.astype(np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a bool mask to the model input size (nearest neighbour keeps it binary)."""
    if mask.shape == (size, size):
        return mask
    return cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)
