"""``synth generate``: write a labeled defect set from normal images with a model-free generator.

Guarantees:
- Same config and seed -> byte-identical output folder (PNG writes, sorted JSON, no timestamps).
- Every sample ``i`` draws from its own generator seeded by ``SeedSequence([seed, i])`` and uses a normal image
  chosen by a seeded permutation (``normal_match: any``, the default) or drawn from the context weights of
  :mod:`synth.context` by a generator of its own, seeded from ``sample_seed(seed, i)`` (``normal_match:
  exemplar``, method paste), so a run that was killed and restarted with the same command resumes where it
  stopped and ends with exactly the files of an uninterrupted run.
- Files are written atomically and a sample's manifest row is appended only after its files exist.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from synth.config import GenerateConfig
from synth.core.defect_set import (
    GOOD,
    MANIFEST_NAME,
    DefectSample,
    DefectSet,
    DefectSetWriter,
    read_manifest,
    write_sample_files,
)
from synth.core.errors import InputError
from synth.core.io import (
    DEFAULT_PNG_COMPRESSION,
    in_mode_of,
    list_images,
    read_image,
    read_json_if_exists,
    write_image,
    write_json,
)
from synth.generators import DefectGenerator, build_generator, get_generator
from synth.masks import overlay_mask
from synth.parallel import Shard, current_shard, default_workers, ordered_map

logger = logging.getLogger(__name__)

CONFIG_RECORD = "generate_config.json"


@dataclass
class GenerateReport:
    dataset: DefectSet
    generated: int
    resumed_from: int
    skipped_files: list[str] = field(default_factory=list)


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index``: independent streams per sample, stable across resumes."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint32)[0])


def _readable_normals(paths: Sequence[Path], strict: bool, skipped: list[str],
                      descriptors: list[np.ndarray] | None = None) -> list[Path]:
    """The readable images of ``paths``; appends each one's context descriptor when ``descriptors`` is a list."""
    from synth.context import image_descriptor

    ok = []
    for path in paths:
        try:
            image = read_image(path)
        except InputError as exc:
            if strict:
                raise
            logger.warning("%s", exc)
            skipped.append(str(exc))
            continue
        ok.append(path)
        if descriptors is not None:  # described while it is in memory anyway: every normal is read only once here
            descriptors.append(image_descriptor(image))
    return ok


def _config_record(cfg: GenerateConfig) -> dict[str, Any]:
    record = cfg.model_dump(mode="json")
    for key in ("out", "preview", "workers"):  # none of them changes a written byte
        record.pop(key)
    # Defaults are left out so folders written before these keys existed still resume without complaint.
    if record.get("normal_match") == "any":
        record.pop("normal_match")
    if record.get("png_compression") == DEFAULT_PNG_COMPRESSION:
        record.pop("png_compression")
    return record


# Stream id mixed into sample_seed for the normal-image draw of normal_match 'exemplar': a stream separate from
# the sample's generator, so the choice of normal does not shift the defect's own random draws.
_NORMAL_STREAM = 1


def _normal_weights(generator: DefectGenerator, descriptors: list[np.ndarray],
                    normals: Sequence[Path]) -> tuple[np.ndarray, dict[str, Any]]:
    """Context weights of the normals for ``normal_match: exemplar`` and a summary for dataset_info.json."""
    from synth.context import DESCRIPTOR_NAMES, context_weights, exemplar_descriptor, weights_summary
    from synth.paste import PasteGenerator

    assert isinstance(generator, PasteGenerator)  # generate() checked method == paste
    exemplars = generator.placer.exemplars
    weights = context_weights(np.stack(descriptors), np.stack([exemplar_descriptor(ex) for ex in exemplars]))
    summary = {"mode": "exemplar", "descriptor": list(DESCRIPTOR_NAMES), "exemplars": len(exemplars),
               **weights_summary(weights, [p.name for p in normals])}
    if len(normals) > 2 and summary["effective_normals"] < 2:
        # Happens when the defect images look unlike every normal (other exposure, other surface): the kernels
        # then pick the single nearest normal and the generated set loses its variety.
        logger.warning("normal_match 'exemplar': %.0f%% of the samples will use %s; the defect images resemble "
                       "few of the %d normal images (use normal_match 'any' for variety)",
                       100 * summary["max_weight"], summary["top"][0]["image"], len(normals))
    return weights, summary


def make_preview(dataset: DefectSet, count: int, tile: int = 128) -> np.ndarray | None:
    """Grid of (image, mask, overlay) triplets for the first ``count`` defect samples."""
    import cv2

    samples = dataset.select(anomalous=True)[:count]
    if not samples:
        return None
    rows = []
    for sample in samples:
        image = dataset.load_image(sample)
        mask = dataset.load_mask(sample, image.shape[:2])
        cells = [image, np.repeat((mask * 255).astype(np.uint8)[:, :, None], 3, axis=2), overlay_mask(image, mask)]
        rows.append(np.concatenate([cv2.resize(c, (tile, tile), interpolation=cv2.INTER_AREA) for c in cells], 1))
    columns = 2 if len(rows) > 4 else 1
    while len(rows) % columns:
        rows.append(np.zeros_like(rows[0]))
    per_column = len(rows) // columns
    blocks = [np.concatenate(rows[c * per_column:(c + 1) * per_column], axis=0) for c in range(columns)]
    return np.concatenate(blocks, axis=1)


_SHARD_MANIFEST_GLOB = "manifest.shard-*.jsonl"


def _shard_manifest_name(shard: Shard) -> str:
    return f"manifest.shard-{shard.index:03d}-of-{shard.count:03d}.jsonl"


def _merge_shards(writer: DefectSetWriter, cfg: GenerateConfig) -> None:
    """Fold the shard manifests into ``manifest.jsonl`` and put its rows in the order of an uninterrupted
    one-process run (so the bytes match it): the other rows first, as they were, then the samples of this method
    in index order; then drop the shard manifests."""
    shard_paths = sorted(cfg.out.glob(_SHARD_MANIFEST_GLOB))
    rows = list(writer.samples)
    keys = {(s.split, s.defect_class, s.name) for s in rows}
    for path in shard_paths:
        for row in read_manifest(path):
            sample = DefectSample.from_row(row, where=str(path))
            if (sample.split, sample.defect_class, sample.name) not in keys:
                rows.append(sample)
                keys.add((sample.split, sample.defect_class, sample.name))
    prefix = f"{cfg.method}_"

    def sample_index(sample: DefectSample) -> int | None:
        stem = sample.name.removeprefix(prefix)
        return int(stem) if sample.split == "test" and sample.name.startswith(prefix) and stem.isdigit() else None

    generated = sorted((s for s in rows if sample_index(s) is not None), key=sample_index)
    ordered = [s for s in rows if sample_index(s) is None] + generated
    if ordered != writer.samples:  # a resume after a killed launch can also leave gaps that filled in at the end
        writer.replace_samples(ordered)
    for path in shard_paths:
        path.unlink()


def generate(cfg: GenerateConfig, *, progress: bool = True) -> GenerateReport:
    """Run ``synth generate`` for a validated config; resumes when ``cfg.out`` holds a partial run."""
    if cfg.normal_match == "exemplar" and cfg.method != "paste":
        raise InputError(f"normal_match 'exemplar' matches normal images to the real defects' source images and "
                         f"needs method 'paste', got method {cfg.method!r}; use --method paste with --masks DIR, "
                         f"or set normal_match: any (--normal-match any).")
    skipped: list[str] = []
    descriptors: list[np.ndarray] | None = [] if cfg.normal_match == "exemplar" else None
    normals = _readable_normals(list_images(cfg.normal), cfg.strict, skipped, descriptors)
    if not normals:
        raise InputError(f"{cfg.normal}: none of the images could be read; see the messages above.")
    if cfg.n > len(normals):
        logger.warning("only %d normal images for %d samples: each normal image is reused", len(normals), cfg.n)

    record = _config_record(cfg)
    previous = read_json_if_exists(cfg.out / CONFIG_RECORD)
    if previous is not None and previous != record:
        changed = sorted(k for k in set(previous) | set(record) if previous.get(k) != record.get(k))
        raise InputError(f"{cfg.out}: holds a set generated with other settings ({', '.join(changed)}); "
                         f"use a new --out folder, or delete this one to start over.")
    generator = build_generator(cfg, skipped)
    shard = current_shard()
    if shard.is_main:
        # The main process alone cleans, copies and merges: the others may be writing temporary files meanwhile.
        writer = DefectSetWriter(cfg.out, png_compression=cfg.png_compression)
        _merge_shards(writer, cfg)  # rows of shards that a killed earlier launch left unmerged
        write_json(cfg.out / CONFIG_RECORD, record)
        if cfg.copy_normals:
            for path in normals:
                if not writer.has(path.stem, split="train"):
                    writer.add_file(path, split="train", source_image=str(path))
    shard.wait_for_everyone()
    if shard.count > 1:
        # Each shard appends to a manifest of its own (the main one is only read here) and resumes from both.
        sample_writer = DefectSetWriter(cfg.out, png_compression=cfg.png_compression, clean=False,
                                        manifest_name=_shard_manifest_name(shard))
        main_path = cfg.out / MANIFEST_NAME
        main_rows = [DefectSample.from_row(r, where=str(main_path)) for r in read_manifest(main_path)] \
            if main_path.exists() else []
        done_names = {s.name for s in [*sample_writer.samples, *main_rows] if s.split == "test"}
    else:
        sample_writer = writer
        done_names = {s.name for s in writer.samples if s.split == "test"}

    order = np.random.default_rng(cfg.seed).permutation(len(normals))
    weights, extra = None, {}
    if descriptors is not None:
        weights, summary = _normal_weights(generator, descriptors, normals)
        extra = {"normal_match": summary}
    resumed_from = sum(1 for i in range(cfg.n) if f"{cfg.method}_{i:05d}" in done_names)
    pending = [i for i in range(cfg.n) if shard.owns(i) and f"{cfg.method}_{i:05d}" not in done_names]

    def make_sample(index: int) -> DefectSample:
        name = f"{cfg.method}_{index:05d}"
        seed = sample_seed(cfg.seed, index)
        if weights is None:
            source = normals[order[index % len(normals)]]
        else:
            source = normals[int(np.random.default_rng([seed, _NORMAL_STREAM]).choice(len(normals), p=weights))]
        normal = read_image(source)
        result = generator(normal, np.random.default_rng(seed))
        anomalous = bool(result.mask.any())
        # A grayscale input stays grayscale (colour noise of perlin/draem included): one channel on disk.
        return write_sample_files(
            cfg.out, in_mode_of(result.image, normal), name=name, split="test",
            defect_class=result.defect_class if anomalous else GOOD,
            mask=result.mask if anomalous else None, generator=cfg.method, params=result.params, seed=seed,
            source_image=str(source), png_compression=cfg.png_compression)

    # Diffusion generators hold a model (and maybe a GPU): one process each; spread them with accelerate launch.
    workers = 1 if get_generator(cfg.method).single_process else (cfg.workers or default_workers())
    with tqdm(total=cfg.n, initial=resumed_from, desc=f"synth generate {cfg.method}", unit="img",
              disable=not progress or not shard.is_main) as bar:
        for sample in ordered_map(make_sample, pending, workers):
            # Rows go in in index order whatever the worker count, so the manifest bytes do not depend on it.
            sample_writer.record(sample)
            bar.update(shard.count)

    shard.wait_for_everyone()
    if not shard.is_main:
        return GenerateReport(dataset=DefectSet(cfg.out, list(sample_writer.samples)), generated=len(pending),
                              resumed_from=resumed_from, skipped_files=skipped)
    _merge_shards(writer, cfg)
    dataset = writer.finalize({"generator": cfg.method, "config": record, "skipped_files": skipped, **extra})
    preview = make_preview(dataset, cfg.preview)
    if preview is not None:
        write_image(cfg.out / "preview.png", preview)
    if skipped:
        logger.warning("%d file(s) skipped:\n  %s", len(skipped), "\n  ".join(skipped))
    return GenerateReport(dataset=dataset, generated=cfg.n - resumed_from, resumed_from=resumed_from,
                          skipped_files=skipped)
