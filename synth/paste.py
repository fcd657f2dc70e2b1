"""Method ``paste``: real defect masks (and their images) deformed and placed on normal images by
:class:`synth.placement.MaskGuidedPlacer`, and the readers of the masks / defects folders every
exemplar-based generator shares (paste, ControlNet, CSM).

Registered twice over one placer: ``synth generate --method paste --masks DIR [--defects DIR]`` and, by name,
the transforms (``make_generator("paste", exemplars=[...] | masks=DIR, **placer_kwargs)``), where an
unplaceable defect passes the image through with an empty mask instead of stopping a training loop.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from synth.core.defect_set import MASK_SUFFIX
from synth.core.errors import InputError
from synth.core.io import ensure_rgb_uint8, list_images, read_image, read_mask
from synth.generators import GeneratedDefect, method_params_error, register_generator
from synth.placement import DefectExemplar, MaskGuidedPlacer, PlacementError

if TYPE_CHECKING:
    from synth.config import GenerateConfig

logger = logging.getLogger(__name__)


def _mask_stem(path: Path) -> str:
    return path.stem[: -len(MASK_SUFFIX)] if path.stem.endswith(MASK_SUFFIX) else path.stem


def _find_defect_image(defects: Path, defect_class: str | None, stem: str) -> Path | None:
    folders = [defects / defect_class, defects] if defect_class else [defects]
    for folder in folders:
        if folder.is_dir():
            for candidate in sorted(folder.glob(f"{stem}.*")):
                if candidate.is_file():
                    return candidate
    return None


def load_exemplars(masks: Path, defects: Path | None, *, strict: bool = False,
                   skipped: list[str] | None = None) -> list:
    """Real defect masks (and their images) as placement exemplars.

    ``masks`` holds ``<class>/<name>.png`` (or ``<name>_mask.png``, MVTec's ground_truth layout) or flat
    ``<name>.png`` files (class ``defect``). ``defects`` holds the matching defect images, ``<class>/<name>.*``
    or flat. All-zero masks are skipped with a warning (an error with ``strict``); none left is an error.
    """
    if not masks.is_dir():
        what = "expected a folder of masks, got a file" if masks.exists() else "masks folder not found"
        raise InputError(f"{masks}: {what}; pass --masks DIR with <class>/<name>.png masks.")
    class_dirs = sorted(p for p in masks.iterdir() if p.is_dir())
    entries: list[tuple[str, Path]] = []
    for class_dir in class_dirs:
        entries += [(class_dir.name, p) for p in list_images(class_dir, allow_empty=True)]
    entries += [("defect", p) for p in list_images(masks, allow_empty=True)]
    if not entries:
        raise InputError(f"{masks}: no mask images found; expected <class>/<name>.png files.")
    skipped = skipped if skipped is not None else []
    exemplars = []
    for defect_class, mask_path in entries:
        image = None
        image_path = None
        if defects is not None:
            image_path = _find_defect_image(defects, defect_class if defect_class != "defect" else None,
                                            _mask_stem(mask_path))
            if image_path is None:
                raise InputError(f"{mask_path}: no defect image named {_mask_stem(mask_path)}.* under {defects}; "
                                 f"the masks and --defects images must share names.")
            image = read_image(image_path)
        mask = read_mask(mask_path, shape=None if image is None else image.shape[:2], image_path=image_path)
        if not mask.any():
            if strict:
                raise InputError(f"{mask_path}: mask is empty (no defect pixel); fix or remove it.")
            logger.warning("%s: empty mask skipped", mask_path)
            skipped.append(f"{mask_path}: empty mask")
            continue
        exemplars.append(DefectExemplar(mask=mask, image=image, defect_class=defect_class, source=str(mask_path)))
    if not exemplars:
        raise InputError(f"{masks}: every mask is empty (all-zero); masks must mark defect pixels with 255.")
    return exemplars


def _as_exemplar(item: Any, index: int) -> DefectExemplar:
    """A DefectExemplar from a DefectExemplar or an ``(image, mask[, class])`` tuple (named ``exemplars[i]``)."""
    if isinstance(item, DefectExemplar):
        return item
    name = f"exemplars[{index}]"
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        raise InputError(f"{name} must be a DefectExemplar or an (image, mask) / (image, mask, class) tuple, "
                         f"got {type(item).__name__}; image may be None for masks only")
    image, mask = item[0], item[1]
    defect_class = item[2] if len(item) == 3 else "defect"
    if not isinstance(mask, np.ndarray) or mask.ndim not in (2, 3) or (mask.ndim == 3 and mask.shape[2] != 1):
        got = f"shape {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise InputError(f"{name}: mask must be an HxW array (True / non-zero = defect), got {got}")
    mask = mask.reshape(mask.shape[:2])
    if mask.dtype != np.bool_:
        mask = mask > 0
    if image is not None:
        image = ensure_rgb_uint8(image, source=f"{name} image")
    return DefectExemplar(mask=mask, image=image, defect_class=defect_class, source=name)


@dataclass
class PasteGenerator:
    """Method paste in ``synth generate``; keeps the placer so ``normal_match: exemplar`` can read its exemplars."""

    placer: MaskGuidedPlacer

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> GeneratedDefect:
        return self.placer(image, rng)


def paste_from_config(cfg: GenerateConfig, skipped: list[str]) -> PasteGenerator:
    if cfg.masks is None:
        raise InputError("method 'paste' needs real defect masks: pass --masks DIR.")
    if cfg.blend in ("poisson", "texture") and cfg.defects is None:
        raise InputError(f"blend '{cfg.blend}' copies real defect appearance: pass --defects DIR "
                         f"with the images the masks belong to, or use --blend alpha.")
    exemplars = load_exemplars(cfg.masks, cfg.defects, strict=cfg.strict, skipped=skipped)
    try:
        placer = MaskGuidedPlacer(exemplars, blend_mode=cfg.blend, foreground=cfg.foreground, **cfg.method_params)
    except (TypeError, ValueError) as exc:
        raise method_params_error(cfg.method, MaskGuidedPlacer, exc) from None
    return PasteGenerator(placer)


def paste_from_kwargs(exemplars: Sequence[Any] | None = None, masks: str | Path | None = None,
                      defects: str | Path | None = None, **placer_kwargs: Any) -> Any:
    """The paste transform: ``exemplars`` and/or ``masks=DIR`` (+ ``defects=DIR``), the rest for the placer."""
    items = [] if exemplars is None else exemplars
    if not isinstance(items, (list, tuple)):
        raise InputError(f"generator 'paste': exemplars must be a list, got {type(items).__name__}")
    loaded = [_as_exemplar(item, i) for i, item in enumerate(items)]
    if masks is not None:
        loaded += load_exemplars(Path(masks), None if defects is None else Path(defects))
    elif defects is not None:
        raise InputError("generator 'paste': defects=DIR needs masks=DIR with the matching masks")
    if not loaded:
        raise InputError("generator 'paste' needs real defects: pass exemplars=[(image, mask, class), ...] "
                         "or masks=DIR (and defects=DIR for the images)")
    try:
        placer = MaskGuidedPlacer(loaded, **placer_kwargs)
    except TypeError as exc:  # an unknown keyword: say which ones exist
        valid = ", ".join(["exemplars", "masks", "defects",
                           *(k for k in inspect.signature(MaskGuidedPlacer).parameters if k != "exemplars")])
        raise InputError(f"generator 'paste': {exc}; valid keywords: {valid}") from None

    def paste(image: np.ndarray, rng: np.random.Generator) -> GeneratedDefect:
        try:
            return placer(image, rng)
        except PlacementError as exc:
            # An unplaceable defect (tiny crop, small object) is a skipped augmentation, not a training crash:
            # the image unchanged and an empty mask.
            return GeneratedDefect(image.copy(), np.zeros(image.shape[:2], bool), "good",
                                   {"placement_failed": str(exc)})

    return paste


register_generator("paste", from_config=paste_from_config, from_kwargs=paste_from_kwargs, needs_masks=True,
                   summary="real defect masks deformed and placed on normal images")
