"""The labeled defect set: MVTec AD folder layout plus a JSON-lines manifest.

Layout (readable by Anomalib's ``Folder``/``MVTecAD`` datamodules)::

    ROOT/train/good/<name>.<ext>                 normal training images
    ROOT/test/good/<name>.<ext>                  normal test images
    ROOT/test/<defect_class>/<name>.png          defect images
    ROOT/ground_truth/<defect_class>/<name>_mask.png   binary 0/255 masks, same size as the image
    ROOT/manifest.jsonl                          one JSON object per sample (see ``DefectSample``)
    ROOT/dataset_info.json                       classes and counts (written by ``DefectSetWriter.finalize``)

The manifest is optional when *reading*: a plain MVTec-layout folder (such as a real dataset) is scanned.
When present it is the source of truth and carries what the folders cannot: the generator, its parameters,
the per-sample seed, the source image and optional filter scores. Manifest paths are relative to ROOT and may
not point outside it.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from synth.core.errors import InputError
from synth.core.io import (
    DEFAULT_PNG_COMPRESSION,
    copy_file,
    durable_writes,
    is_image_file,
    list_images,
    read_image,
    read_mask,
    smallest_lossless_mode,
    write_image,
    write_json,
    write_text,
)

logger = logging.getLogger(__name__)

GOOD = "good"
SPLITS = ("train", "test")
MANIFEST_NAME = "manifest.jsonl"
INFO_NAME = "dataset_info.json"
MASK_SUFFIX = "_mask"


@dataclass
class DefectSample:
    """One row of the manifest. Paths are POSIX paths relative to the dataset root."""

    image: str
    split: str
    defect_class: str = GOOD
    mask: str | None = None
    generator: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    source_image: str | None = None
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def is_anomalous(self) -> bool:
        return self.defect_class != GOOD

    @property
    def name(self) -> str:
        return PurePosixPath(self.image).stem

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any], *, where: str) -> DefectSample:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(row) - known
        if unknown:
            raise InputError(f"{where}: unknown manifest field(s) {sorted(unknown)}; expected {sorted(known)}.")
        for key in ("image", "split"):
            if not isinstance(row.get(key), str):
                raise InputError(f"{where}: manifest row needs a string {key!r}.")
        sample = cls(**row)
        if sample.split not in SPLITS:
            raise InputError(f"{where}: split {sample.split!r} is not one of {SPLITS}.")
        return sample


def _safe_relative(root: Path, rel: str, *, where: str) -> Path:
    """Resolve a manifest path and refuse anything outside the dataset root (absolute or ``..``)."""
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or rel.startswith(("/", "\\")) or ":" in pure.parts[0]:
        raise InputError(f"{where}: path {rel!r} points outside the dataset root; manifest paths must be relative.")
    full = (root / Path(*pure.parts)).resolve()
    if os.path.commonpath([full, root.resolve()]) != str(root.resolve()):
        raise InputError(f"{where}: path {rel!r} resolves outside the dataset root (symlink?).")
    return full


class DefectSet:
    """A labeled defect set in memory: a root folder and its samples (see module docstring)."""

    def __init__(self, root: str | Path, samples: list[DefectSample]):
        self.root = Path(root)
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[DefectSample]:
        return iter(self.samples)

    def __repr__(self) -> str:
        counts = Counter((s.split, s.defect_class) for s in self.samples)
        parts = ", ".join(f"{split}/{cls}={n}" for (split, cls), n in sorted(counts.items()))
        return f"DefectSet({str(self.root)!r}: {parts})"

    @property
    def defect_classes(self) -> list[str]:
        """Sorted defect class names (``good`` excluded)."""
        return sorted({s.defect_class for s in self.samples if s.is_anomalous})

    def select(self, split: str | None = None, defect_class: str | None = None,
               anomalous: bool | None = None) -> list[DefectSample]:
        """Samples filtered by split, class and/or anomalous flag."""
        out = self.samples
        if split is not None:
            out = [s for s in out if s.split == split]
        if defect_class is not None:
            out = [s for s in out if s.defect_class == defect_class]
        if anomalous is not None:
            out = [s for s in out if s.is_anomalous == anomalous]
        return out

    def image_path(self, sample: DefectSample) -> Path:
        return _safe_relative(self.root, sample.image, where=str(self.root / MANIFEST_NAME))

    def mask_path(self, sample: DefectSample) -> Path | None:
        if sample.mask is None:
            return None
        return _safe_relative(self.root, sample.mask, where=str(self.root / MANIFEST_NAME))

    def load_image(self, sample: DefectSample, mode: str = "RGB") -> np.ndarray:
        return read_image(self.image_path(sample), mode)

    def load_mask(self, sample: DefectSample, shape: tuple[int, int] | None = None) -> np.ndarray:
        """The sample's bool mask; all False for normal samples. Defect samples without a mask are an error."""
        path = self.mask_path(sample)
        if path is None:
            if sample.is_anomalous:
                raise InputError(
                    f"{self.image_path(sample)}: defect image has no mask; add "
                    f"ground_truth/{sample.defect_class}/{sample.name}{MASK_SUFFIX}.png."
                )
            if shape is None:
                shape = read_image(self.image_path(sample), "L").shape
            return np.zeros(shape[:2], dtype=bool)
        return read_mask(path, shape=shape, image_path=self.image_path(sample))

    def to_hf_dataset(self):  # -> datasets.Dataset (import kept lazy: datasets is slow to import)
        """Export to a Hugging Face ``datasets.Dataset`` with ``Image`` features for image and mask.

        Columns: image, mask (None for normal samples), defect_class, label (ClassLabel: good + classes),
        split, generator, params (JSON string), seed, source_image, scores (JSON string).
        """
        import datasets

        names = [GOOD, *self.defect_classes]
        features = datasets.Features({
            "image": datasets.Image(),
            "mask": datasets.Image(),
            "defect_class": datasets.Value("string"),
            "label": datasets.ClassLabel(names=names),
            "split": datasets.Value("string"),
            "generator": datasets.Value("string"),
            "params": datasets.Value("string"),
            "seed": datasets.Value("int64"),
            "source_image": datasets.Value("string"),
            "scores": datasets.Value("string"),
        })
        columns: dict[str, list[Any]] = {key: [] for key in features}
        for sample in self.samples:
            mask_path = self.mask_path(sample)
            columns["image"].append(str(self.image_path(sample)))
            columns["mask"].append(None if mask_path is None else str(mask_path))
            columns["defect_class"].append(sample.defect_class)
            columns["label"].append(names.index(sample.defect_class))
            columns["split"].append(sample.split)
            columns["generator"].append(sample.generator)
            columns["params"].append(json.dumps(sample.params, sort_keys=True))
            columns["seed"].append(sample.seed)
            columns["source_image"].append(sample.source_image)
            columns["scores"].append(json.dumps(sample.scores, sort_keys=True))
        return datasets.Dataset.from_dict(columns, features=features)


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """Rows of a manifest; a truncated last line (a write killed mid-way) is dropped with a warning."""
    rows: list[dict[str, Any]] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if lineno == len(lines):
                logger.warning("%s: dropping truncated last line %d (interrupted write)", path, lineno)
                break
            raise InputError(f"{path}:{lineno}: invalid JSON ({exc}); fix or delete that line.") from exc
    return rows


def _mask_for(root: Path, defect_class: str, image: Path) -> Path | None:
    folder = root / "ground_truth" / defect_class
    for candidate in (folder / f"{image.stem}{MASK_SUFFIX}.png", folder / f"{image.stem}.png"):
        if candidate.exists():
            return candidate
    return None


def _scan_mvtec(root: Path) -> list[DefectSample]:
    samples: list[DefectSample] = []
    train_good = root / "train" / GOOD
    test_dir = root / "test"
    if not train_good.is_dir() and not test_dir.is_dir():
        raise InputError(
            f"{root}: not a defect set: expected train/good/ and/or test/<class>/ folders (MVTec AD layout) "
            f"or a {MANIFEST_NAME}."
        )
    if train_good.is_dir():
        for path in list_images(train_good, allow_empty=True):
            samples.append(DefectSample(image=path.relative_to(root).as_posix(), split="train"))
    if test_dir.is_dir():
        missing_masks = 0
        for class_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            for path in list_images(class_dir, allow_empty=True):
                mask = None
                if class_dir.name != GOOD:
                    found = _mask_for(root, class_dir.name, path)
                    missing_masks += found is None
                    mask = None if found is None else found.relative_to(root).as_posix()
                samples.append(DefectSample(image=path.relative_to(root).as_posix(), split="test",
                                            defect_class=class_dir.name, mask=mask))
        if missing_masks:
            logger.warning("%s: %d defect images have no mask in ground_truth/", root, missing_masks)
    if not samples:
        raise InputError(f"{root}: no images found under train/good or test/*.")
    return samples


def read_defect_set(root: str | Path) -> DefectSet:
    """Read a defect set: from its manifest when there is one, else by scanning the MVTec AD layout."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: dataset folder not found; check the path.")
    if not root.is_dir():
        raise InputError(f"{root}: expected a dataset folder, got a file.")
    manifest = root / MANIFEST_NAME
    if not manifest.exists():
        return DefectSet(root, _scan_mvtec(root))
    samples = []
    for index, row in enumerate(read_manifest(manifest), start=1):
        where = f"{manifest}:{index}"
        sample = DefectSample.from_row(row, where=where)
        image = _safe_relative(root, sample.image, where=where)
        if not image.exists():
            raise InputError(f"{where}: image {sample.image} listed in the manifest does not exist.")
        if sample.mask is not None and not _safe_relative(root, sample.mask, where=where).exists():
            raise InputError(f"{where}: mask {sample.mask} listed in the manifest does not exist.")
        samples.append(sample)
    return DefectSet(root, samples)


def write_sample_files(
    root: Path,
    image: np.ndarray,
    *,
    name: str,
    split: str,
    defect_class: str = GOOD,
    mask: np.ndarray | None = None,
    generator: str | None = None,
    params: dict[str, Any] | None = None,
    seed: int | None = None,
    source_image: str | None = None,
    scores: dict[str, float] | None = None,
    png_compression: int = DEFAULT_PNG_COMPRESSION,
) -> DefectSample:
    """Write one sample's PNG image (and mask for a defect sample) atomically; returns its manifest row.

    Touches no manifest, so worker processes can call it; :meth:`DefectSetWriter.record` appends the row.
    """
    if split not in SPLITS:
        raise InputError(f"split {split!r} is not one of {SPLITS}.")
    if defect_class != GOOD and split != "test":
        raise InputError(f"defect sample {name!r}: MVTec layout keeps defects in split 'test'.")
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise InputError(f"invalid sample name {name!r}: use a plain file stem.")
    image_rel = f"{split}/{defect_class}/{name}.png"
    mask_rel = None
    if defect_class != GOOD:
        if mask is None:
            raise InputError(f"defect sample {name!r} of class {defect_class!r} needs a mask.")
        if mask.shape[:2] != image.shape[:2]:
            raise InputError(f"defect sample {name!r}: mask {mask.shape[:2]} != image {image.shape[:2]}.")
        mask_rel = f"ground_truth/{defect_class}/{name}{MASK_SUFFIX}.png"
        write_image(root / mask_rel, mask.astype(bool), png_compression=png_compression)
    write_image(root / image_rel, smallest_lossless_mode(image), png_compression=png_compression)
    return DefectSample(image=image_rel, split=split, defect_class=defect_class, mask=mask_rel, generator=generator,
                        params=params or {}, seed=seed, source_image=source_image, scores=scores or {})


class DefectSetWriter:
    """Writes a defect set sample by sample, crash-safely and resumably.

    Each image/mask is written atomically before its manifest row is appended, so after a kill
    the manifest lists only complete samples; reopening the same root resumes (``completed`` tells which
    sample names exist). Files without a manifest row are simply overwritten on the rerun.

    ``manifest_name`` other than ``manifest.jsonl`` is a shard's own manifest (``synth generate`` under
    ``accelerate launch``); a shard writer leaves the folder's temporary files alone (``clean=False``) because the
    other shards may be writing them.
    """

    def __init__(self, root: str | Path, *, png_compression: int = DEFAULT_PNG_COMPRESSION,
                 manifest_name: str = MANIFEST_NAME, clean: bool = True):
        self.root = Path(root)
        self.png_compression = png_compression
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"{self.root}: output path exists and is a file; choose a folder.")
        self.root.mkdir(parents=True, exist_ok=True)
        if clean:
            # Temporary files of atomic writes that a kill interrupted: never part of the set, safe to delete.
            for stale in self.root.rglob(".*.tmp"):
                stale.unlink(missing_ok=True)
        self.manifest_path = self.root / manifest_name
        self.samples: list[DefectSample] = []
        if self.manifest_path.exists():
            rows = read_manifest(self.manifest_path)
            self.samples = [DefectSample.from_row(r, where=str(self.manifest_path)) for r in rows]
            # Rewrite without a truncated tail so later appends start on a clean line.
            self._rewrite_manifest()
        self._keys = {(s.split, s.defect_class, s.name) for s in self.samples}

    def _rewrite_manifest(self) -> None:
        write_text(self.manifest_path, "".join(json.dumps(s.to_row(), sort_keys=True) + "\n" for s in self.samples))

    def replace_samples(self, samples: list[DefectSample]) -> None:
        """Rewrite the manifest atomically with ``samples`` (merging shards)."""
        self.samples = list(samples)
        self._keys = {(s.split, s.defect_class, s.name) for s in self.samples}
        self._rewrite_manifest()

    def has(self, name: str, *, split: str, defect_class: str = GOOD) -> bool:
        """True when a sample with this name, split and class is already complete (for resuming)."""
        return (split, defect_class, name) in self._keys

    def record(self, sample: DefectSample) -> DefectSample:
        """Append the manifest row of a sample whose files are written (by :func:`write_sample_files`)."""
        line = json.dumps(sample.to_row(), sort_keys=True) + "\n"
        with open(self.manifest_path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            if durable_writes():
                os.fsync(handle.fileno())
        self.samples.append(sample)
        self._keys.add((sample.split, sample.defect_class, sample.name))
        return sample

    def add(
        self,
        image: np.ndarray,
        *,
        name: str,
        split: str,
        defect_class: str = GOOD,
        mask: np.ndarray | None = None,
        generator: str | None = None,
        params: dict[str, Any] | None = None,
        seed: int | None = None,
        source_image: str | None = None,
        scores: dict[str, float] | None = None,
    ) -> DefectSample:
        """Write one sample (PNG image, and mask for defect samples) and append its manifest row."""
        return self.record(write_sample_files(
            self.root, image, name=name, split=split, defect_class=defect_class, mask=mask, generator=generator,
            params=params, seed=seed, source_image=source_image, scores=scores,
            png_compression=self.png_compression))

    def add_file(self, src: str | Path, *, split: str, name: str | None = None,
                 source_image: str | None = None) -> DefectSample:
        """Copy a normal image file byte for byte into ``<split>/good/`` (keeps the original format)."""
        src = Path(src)
        if not is_image_file(src):
            raise InputError(f"{src}: not a supported image file.")
        read_image(src)  # validate now so a corrupt normal never enters the set
        name = name or src.stem
        image_rel = f"{split}/{GOOD}/{name}{src.suffix.lower()}"
        copy_file(src, self.root / image_rel)
        return self.record(DefectSample(image=image_rel, split=split, source_image=source_image or str(src)))

    def finalize(self, extra: dict[str, Any] | None = None) -> DefectSet:
        """Write dataset_info.json (classes, counts, extra info) and return the set."""
        counts = Counter(f"{s.split}/{s.defect_class}" for s in self.samples)
        info = {
            "format": "pixelvision-defect-set/1 (MVTec AD layout + manifest.jsonl)",
            "defect_classes": sorted({s.defect_class for s in self.samples if s.is_anomalous}),
            "counts": dict(sorted(counts.items())),
            "num_samples": len(self.samples),
            **(extra or {}),
        }
        write_json(self.root / INFO_NAME, info)
        return DefectSet(self.root, list(self.samples))
