"""Small helpers shared by test modules (importable as ``helpers``: pytest puts this folder on sys.path)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from detect.data import resize_mask


def tree_digest(root: Path, *, skip: Callable[[Path], bool] | None = None) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path (files for which ``skip`` is true left out)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not (skip and skip(p))}


def split_of(dataset: Any, size: int) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """The test split of a defect set: image paths, labels and (size, size) masks (all False for normals)."""
    samples = dataset.select(split="test")
    paths = [dataset.image_path(s) for s in samples]
    labels = np.array([s.is_anomalous for s in samples])
    masks = np.stack([resize_mask(dataset.load_mask(s), size) if s.is_anomalous else np.zeros((size, size), bool)
                      for s in samples])
    return paths, labels, masks


def magnetic_tile_probe(root: Path, size: int) -> tuple[list[Path], list[Path], np.ndarray, np.ndarray]:
    """The real-defect check of the model tests: the first 30 train/good images as shots, then 30 test/good
    images and 30 real defects (the first 6 of each class, sorted) with their labels and (size, size) masks."""
    from synth.core.io import read_image

    train = sorted((root / "train" / "good").iterdir())[:30]
    good = sorted((root / "test" / "good").iterdir())[:30]
    bad = [p for c in ("blowhole", "break", "crack", "fray", "uneven")
           for p in sorted((root / "test" / c).iterdir())[:6]]
    masks = np.stack([np.zeros((size, size), bool)] * len(good) + [
        resize_mask(read_image(root / "ground_truth" / p.parent.name / f"{p.stem}_mask.png")[..., 0] > 127, size)
        for p in bad])
    return train, good + bad, np.array([False] * len(good) + [True] * len(bad)), masks


# The tiny random open_clip architecture of the WinCLIP tests (ViT width 64, 2 layers, patch 8 at 64 px: an 8x8
# patch grid; text tower width 32, 2 layers, 32 tokens), written to a model-config JSON by the tests.
WINCLIP_TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
