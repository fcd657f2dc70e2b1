"""``synth filter``: keep the generated defects that look like real ones and visibly differ from normal images.

Two stages on image embeddings (DINOv2 by default, the offline EfficientNet-Lite0 otherwise; see
:mod:`synth.embedders`), all distances cosine distances ``1 - cos``:

1. **Realism**: ``filter_real_distance`` = mean distance to the ``k`` nearest REAL defect embeddings. The
   ``stage1_keep`` closest candidates survive (or the ``stage1_ratio`` fraction of them).
2. **Visibility**: ``filter_normal_distance`` = mean distance to the ``k`` nearest NORMAL embeddings. Among the
   stage-1 survivors the ``stage2_keep`` farthest survive (or ``stage2_ratio`` of the survivors): a generated
   defect that its own normal image explains (too faint, painted off the object) is dropped.

With ``per_class`` each defect class is ranked separately against the real defects of the same class (keep counts
and ratios then apply per class); a class without real examples is ranked against all real defects, with a
warning. Ties are broken by manifest order, so the selection is deterministic.

Output (``out``): a labeled defect set (MVTec layout + manifest.jsonl, :class:`synth.core.defect_set.DefectSetWriter`)
holding the kept defect samples (image, mask, class, generator, params, seed and source unchanged; the manifest
row's ``scores`` gets ``filter_real_distance``, ``filter_normal_distance``, ``filter_stage1_rank`` and
``filter_stage2_rank``, 1-based) plus, with ``copy_normals`` (default), every normal (``good``) row of the generated
set, so the result is still a complete training set. ``filter_scores.json`` lists every candidate with its scores
and ``status`` (``kept``, ``dropped_stage1``, ``dropped_stage2`` or ``unreadable``); ``filter_config.json`` records
the settings. Keep counts above what is available are clipped with a warning (a filter can only keep what exists);
ratios round up, so any ratio keeps at least one sample.

Rerunning with the same config gives identical files (a killed run resumes); another config into the same ``out``
is refused. Unreadable images are skipped with a warning (an error with ``strict``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator
from tqdm import tqdm

from synth.core.config import StrictModel, read_yaml, validate_config
from synth.core.defect_set import GOOD, DefectSample, DefectSet, DefectSetWriter, read_defect_set
from synth.core.errors import InputError
from synth.core.io import list_images, read_image, read_json_if_exists, write_image, write_json

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_RECORD",
    "DEFAULT_RATIO",
    "SCORES_NAME",
    "FilterConfig",
    "FilterReport",
    "Selection",
    "collect_normals",
    "collect_real_defects",
    "filter_defect_set",
    "knn_cosine_distance",
    "load_filter_config",
    "resolve_keep",
    "two_stage_select",
]

CONFIG_RECORD = "filter_config.json"
SCORES_NAME = "filter_scores.json"
DEFAULT_RATIO = 0.5
"""Fraction kept by a stage when neither its ``*_keep`` nor its ``*_ratio`` is set."""
SCORE_DIGITS = 6


class FilterConfig(StrictModel):
    """Settings of ``synth filter`` (each key is also a CLI flag; the flag wins)."""

    generated: Path = Field(description="generated defect set (output of synth generate)")
    real_defects: Path = Field(description="real defect images: a folder (searched recursively; first-level "
                                           "subfolders are classes) or an MVTec-layout dataset (its test/<class>)")
    out: Path = Field(description="output folder: the filtered labeled defect set")
    normals: Path | None = Field(None, description="normal images (a folder, or a dataset whose train/good is "
                                                   "used); default: the generated set's train/good")
    embedder: Literal["auto", "dinov2", "lite0"] = Field("auto", description="auto: DINOv2, else offline Lite0")
    embedder_path: str | None = Field(None, description="DINOv2 folder or hub id; for lite0 a weights file")
    stage1_keep: int | None = Field(None, gt=0, description="candidates kept by stage 1 (closest to real)")
    stage1_ratio: float | None = Field(None, gt=0, le=1, description="fraction kept by stage 1 (default 0.5)")
    stage2_keep: int | None = Field(None, gt=0, description="stage-1 survivors kept by stage 2 (farthest from "
                                                            "normal)")
    stage2_ratio: float | None = Field(None, gt=0, le=1, description="fraction of stage-1 survivors kept "
                                                                     "(default 0.5)")
    per_class: bool = Field(False, description="rank each defect class against the real defects of that class")
    k: int = Field(5, gt=0, description="nearest neighbours averaged for both distances")
    batch_size: int = Field(32, gt=0)
    image_size: int | None = Field(None, ge=16, le=4096, description="embedder input side (default 224)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    copy_normals: bool = Field(True, description="copy the generated set's good rows into the output")
    strict: bool = Field(False, description="fail on the first unreadable image instead of skipping it")
    seed: int = Field(0, ge=0, description="torch seed set before embedding (the models run deterministically)")

    @model_validator(mode="after")
    def _one_of_keep_or_ratio(self) -> FilterConfig:
        for stage in ("stage1", "stage2"):
            if getattr(self, f"{stage}_keep") is not None and getattr(self, f"{stage}_ratio") is not None:
                raise ValueError(f"set either {stage}_keep or {stage}_ratio, not both")
        return self


def load_filter_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> FilterConfig:
    """Like :func:`synth.core.config.load_config`, but a ``*_keep`` flag replaces the config file's ``*_ratio`` of the
    same stage (and vice versa) instead of clashing with it."""
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for stage in ("stage1", "stage2"):
        for key, other in ((f"{stage}_keep", f"{stage}_ratio"), (f"{stage}_ratio", f"{stage}_keep")):
            if key in given and other not in given:
                data.pop(other, None)
    data.update(given)
    return validate_config(FilterConfig, data, source=str(path) if path is not None else "arguments")


# --------------------------------------------------------------------------------------------------
# Ranking (pure numpy; unit-tested on hand-made vectors)
# --------------------------------------------------------------------------------------------------

def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2:
        raise InputError(f"embeddings must be a 2-D array (N, D), got shape {vectors.shape}.")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def knn_cosine_distance(queries: np.ndarray, references: np.ndarray, k: int, chunk: int = 4096) -> np.ndarray:
    """Mean cosine distance ``1 - cos`` of each query to its ``k`` nearest references (``k`` clipped to M).

    Args:
        queries: ``(N, D)``; references: ``(M, D)``; rows need not be normalised.
    """
    q, r = _unit(queries), _unit(references)
    if q.shape[1] != r.shape[1]:
        raise InputError(f"embedding sizes differ: queries {q.shape[1]}, references {r.shape[1]}.")
    if len(r) == 0:
        raise InputError("no reference embeddings to compare with.")
    k = max(1, min(int(k), len(r)))
    out = np.empty(len(q), dtype=np.float64)
    for start in range(0, len(q), chunk):  # chunks bound the (N, M) distance matrix in memory
        dist = 1.0 - q[start:start + chunk] @ r.T
        out[start:start + chunk] = np.partition(dist, k - 1, axis=1)[:, :k].mean(axis=1)
    return out


def resolve_keep(available: int, keep: int | None, ratio: float | None, *, key: str, where: str = "") -> int:
    """How many of ``available`` items a stage keeps: ``keep`` (clipped, with a warning) or ``ceil(ratio * n)``."""
    if available <= 0:
        return 0
    if keep is not None:
        if keep > available:
            logger.warning("%s_keep=%d but only %d candidate(s)%s: keeping all %d", key, keep, available,
                           f" ({where})" if where else "", available)
            return available
        return int(keep)
    fraction = DEFAULT_RATIO if ratio is None else float(ratio)
    # The epsilon keeps 0.3 * 10 (= 3.0000000000000004 in floats) at 3.
    return max(1, min(available, math.ceil(fraction * available - 1e-9)))


@dataclass
class Selection:
    """Result of :func:`two_stage_select`; indices refer to the candidate rows given to it.

    Attributes:
        real_distance, normal_distance: ``(N,)`` scores of every candidate.
        stage1: indices kept by stage 1, closest to the real defects first.
        stage2: indices kept by stage 2 (a subset of ``stage1``), farthest from the normals first.
        stage1_rank: ``(N,)`` 1-based rank by real distance (every candidate).
        stage2_rank: ``(N,)`` 1-based rank by normal distance among the stage-1 survivors; 0 for the others.
    """

    real_distance: np.ndarray
    normal_distance: np.ndarray
    stage1: np.ndarray
    stage2: np.ndarray
    stage1_rank: np.ndarray
    stage2_rank: np.ndarray


def two_stage_select(candidates: np.ndarray, real: np.ndarray, normals: np.ndarray, *, stage1_keep: int,
                     stage2_keep: int, k: int = 5) -> Selection:
    """Stage 1 keeps the ``stage1_keep`` candidates closest to ``real``; stage 2 keeps, of those, the
    ``stage2_keep`` farthest from ``normals``. Distances: mean cosine distance to the ``k`` nearest references.
    Ties go to the candidate that comes first."""
    n = len(candidates)
    if not 0 <= stage2_keep <= stage1_keep <= n:
        raise InputError(f"need 0 <= stage2_keep ({stage2_keep}) <= stage1_keep ({stage1_keep}) <= candidates ({n}).")
    real_distance = knn_cosine_distance(candidates, real, k)
    normal_distance = knn_cosine_distance(candidates, normals, k)
    index = np.arange(n)
    order1 = np.lexsort((index, real_distance))  # last key is primary: distance ascending, then index
    stage1 = order1[:stage1_keep]
    order2 = stage1[np.lexsort((stage1, -normal_distance[stage1]))]  # farthest first, then index
    stage2 = order2[:stage2_keep]
    stage1_rank = np.empty(n, dtype=np.int64)
    stage1_rank[order1] = index + 1
    stage2_rank = np.zeros(n, dtype=np.int64)
    stage2_rank[order2] = np.arange(1, len(order2) + 1)
    return Selection(real_distance, normal_distance, stage1, stage2, stage1_rank, stage2_rank)


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------

def collect_real_defects(folder: Path) -> list[tuple[Path, str | None]]:
    """Real defect images and their class (None when unknown).

    An MVTec-layout dataset (``folder/test`` exists) gives ``test/<class>/*`` for every class but ``good``.
    Otherwise the folder is searched recursively; the first-level subfolder names the class, images directly in
    ``folder`` have none, and ``good`` and ``ground_truth`` subfolders are left out.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: real defects folder not found; pass --real-defects DIR.")
    entries: list[tuple[Path, str | None]] = []
    test = folder / "test"
    if test.is_dir():
        for class_dir in sorted(p for p in test.iterdir() if p.is_dir() and p.name != GOOD):
            entries += [(p, class_dir.name) for p in list_images(class_dir, allow_empty=True)]
        if not entries:
            raise InputError(f"{folder}: an MVTec-layout dataset without defect images in test/<class>/.")
        return entries
    for path in list_images(folder, recursive=True, allow_empty=True):
        parts = path.relative_to(folder).parts
        if GOOD in parts[:-1] or "ground_truth" in parts[:-1]:
            continue
        entries.append((path, parts[0] if len(parts) > 1 else None))
    if not entries:
        raise InputError(f"{folder}: no real defect images found (searched recursively, 'good' and "
                         f"'ground_truth' subfolders excluded).")
    return entries


def collect_normals(folder: Path) -> list[Path]:
    """Normal images: ``folder/train/good`` of a dataset, else every image under ``folder`` (recursive)."""
    folder = Path(folder)
    train_good = folder / "train" / GOOD
    if train_good.is_dir():
        return list_images(train_good)
    if not folder.is_dir():
        raise InputError(f"{folder}: normals folder not found; pass --normals DIR.")
    return list_images(folder, recursive=True)


def _inside(path: Path, other: Path) -> bool:
    a, b = path.resolve(), other.resolve()
    return a == b or b in a.parents


def _config_record(cfg: FilterConfig) -> dict[str, Any]:
    record = cfg.model_dump(mode="json")
    record.pop("out")
    return record


def _check_out(cfg: FilterConfig, record: dict[str, Any]) -> dict[str, Any] | None:
    """Refuse an ``out`` that is an input, holds other data, or holds a filter run with other settings."""
    inputs = [("generated", cfg.generated), ("real_defects", cfg.real_defects), ("normals", cfg.normals)]
    for key, path in inputs:
        if path is not None and (_inside(cfg.out, path) or _inside(path, cfg.out)):
            raise InputError(f"out {cfg.out} overlaps the {key} folder {path}; choose a separate output folder.")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise InputError(f"{cfg.out}: output path exists and is a file; choose a folder.")
    previous = read_json_if_exists(cfg.out / CONFIG_RECORD)
    if previous is None:
        if cfg.out.is_dir() and any(cfg.out.iterdir()):
            raise InputError(f"{cfg.out}: folder is not empty and holds no {CONFIG_RECORD} (not a synth filter "
                             f"output); choose a new --out folder.")
        return None
    if not isinstance(previous, dict):
        raise InputError(f"{cfg.out / CONFIG_RECORD}: not a JSON object; delete the folder to start over.")
    settings = {k: v for k, v in previous.items() if k != "embedder_resolved"}
    if settings != record:
        changed = sorted(k for k in set(settings) | set(record) if settings.get(k) != record.get(k))
        raise InputError(f"{cfg.out}: holds a set filtered with other settings ({', '.join(changed)}); use a new "
                         f"--out folder, or delete this one to start over.")
    return previous


def _embed_paths(embedder: Any, paths: list[Path], *, what: str, cfg: FilterConfig, skipped: list[str],
                 progress: bool) -> tuple[np.ndarray, list[int]]:
    """Embeddings of the readable ``paths`` (read one batch at a time) and their positions in ``paths``."""
    vectors: list[np.ndarray] = []
    readable: list[int] = []
    with tqdm(total=len(paths), desc=f"synth filter: embed {what}", unit="img", disable=not progress) as bar:
        for start in range(0, len(paths), cfg.batch_size):
            images = []
            for index in range(start, min(start + cfg.batch_size, len(paths))):
                try:
                    images.append(read_image(paths[index]))
                except InputError as exc:
                    if cfg.strict:
                        raise
                    logger.warning("%s", exc)
                    skipped.append(str(exc))
                    continue
                readable.append(index)
            if images:
                vectors.append(embedder.embed(images, batch_size=cfg.batch_size))
            bar.update(min(cfg.batch_size, len(paths) - start))
    if not readable:
        raise InputError(f"{what}: none of the {len(paths)} images could be read; see the messages above.")
    return np.concatenate(vectors), readable


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------

@dataclass
class FilterReport:
    dataset: DefectSet
    embedder: dict[str, Any]
    candidates: int
    stage1_kept: int
    kept: int
    normals_copied: int
    already_there: int
    scores_path: Path
    skipped_files: list[str] = field(default_factory=list)


def _round(value: float) -> float:
    return round(float(value), SCORE_DIGITS)


def filter_defect_set(cfg: FilterConfig, *, progress: bool = True) -> FilterReport:
    """Run ``synth filter`` for a validated config (see the module docstring)."""
    skipped: list[str] = []
    generated = read_defect_set(cfg.generated)
    candidates = generated.select(anomalous=True)
    if not candidates:
        raise InputError(f"{cfg.generated}: the generated set holds no defect samples to filter.")
    real_entries = collect_real_defects(cfg.real_defects)
    if cfg.normals is not None:
        normal_paths = collect_normals(cfg.normals)
    else:
        normal_paths = [generated.image_path(s) for s in generated.select(split="train")]
        if not normal_paths:
            raise InputError(f"{cfg.generated}: has no train/good images to compare with; pass --normals DIR.")
    record = _config_record(cfg)
    previous = _check_out(cfg, record)

    import torch

    from synth.embedders import create_embedder

    torch.manual_seed(cfg.seed)
    options: dict[str, Any] = {"device": cfg.device, "image_size": cfg.image_size}
    if cfg.embedder_path is not None:
        options["path"] = cfg.embedder_path
    embedder = create_embedder(cfg.embedder, **options)
    if previous is not None and previous.get("embedder_resolved", embedder.name) != embedder.name:
        raise InputError(f"{cfg.out}: was filtered with the {previous['embedder_resolved']} embedder, now "
                         f"{embedder.name} is in use ('auto' resolved differently); use a new --out folder or "
                         f"set --embedder {previous['embedder_resolved']}.")
    record = {**record, "embedder_resolved": embedder.name}

    embed = {"what": "", "cfg": cfg, "skipped": skipped, "progress": progress}
    gen_emb, gen_ok = _embed_paths(embedder, [generated.image_path(s) for s in candidates],
                                   **{**embed, "what": "generated defects"})
    real_emb, real_ok = _embed_paths(embedder, [p for p, _ in real_entries], **{**embed, "what": "real defects"})
    normal_emb, _ = _embed_paths(embedder, normal_paths, **{**embed, "what": "normals"})
    real_classes = np.array([str(real_entries[i][1]) for i in real_ok])

    # Group the readable candidates (positions into gen_emb) and rank each group.
    groups: dict[str, list[int]] = {}
    for position, index in enumerate(gen_ok):
        groups.setdefault(candidates[index].defect_class if cfg.per_class else "all", []).append(position)
    results: dict[int, dict[str, Any]] = {}
    kept: set[int] = set()
    stage1_total = 0
    for group, members in sorted(groups.items()):
        references = real_emb
        if cfg.per_class:
            same = real_classes == group
            if same.any():
                references = real_emb[same]
            else:
                logger.warning("per_class: no real defects of class %r under %s; ranking it against all %d real "
                               "defects", group, cfg.real_defects, len(real_emb))
        n1 = resolve_keep(len(members), cfg.stage1_keep, cfg.stage1_ratio, key="stage1", where=f"group {group}")
        n2 = resolve_keep(n1, cfg.stage2_keep, cfg.stage2_ratio, key="stage2", where=f"group {group}")
        sel = two_stage_select(gen_emb[members], references, normal_emb, stage1_keep=n1, stage2_keep=n2, k=cfg.k)
        stage1_total += n1
        in1, in2 = set(sel.stage1.tolist()), set(sel.stage2.tolist())
        for local, position in enumerate(members):
            index = gen_ok[position]
            status = "kept" if local in in2 else "dropped_stage2" if local in in1 else "dropped_stage1"
            results[index] = {
                "group": group,
                "status": status,
                "filter_real_distance": _round(sel.real_distance[local]),
                "filter_normal_distance": _round(sel.normal_distance[local]),
                "filter_stage1_rank": int(sel.stage1_rank[local]),
                "filter_stage2_rank": int(sel.stage2_rank[local]) or None,
            }
            if status == "kept":
                kept.add(index)

    # Plan the output rows in the generated set's manifest order, so a resumed run appends the same rows.
    kept_samples = [s for i, s in enumerate(candidates) if i in kept]
    good_samples = generated.select(anomalous=False) if cfg.copy_normals else []
    planned = {(s.split, s.defect_class, s.name) for s in [*kept_samples, *good_samples]}
    writer = DefectSetWriter(cfg.out)
    stale = sorted(f"{split}/{cls}/{name}" for split, cls, name in
                   ({(s.split, s.defect_class, s.name) for s in writer.samples} - planned))
    if stale:
        raise InputError(f"{cfg.out}: holds samples this run does not select ({', '.join(stale[:3])}...): the "
                         f"inputs changed since it was written; delete the folder to start over.")
    write_json(cfg.out / CONFIG_RECORD, record)
    already_there = len(writer.samples)
    copied = _write_rows(writer, generated, candidates, kept, results, good_samples, cfg, skipped)

    candidate_rows = []
    for index, sample in enumerate(candidates):
        row = {"image": sample.image, "name": sample.name, "defect_class": sample.defect_class}
        row.update(results.get(index, {"status": "unreadable"}))
        candidate_rows.append(row)
    summary = {"candidates": len(candidates), "ranked": len(gen_ok), "stage1_kept": stage1_total,
               "kept": len(kept), "real_defects": len(real_ok), "normals": len(normal_emb)}
    scores_path = cfg.out / SCORES_NAME
    write_json(scores_path, {"format": "pixelvision-filter-scores/1", "embedder": embedder.describe(),
                             "config": record, "counts": summary, "candidates": candidate_rows})
    dataset = writer.finalize({"filter": {"embedder": embedder.describe(), "config": record, **summary},
                               "skipped_files": skipped})
    from synth.generate import make_preview

    preview = make_preview(dataset, 16)
    if preview is not None:
        write_image(cfg.out / "preview.png", preview)
    if skipped:
        logger.warning("%d file(s) skipped:\n  %s", len(skipped), "\n  ".join(skipped))
    return FilterReport(dataset=dataset, embedder=embedder.describe(), candidates=len(candidates),
                        stage1_kept=stage1_total, kept=len(kept), normals_copied=copied, already_there=already_there,
                        scores_path=scores_path, skipped_files=skipped)


def _write_rows(writer: DefectSetWriter, generated: DefectSet, candidates: list[DefectSample], kept: set[int],
                results: dict[int, dict[str, Any]], good_samples: list[DefectSample], cfg: FilterConfig,
                skipped: list[str]) -> int:
    """Copy the good rows and the kept defects (with their filter scores) in manifest order; returns #normals."""
    position = {id(s): i for i, s in enumerate(candidates)}
    good_ids = {id(s) for s in good_samples}
    copied = 0
    for sample in generated.samples:
        if id(sample) in good_ids:
            if writer.has(sample.name, split=sample.split):
                copied += 1
                continue
            try:
                if sample.split == "train":
                    # Byte copy: keeps the file's format and the exact pixels of the training normals.
                    writer.add_file(generated.image_path(sample), split="train", name=sample.name,
                                    source_image=sample.source_image or str(generated.image_path(sample)))
                else:
                    writer.add(generated.load_image(sample), name=sample.name, split=sample.split,
                               generator=sample.generator, params=sample.params, seed=sample.seed,
                               source_image=sample.source_image, scores=sample.scores)
            except InputError as exc:
                if cfg.strict:
                    raise
                logger.warning("%s", exc)
                skipped.append(str(exc))
                continue
            copied += 1
            continue
        index = position.get(id(sample))
        if index is None or index not in kept:
            continue
        if writer.has(sample.name, split=sample.split, defect_class=sample.defect_class):
            continue
        image = generated.load_image(sample)
        scores = {key: value for key, value in results[index].items() if key.startswith("filter_")}
        writer.add(image, name=sample.name, split=sample.split, defect_class=sample.defect_class,
                   mask=generated.load_mask(sample, image.shape[:2]), generator=sample.generator,
                   params=sample.params, seed=sample.seed, source_image=sample.source_image,
                   scores={**sample.scores, **scores})
    return copied
