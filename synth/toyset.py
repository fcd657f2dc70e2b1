"""A tiny real-image defect set for tests and demos, made offline from scikit-image's bundled photos.

Normal images are random crops of a real texture photo (``skimage.data.brick``, ``grass`` or ``gravel``).
Defects are planted by a simple, known procedure so tests can check what models and generators learn:

- ``spot``: a filled ellipse (semi-axes 8-22 % of the crop side) darkened to 45 % of its intensity.
- ``scratch``: a straight line 2-3 px wide across 40-80 % of the crop, brightened to near white (+120).

The mask is exactly the set of pixels changed by the procedure.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from synth.core.defect_set import DefectSet, DefectSetWriter
from synth.core.errors import InputError

TEXTURES = ("brick", "grass", "gravel")
PLANTED_CLASSES = ("spot", "scratch")


def load_texture(name: str) -> np.ndarray:
    """A bundled scikit-image texture photo as uint8 HxWx3."""
    if name not in TEXTURES:
        raise InputError(f"unknown texture {name!r}; choose one of {TEXTURES}.")
    import skimage.data

    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def random_crop(texture: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    h, w = texture.shape[:2]
    if size > min(h, w):
        raise InputError(f"crop size {size} exceeds the texture size {w}x{h}.")
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return texture[top:top + size, left:left + size].copy()


def plant_defect(image: np.ndarray, defect_class: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Plant one defect of a known class; returns (image, bool mask of changed pixels)."""
    size = image.shape[0]
    canvas = np.zeros(image.shape[:2], dtype=np.uint8)
    if defect_class == "spot":
        axes = (int(rng.uniform(0.08, 0.22) * size), int(rng.uniform(0.08, 0.22) * size))
        center = (int(rng.integers(axes[0], size - axes[0])), int(rng.integers(axes[1], size - axes[1])))
        cv2.ellipse(canvas, center, axes, float(rng.uniform(0, 180)), 0, 360, 255, thickness=-1)
        mask = canvas > 0
        out = image.copy()
        out[mask] = (out[mask].astype(np.float32) * 0.45).astype(np.uint8)
    elif defect_class == "scratch":
        length = rng.uniform(0.4, 0.8) * size
        angle = rng.uniform(0, np.pi)
        cx, cy = rng.uniform(0.3, 0.7, size=2) * size
        dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
        p1 = (int(cx - dx), int(cy - dy))
        p2 = (int(cx + dx), int(cy + dy))
        cv2.line(canvas, p1, p2, 255, thickness=int(rng.integers(2, 4)))
        mask = canvas > 0
        out = image.copy()
        out[mask] = np.clip(out[mask].astype(np.int16) + 120, 0, 255).astype(np.uint8)
    else:
        raise InputError(f"unknown planted defect class {defect_class!r}; choose one of {PLANTED_CLASSES}.")
    # Pixels that were already saturated do not change; keep the mask equal to the changed region's support.
    return out, mask


def make_texture_defect_set(
    root: str | Path,
    *,
    texture: str = "brick",
    size: int = 64,
    n_train: int = 16,
    n_test_good: int = 8,
    n_test_per_class: int = 8,
    classes: tuple[str, ...] = PLANTED_CLASSES,
    seed: int = 0,
) -> DefectSet:
    """Write a small MVTec-layout defect set of real texture crops with planted defects; returns it.

    Deterministic for a given seed. Takes well under a second for the defaults.
    """
    # Planted defects need a few pixels of room (spots are 8-22 % of the side); smaller crops cannot hold one.
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise InputError(f"size {size!r}: must be an integer >= 16 (pixels per side; default 64).")
    for key, value in (("n_train", n_train), ("n_test_good", n_test_good), ("n_test_per_class", n_test_per_class)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"{key} {value!r}: must be an integer >= 0.")
    if n_train + n_test_good + n_test_per_class == 0:
        raise InputError("n_train, n_test_good and n_test_per_class are all 0: the set would be empty.")
    rng = np.random.default_rng(seed)
    photo = load_texture(texture)
    writer = DefectSetWriter(root)
    for i in range(n_train):
        writer.add(random_crop(photo, size, rng), name=f"{texture}_{i:03d}", split="train")
    for i in range(n_test_good):
        writer.add(random_crop(photo, size, rng), name=f"{texture}_good_{i:03d}", split="test")
    for defect_class in classes:
        for i in range(n_test_per_class):
            image, mask = plant_defect(random_crop(photo, size, rng), defect_class, rng)
            writer.add(image, name=f"{texture}_{defect_class}_{i:03d}", split="test", defect_class=defect_class,
                       mask=mask, generator="toyset", params={"texture": texture, "procedure": defect_class},
                       seed=seed)
    return writer.finalize({"generator": "synth.toyset", "texture": texture, "seed": seed})


def write_generation_inputs(root: str | Path, *, seed: int = 0, n_normals: int = 8, gray: bool = False) -> Path:
    """What ``synth generate`` reads, from real textures: ``root/normal`` (``n_normals`` 96 px brick crops, one
    channel when ``gray``) and 2 spot + 2 scratch exemplars on gravel (``root/defects/<class>``, ``root/masks``).

    Deterministic for a given seed; returns ``root``.
    """
    from synth.core.io import write_image

    root = Path(root)
    rng = np.random.default_rng(seed)
    brick, gravel = load_texture("brick"), load_texture("gravel")
    for i in range(n_normals):
        crop = random_crop(brick, 96, rng)
        write_image(root / "normal" / f"n{i}.png", crop[..., 0] if gray else crop)
    for defect_class in ("spot", "scratch"):
        for i in range(2):
            image, mask = plant_defect(random_crop(gravel, 80, rng), defect_class, rng)
            write_image(root / "defects" / defect_class / f"{defect_class}{i}.png", image)
            write_image(root / "masks" / defect_class / f"{defect_class}{i}_mask.png", mask)
    return root
