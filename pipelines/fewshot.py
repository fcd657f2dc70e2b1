"""Few-shot detection pipeline: with k normal images, what do synthetic anomalies buy?

For every detector in ``models``, every number of normal shots k in ``shots`` and every synthetic mode in
``synthetic``, one *cell* is fitted (or skipped) and evaluated on the real test split of ``data`` (an MVTec-layout
folder). Nothing of the test split is used for fitting or for choosing a threshold.

Shots
    The training pool is ``data/train/good`` (sorted by path). Repeat ``r`` (0 .. ``repeats`` - 1) draws one
    permutation of the pool with ``np.random.default_rng(seed + r)``; the k-shot set is its first k images, so
    the sets are nested (the 1-shot image is inside the 2-shot set, ...). ``"all"`` is the whole pool. A k larger
    than the pool gives a skipped row. The model seed is ``seed + r`` too.

Calibration (one mechanism with ``detect fit``: :mod:`detect.calibration`)
    A user with k normal images must also set the threshold with them. Each detector calibrates itself as
    ``Detector.fit`` does, with ``threshold_method="fpr"`` and the pipeline's ``target_fpr``: memory-bank models
    (``cheap_refit``) are cross-fitted (fold models score the shots they did not see; the evaluated model is
    fitted on all k), other models hold ``holdout_fraction`` of the shots out of training (k >= 5), and with one
    shot the threshold comes from in-sample scores and views, with a warning. The threshold is the one for the
    target false-positive rate on normals; its expected recall is estimated on synthetic anomalies (CutPaste /
    DRAEM) made from the held-out shots. Every cell reports the decision's operating point on the real test
    split (false-positive rate and recall at the threshold) beside the calibration's own estimate and the recall
    the ROC reaches at the target rate (``oracle_recall``: the best any threshold could do there).

Synthetic set
    Generated once (``synth.generate``, method ``synthetic_method``, ``synthetic_n`` samples, seed ``seed``)
    from the whole ``train/good`` pool (``synthetic_from: pool``, the default), or per (k, repeat) from the
    k shots only (``synthetic_from: shots``, seed ``seed + r``: the strict few-shot protocol; with ``pool`` a
    "train" cell at small k also sees the normal background of the other pool images inside the synthetic
    images). ``synthetic_set`` (an existing defect set folder, e.g. the runner's shared one) replaces the
    generation. Its anomalous samples, sorted by path, are split once with ``default_rng([seed, 1])``: a share
    ``synthetic_calibration_fraction`` (default 1/4, at least one) are *calibration anomalies*, the rest are
    *training anomalies*. Both synthetic modes set the threshold on the same calibration anomalies, so they differ
    only in the detector weights, and "train" never calibrates on anomalies it was trained on.

Synthetic modes
    - ``none``: fit on the k shots; the threshold is the detector's own calibration (above): normals only set it.
    - ``threshold``: the *same fitted model* as ``none`` (one fit serves both cells), re-calibrated with
      ``Detector.calibrate(anomalies=..., threshold_method="f1")``: the F1-optimal threshold on the held-out
      normal scores of the fit's calibration + the synthetic set's calibration anomalies (scored by the
      evaluated model). The weights do not change, so image/pixel
      AUROC equal those of ``none`` exactly; only the decision changes.
    - ``train``: only for models with ``supports_anomalies`` (supersimplenet, draem, uninet): fit with
      ``anomalies=`` the training anomalies (``AnomalySamples``, source "synthetic"), threshold as in ``none``.
      Other models get a skipped row naming the reason. DRAEM always trains on its own simulated anomalies;
      "train" adds the synthetic set as its labeled-anomaly source (``real_anomaly_ratio`` of the batch slots).

Metrics per cell (on the real test split, all of it or ``max_test`` images per class, chosen with
``default_rng(seed)``): image AUROC, pixel AUROC and AUPRO (when every test defect has a mask; maps at the model
input size), image AP, image F1 / precision / recall / false-positive rate *at the chosen threshold* (the F1 a
user gets, not F1-max, which is reported beside it as ``image_f1_max``), the threshold and how it was chosen,
the target and estimated operating point (``target_fpr``, ``estimated_recall``, ``threshold_warning``), the
recall at the target rate on the ROC (``oracle_recall``), fit seconds and ROC points
(``detect.metrics.roc_points``, thinned to at most 200 points).

Rows: one per (model, synthetic, k), in that order, with the mean over repeats (``<metric>_std`` too when
``repeats`` > 1); ``roc["<model>|<synthetic>|k=<k>"]`` is repeat 0's curve.

Workdir layout (a rerun skips every finished cell; a killed run resumes)::

    cells/<model>__<synthetic>__k<k>__r<repeat>.json   one finished cell: {"key", "cell"} (atomic writes)
    synthetic/<method>-<hash12>/                       generated synthetic set(s) (synth generate resumes)
    shots/r<repeat>-k<k>/                              copies of the shots (synthetic_from: shots only)
    fewshot.json                                       the returned summary

A cell's key hashes everything it depends on (model options, image size, seeds, the shot / calibration / test
files with their sizes, the synthetic set's files), so a changed setting recomputes exactly the affected cells.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np
from pydantic import Field, ValidationInfo, field_validator
from tqdm import tqdm

from detect import registry
from detect.base import AnomalySamples
from detect.calibration import operating_point, oracle_recall
from detect.data import resize_mask
from detect.metrics import evaluate, roc_points
from pipelines.stage import (
    LoadedConfig,
    Stage,
    StageContext,
    fewshot_uses_shared_set,
    shared_set_stage,
    synthetic_set_of,
)
from synth.config import GenerateConfig
from synth.core.config import StrictModel, validate_config
from synth.core.defect_set import GOOD, read_defect_set
from synth.core.errors import InputError
from synth.core.io import copy_file, list_images, read_json_if_exists, stable_hash, write_json
from synth.generate import generate
from synth.generators import check_generator_name

logger = logging.getLogger(__name__)

__all__ = [
    "PIPELINE_STAGES", "SYNTHETIC_MODES", "FewShotConfig", "fewshot_table", "oracle_recall", "run_fewshot",
    "shot_order",
]

SYNTHETIC_MODES = ("none", "threshold", "train")
# Detector options the pipeline sets itself: image size and seed per cell, and the calibration settings.
OWNED_OPTIONS = ("image_size", "seed", "threshold_method", "synthetic_val", "val_fraction", "target_fpr")
ROC_LIMIT = 200
CELLS_DIR = "cells"
SUMMARY_FILE = "fewshot.json"
CACHE_VERSION = 2
# Cell metrics averaged over repeats (and given a ``_std`` when there are several).
METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_ap", "image_f1", "image_precision", "image_recall",
           "image_fpr", "oracle_recall", "estimated_recall", "calibration_fpr", "image_f1_max", "threshold", "fit_s")
STD_METRICS = ("image_auroc", "pixel_auroc", "image_f1", "image_fpr", "image_recall")

Shot = int | Literal["all"]


class FewShotConfig(StrictModel):
    """Settings of the few-shot detection pipeline (semantics in the module docstring)."""

    data: Path = Field(description="MVTec-layout folder: train/good, test/<class>, ground_truth/<class>")
    models: list[str] = Field(default_factory=lambda: ["patchcore", "draem", "supersimplenet"],
                              description="detector names (detect.list_models())")
    shots: list[Shot] = Field(default_factory=lambda: [1, 2, 4, 8, "all"],
                              description="numbers of normal shots (integers >= 1) and/or 'all'")
    synthetic: list[Literal["none", "threshold", "train"]] = Field(
        default_factory=lambda: list(SYNTHETIC_MODES), description="synthetic modes to compare")
    synthetic_set: Path | None = Field(None, description="existing synthetic defect set; replaces generation")
    synthetic_method: str = Field("perlin", description="synth generate method of the synthetic set")
    synthetic_n: int = Field(64, ge=2, description="synthetic samples to generate")
    synthetic_params: dict[str, Any] = Field(default_factory=dict, description="extra generator arguments")
    synthetic_blend: Literal["alpha", "poisson", "texture"] = Field("alpha", description="blend of method paste")
    masks: Path | None = Field(None, validate_default=True, description="real defect masks for method paste")
    defects: Path | None = Field(None, description="the defect images the masks belong to (method paste)")
    synthetic_from: Literal["pool", "shots"] = Field("pool", validate_default=True,
                                                     description="normals the synthetic set is made from")
    synthetic_calibration_fraction: float = Field(0.25, gt=0, le=1, validate_default=True,
                                                  description="share of synthetic anomalies used for thresholds")
    image_size: int = Field(128, ge=32, le=1024, multiple_of=8)
    model_options: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                                     description="{model: {option: value}} for create()")
    repeats: int = Field(1, ge=1, description="shot subsets per k, seeds seed + r")
    seed: int = Field(0, ge=0)
    max_test: int | None = Field(None, gt=0, description="most test images per class (seeded subsample)")
    target_fpr: float = Field(0.05, gt=0, lt=1, description="false-positive rate on normals the threshold aims at")
    holdout_fraction: float = Field(0.2, ge=0, lt=1,
                                    description="shots held out as calibration normals by models that do not "
                                                "cross-fit (detector val_fraction)")
    strict: bool = Field(False, description="raise on the first failing cell instead of recording it")

    @field_validator("models")
    @classmethod
    def _known_models(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one detector name")
        names = []
        for name in value:
            try:
                names.append(registry.get_model_class(name).name)
            except InputError as exc:
                raise ValueError(str(exc)) from None
        return list(dict.fromkeys(names))

    @field_validator("shots", mode="before")
    @classmethod
    def _valid_shots(cls, value: Any) -> Any:
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError("a non-empty list of shot counts (integers >= 1) and/or 'all'")
        ints = []
        for item in value:
            if item == "all":
                continue
            if isinstance(item, bool) or not isinstance(item, int) or item < 1:
                raise ValueError(f"shot count {item!r} must be an integer >= 1 or 'all'")
            ints.append(item)
        # Ascending, "all" last: the order of the curves' x axis.
        return sorted(set(ints)) + (["all"] if "all" in value else [])

    @field_validator("synthetic")
    @classmethod
    def _modes(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"give at least one of {list(SYNTHETIC_MODES)}")
        return list(dict.fromkeys(value))

    @field_validator("synthetic_method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return check_generator_name(value)

    @field_validator("masks")
    @classmethod
    def _paste_masks(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        data = info.data
        needs_set = any(m != "none" for m in data.get("synthetic", []))
        if (value is None and needs_set and data.get("synthetic_method") == "paste"
                and data.get("synthetic_set") is None):
            raise ValueError("synthetic_method 'paste' needs real defect masks (<class>/<name>.png); give 'masks' "
                             "(and 'defects'), or use a model-free method such as perlin")
        return value

    @field_validator("synthetic_from")
    @classmethod
    def _from_shots(cls, value: str, info: ValidationInfo) -> str:
        if value == "shots" and info.data.get("synthetic_set") is not None:
            raise ValueError("'shots' generates a set per shot subset and cannot use a given synthetic_set; set "
                             "synthetic_set: null (in a pipeline config too) or use synthetic_from: pool")
        return value

    @field_validator("synthetic_calibration_fraction")
    @classmethod
    def _leave_training_anomalies(cls, value: float, info: ValidationInfo) -> float:
        if value >= 1 and "train" in info.data.get("synthetic", []):
            raise ValueError("synthetic mode 'train' needs synthetic anomalies left to train on; use a value < 1")
        return value

    @field_validator("model_options")
    @classmethod
    def _known_options(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        # Options of a registered model that is not in ``models`` are allowed (a config can keep them while a model
        # is switched off); an unknown model name is a typo and an error.
        for name, options in value.items():
            try:
                model_class = registry.get_model_class(name)
            except InputError as exc:
                raise ValueError(f"options for {name!r}: {exc}") from None
            known = {f.name for f in fields(model_class.Config)}
            for option in options:
                if option in OWNED_OPTIONS:
                    raise ValueError(f"{name}.{option} is set by the pipeline (owned: {list(OWNED_OPTIONS)}); "
                                     f"remove it (image_size and seed are top-level keys)")
                if option not in known:
                    raise ValueError(f"{name} has no option {option!r}; valid: {sorted(known)}")
        return value


# --------------------------------------------------------------------------------------------------
# shots, splits and data
# --------------------------------------------------------------------------------------------------

def shot_order(n_train: int, seed: int) -> list[int]:
    """Indices of the sorted training pool in shot order: the k-shot set is the first k (nested by construction)."""
    return [int(i) for i in np.random.default_rng(seed).permutation(n_train)]


def _files(paths: list[Path], root: Path) -> list[list[Any]]:
    """(path relative to ``root``, size) of each file: what a cache key needs to notice replaced data."""
    out = []
    for path in paths:
        try:
            rel = path.relative_to(root).as_posix()
        except ValueError:
            rel = str(path)
        out.append([rel, path.stat().st_size])
    return out


@dataclass
class _Data:
    root: Path
    train: list[Path]
    test: list[Path]
    labels: np.ndarray
    masks: np.ndarray | None  # (N, S, S) at the model input size; None when a test defect has no mask
    counts: dict[str, int]
    test_files: list[list[Any]]


def _load_data(cfg: FewShotConfig) -> _Data:
    root = Path(cfg.data)
    if not (root / "train" / GOOD).is_dir():
        raise InputError(f"{root}: no train/good/ folder; the few-shot pipeline draws its normal shots from "
                         f"train/good (MVTec layout: train/good, test/<class>, ground_truth/<class>).")
    dataset = read_defect_set(root)
    train = sorted(dataset.image_path(s) for s in dataset.select(split="train", anomalous=False))
    if not train:
        raise InputError(f"{root / 'train' / GOOD}: no images; put the normal training images there.")
    samples = sorted(dataset.select(split="test"), key=lambda s: s.image)
    if not samples:
        raise InputError(f"{root}: no test/ images to evaluate on (test/good and test/<defect class>).")
    if cfg.max_test is not None:
        rng = np.random.default_rng(cfg.seed)
        kept = []
        for defect_class in sorted({s.defect_class for s in samples}):
            members = [s for s in samples if s.defect_class == defect_class]
            if len(members) > cfg.max_test:
                members = [members[i] for i in sorted(rng.choice(len(members), cfg.max_test, replace=False))]
            kept += members
        samples = sorted(kept, key=lambda s: s.image)
    labels = np.array([s.is_anomalous for s in samples], dtype=bool)
    if labels.all() or not labels.any():
        raise InputError(f"{root}: the test split needs both test/good and defect images for AUROC and F1 "
                         f"(found {int((~labels).sum())} good, {int(labels.sum())} defect).")
    masks = None
    if all(s.mask is not None for s in samples if s.is_anomalous):
        masks = np.stack([resize_mask(dataset.load_mask(s), cfg.image_size) if s.is_anomalous
                          else np.zeros((cfg.image_size, cfg.image_size), bool) for s in samples])
    else:
        logger.warning("%s: some test defects have no ground_truth mask; pixel AUROC is not computed", root)
    counts: dict[str, int] = {}
    for sample in samples:
        counts[sample.defect_class] = counts.get(sample.defect_class, 0) + 1
    test = [dataset.image_path(s) for s in samples]
    return _Data(root, train, test, labels, masks, counts, _files(test, root))


# --------------------------------------------------------------------------------------------------
# synthetic anomalies
# --------------------------------------------------------------------------------------------------

@dataclass
class _Synthetic:
    root: Path
    calibration: list[Path]
    train: AnomalySamples
    fingerprint: str
    counts: dict[str, int] = field(default_factory=dict)


def _generate_set(cfg: FewShotConfig, normal: Path, out_root: Path, seed: int, progress: bool) -> Path:
    """Generate (or resume, or reuse) the synthetic set for these settings under ``out_root``; returns its folder."""
    settings = {"method": cfg.synthetic_method, "n": cfg.synthetic_n, "seed": seed, "masks": cfg.masks,
                "defects": cfg.defects, "blend": cfg.synthetic_blend, "method_params": cfg.synthetic_params,
                "copy_normals": False}
    normals = sorted(list_images(normal))
    digest = stable_hash({"settings": settings, "normal": _files(normals, normal)})
    out = out_root / f"{cfg.synthetic_method}-{digest[:12]}"
    gen_cfg = validate_config(GenerateConfig, {**settings, "normal": normal, "out": out},
                              source="few-shot synthetic set")
    generate(gen_cfg, progress=progress)
    return out


def _read_synthetic(root: Path, cfg: FewShotConfig) -> _Synthetic:
    """Split a synthetic set's anomalies into calibration and training anomalies (module docstring)."""
    dataset = read_defect_set(root)
    anomalies = sorted(dataset.select(anomalous=True), key=lambda s: s.image)
    if not anomalies:
        raise InputError(f"{root}: the synthetic set holds no anomalous samples (all masks empty?); generate "
                         f"another one or change synthetic_method.")
    order = np.random.default_rng([cfg.seed, 1]).permutation(len(anomalies))
    n_cal = min(len(anomalies), max(1, round(cfg.synthetic_calibration_fraction * len(anomalies))))
    cal_ids = sorted(int(i) for i in order[:n_cal])
    train_ids = sorted(int(i) for i in order[n_cal:])
    if "train" in cfg.synthetic and not train_ids:
        raise InputError(f"{root}: only {len(anomalies)} anomalous sample(s), all used for calibration; mode 'train' "
                         f"needs more (raise synthetic_n or lower synthetic_calibration_fraction).")
    paths = [dataset.image_path(s) for s in anomalies]
    train = AnomalySamples([paths[i] for i in train_ids],
                           [dataset.load_mask(anomalies[i]) if anomalies[i].mask is not None else None
                            for i in train_ids], source="synthetic")
    counts: dict[str, int] = {}
    for sample in anomalies:
        counts[sample.defect_class] = counts.get(sample.defect_class, 0) + 1
    fingerprint = stable_hash({"files": _files(paths, root), "calibration": cal_ids})
    return _Synthetic(root.resolve(), [paths[i] for i in cal_ids], train, fingerprint, counts)


class _SyntheticSource:
    """The synthetic set(s) of a run, made on first use: one for the pool (or given), or one per shot subset."""

    def __init__(self, cfg: FewShotConfig, data: _Data, workdir: Path, progress: bool):
        self.cfg, self.data, self.workdir, self.progress = cfg, data, workdir, progress
        self.sets: dict[tuple[int, str], _Synthetic] = {}

    def get(self, repeat: int, k: Shot, shots: list[Path]) -> _Synthetic:
        cfg = self.cfg
        key = (repeat, str(k)) if cfg.synthetic_from == "shots" else (0, "pool")
        if key not in self.sets:
            if cfg.synthetic_set is not None:
                root = Path(cfg.synthetic_set)
            elif cfg.synthetic_from == "pool" or k == "all":
                seed = cfg.seed if cfg.synthetic_from == "pool" else cfg.seed + repeat
                root = _generate_set(cfg, self.data.root / "train" / GOOD, self.workdir / "synthetic", seed,
                                     self.progress)
            else:
                folder = self.workdir / "shots" / f"r{repeat}-k{k}"
                for path in shots:
                    target = folder / path.name
                    if not target.exists() or target.stat().st_size != path.stat().st_size:
                        copy_file(path, target)
                root = _generate_set(cfg, folder, self.workdir / "synthetic", cfg.seed + repeat, self.progress)
            self.sets[key] = _read_synthetic(root, cfg)
        return self.sets[key]

    def summary(self) -> str | None:
        """The set's folder (pool or given) or the folder holding the per-shot sets; None when none was made."""
        if not self.sets:
            return None
        if self.cfg.synthetic_from == "shots":
            return str((self.workdir / "synthetic").resolve())
        return str(next(iter(self.sets.values())).root)


# --------------------------------------------------------------------------------------------------
# one fit -> one or two cells
# --------------------------------------------------------------------------------------------------

def _finite(value: Any) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def _thin_roc(points: dict[str, list[float]], limit: int = ROC_LIMIT) -> dict[str, list[float]]:
    """At most ``limit`` points, evenly spaced along the curve, first and last kept."""
    n = len(points["fpr"])
    if n <= limit:
        return points
    keep = np.unique(np.linspace(0, n - 1, limit).round().astype(int))
    return {k: [points[k][i] for i in keep] for k in ("fpr", "tpr")}


def _at_threshold(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """F1, precision, recall and false-positive rate of ``score >= threshold`` (Detector.predict's rule)."""
    point = operating_point(scores, labels, threshold)
    return {"image_f1": point["f1"], "image_precision": point["precision"] or 0.0,
            "image_recall": point["recall"] or 0.0, "image_fpr": point["fpr"] or 0.0}


@dataclass
class _Unit:
    """One fit: the model, shots and repeat, trained on normals only (modes none/threshold) or with anomalies."""

    model: str
    k: Shot
    repeat: int
    with_anomalies: bool
    modes: list[str]


def _cell_name(model: str, mode: str, k: Shot, repeat: int) -> str:
    return f"{model}__{mode}__k{k}__r{repeat}"


def _fit_unit(cfg: FewShotConfig, unit: _Unit, data: _Data, shots: list[Path],
              synthetic: _Synthetic | None) -> dict[str, dict[str, Any]]:
    """Fit one detector and evaluate it for each of ``unit.modes``; returns {mode: cell}."""
    seed = cfg.seed + unit.repeat
    options = {**cfg.model_options.get(unit.model, {}), "image_size": cfg.image_size, "seed": seed,
               "threshold_method": "fpr", "target_fpr": cfg.target_fpr, "synthetic_val": True,
               "val_fraction": cfg.holdout_fraction}
    detector = registry.create(unit.model, **options)
    anomalies = synthetic.train if unit.with_anomalies and synthetic is not None else None
    start = time.perf_counter()
    detector.fit(shots, anomalies=anomalies, progress=False)
    fit_s = time.perf_counter() - start
    calibration, held_out = detector.calibration, detector.calibration_scores
    assert calibration is not None and held_out is not None

    test = detector.predict(data.test)
    metrics = evaluate(test.scores, data.labels, test.anomaly_maps if data.masks is not None else None, data.masks)
    fit_images = len(shots) if held_out.scheme != "holdout" else len(shots) - calibration.num_normal
    base = {
        "model": unit.model, "k": unit.k, "k_images": len(shots), "repeat": unit.repeat, "seed": seed,
        "fit_images": fit_images, "calibration_normals": calibration.num_normal,
        "calibration_scheme": held_out.scheme, "calibration_in_sample": held_out.scheme == "in-sample",
        "train_anomalies": len(anomalies) if anomalies is not None else 0,
        "image_auroc": _finite(metrics["image_auroc"]), "image_ap": _finite(metrics["image_ap"]),
        "image_f1_max": _finite(metrics["image_f1_max"]),
        "pixel_auroc": _finite(metrics.get("pixel_auroc")), "aupro": _finite(metrics.get("aupro")),
        "target_fpr": cfg.target_fpr, "oracle_recall": oracle_recall(test.scores, data.labels, cfg.target_fpr),
        "fit_s": fit_s, "roc": _thin_roc(roc_points(test.scores, data.labels)),
        "shots": [p.name for p in shots], "skipped": None,
    }
    cells = {}
    for mode in unit.modes:
        chosen = calibration  # "none" / "train": the fit's own threshold
        if mode == "threshold":  # the same weights, re-calibrated: F1 on the held-out normals + synthetic anomalies
            assert synthetic is not None
            anomalies = AnomalySamples(synthetic.calibration, [None] * len(synthetic.calibration), "synthetic")
            chosen = detector.calibrate(anomalies=anomalies, threshold_method="f1").calibration
            assert chosen is not None
        # calibration_fpr: share of the held-out normals (and views) flagged at fit time, beside image_fpr measured
        # on the test normals.
        cells[mode] = {**base, "synthetic": mode, "threshold": chosen.image_threshold,
                       "threshold_method": chosen.method, "calibration_anomalies": chosen.num_anomalous,
                       "estimated_recall": chosen.estimated_recall, "threshold_tail": chosen.tail,
                       "threshold_warning": chosen.warning, "calibration_fpr": chosen.calibration_fpr,
                       **_at_threshold(test.scores, data.labels, chosen.image_threshold)}
    return cells


def _skipped_cell(model: str, mode: str, k: Shot, repeat: int, seed: int, k_images: int | None,
                  reason: str) -> dict[str, Any]:
    return {"model": model, "k": k, "k_images": k_images, "repeat": repeat, "seed": seed, "synthetic": mode,
            "skipped": reason, **dict.fromkeys(METRICS)}


# --------------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------------

def _aggregate(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the repeats of a (model, synthetic, k) cell: means (and stds) of the metrics."""
    first = cells[0]
    row = {key: first.get(key) for key in ("model", "k", "k_images", "synthetic", "threshold_method",
                                           "fit_images", "calibration_normals", "calibration_anomalies",
                                           "calibration_scheme", "calibration_in_sample", "train_anomalies",
                                           "target_fpr", "threshold_warning", "seed")}
    row["seeds"] = [c["seed"] for c in cells]
    row["repeats"] = len(cells)
    done = [c for c in cells if not c.get("skipped") and not c.get("error")]
    for metric in METRICS:
        values = [c[metric] for c in done if c.get(metric) is not None]
        row[metric] = float(np.mean(values)) if values else None
        if len(cells) > 1 and metric in STD_METRICS:
            row[f"{metric}_std"] = float(np.std(values)) if values else None
    row["skipped"] = next((c["skipped"] for c in cells if c.get("skipped")), None)
    row["error"] = next((c["error"] for c in cells if c.get("error")), None)
    return row


class FewShotResult(TypedDict):
    """What the few-shot stage records (``fewshot.json``, ``results.json["fewshot"]``)."""

    kind: Literal["fewshot"]
    shots: list[Shot]
    rows: list[dict[str, Any]]  # one per (model, synthetic mode, k): means and stds over the repeats (METRICS)
    roc: dict[str, dict[str, list[float]]]  # "model|mode|k=K" -> thinned ROC of the first repeat
    synthetic_set: str | None  # the synthetic set's folder (or the folder of the per-shot sets)
    synthetic_counts: dict[str, int] | None
    n_train: int
    test_counts: dict[str, int]
    shot_order: dict[str, list[str]]  # repeat -> the pool's image names in the order shots are taken
    seeds: dict[str, Any]
    cells_reused: int
    config: dict[str, Any]


def run_fewshot(cfg: FewShotConfig, workdir: Path, *, progress: bool = True) -> FewShotResult:
    """Run every (model, k, synthetic mode, repeat) cell, reusing finished ones; returns the JSON-safe summary.

    Raises:
        ConfigError: a setting is invalid (the message names the key).
        InputError: the data folder is unusable (no train/good, no test split, ...).
    """
    # Validate again: the runner fills synthetic_set with model_copy, which skips validation.
    cfg = validate_config(FewShotConfig, cfg.model_dump(), source="fewshot")
    workdir = Path(workdir)
    data = _load_data(cfg)
    source = _SyntheticSource(cfg, data, workdir, progress)
    needs_synthetic = any(m != "none" for m in cfg.synthetic)
    orders = {r: shot_order(len(data.train), cfg.seed + r) for r in range(cfg.repeats)}

    units: list[tuple[_Unit, list[Path]]] = []
    skipped: dict[str, dict[str, Any]] = {}
    for model in cfg.models:
        able = registry.get_model_class(model).supports_anomalies
        for repeat in range(cfg.repeats):
            for k in cfg.shots:
                size = len(data.train) if k == "all" else int(k)
                seed = cfg.seed + repeat
                if size > len(data.train):
                    for mode in cfg.synthetic:
                        skipped[_cell_name(model, mode, k, repeat)] = _skipped_cell(
                            model, mode, k, repeat, seed, None,
                            f"k={k} exceeds the {len(data.train)} images of train/good")
                    continue
                shots = [data.train[i] for i in orders[repeat][:size]]
                normal_modes = [m for m in cfg.synthetic if m in ("none", "threshold")]
                if normal_modes:
                    units.append((_Unit(model, k, repeat, False, normal_modes), shots))
                if "train" in cfg.synthetic:
                    if able:
                        units.append((_Unit(model, k, repeat, True, ["train"]), shots))
                    else:
                        skipped[_cell_name(model, "train", k, repeat)] = _skipped_cell(
                            model, "train", k, repeat, seed, size,
                            f"{model} trains on normal images only (no supports_anomalies)")

    cells: dict[str, dict[str, Any]] = dict(skipped)
    cells_dir = workdir / CELLS_DIR
    total = sum(len(u.modes) for u, _ in units) + len(skipped)
    reused = 0
    with tqdm(total=total, initial=len(skipped), desc="fewshot cells", unit="cell", disable=not progress) as bar:
        for unit, shots in units:
            synthetic = source.get(unit.repeat, unit.k, shots) if needs_synthetic else None
            keys = {}
            for mode in unit.modes:
                keys[mode] = stable_hash({
                    "version": CACHE_VERSION, "model": unit.model, "mode": mode, "k": unit.k, "repeat": unit.repeat,
                    "options": cfg.model_options.get(unit.model, {}), "image_size": cfg.image_size,
                    "seed": cfg.seed + unit.repeat, "shots": _files(shots, data.root), "test": data.test_files,
                    "holdout": cfg.holdout_fraction, "target_fpr": cfg.target_fpr,
                    "synthetic": synthetic.fingerprint if synthetic is not None and mode != "none" else None,
                })
            cached = {}
            for mode in unit.modes:
                record = read_json_if_exists(cells_dir / f"{_cell_name(unit.model, mode, unit.k, unit.repeat)}.json")
                if isinstance(record, dict) and record.get("key") == keys[mode]:
                    cached[mode] = record["cell"]
            if len(cached) == len(unit.modes):
                reused += len(cached)
                for mode, cell in cached.items():
                    cells[_cell_name(unit.model, mode, unit.k, unit.repeat)] = cell
                bar.update(len(cached))
                continue
            bar.set_postfix_str(f"{unit.model} k={unit.k} r={unit.repeat}"
                                f"{' +anomalies' if unit.with_anomalies else ''}")
            try:
                fitted = _fit_unit(cfg, unit, data, shots, synthetic)
            except Exception as exc:  # noqa: BLE001 - one model's failure must not end a long run (unless strict)
                if cfg.strict:
                    raise
                message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                logger.warning("few-shot cell %s k=%s failed: %s", unit.model, unit.k, message)
                fitted = {mode: {**_skipped_cell(unit.model, mode, unit.k, unit.repeat, cfg.seed + unit.repeat,
                                                 len(shots), ""), "skipped": None, "error": message}
                          for mode in unit.modes}
            else:
                for mode, cell in fitted.items():
                    name = _cell_name(unit.model, mode, unit.k, unit.repeat)
                    write_json(cells_dir / f"{name}.json", {"key": keys[mode], "cell": cell})
            for mode, cell in fitted.items():
                cells[_cell_name(unit.model, mode, unit.k, unit.repeat)] = cell
            bar.update(len(fitted))

    rows, roc = [], {}
    for model in cfg.models:
        for mode in cfg.synthetic:
            for k in cfg.shots:
                members = [cells[_cell_name(model, mode, k, r)] for r in range(cfg.repeats)]
                rows.append(_aggregate(members))
                first = members[0]
                if first.get("roc"):
                    roc[f"{model}|{mode}|k={k}"] = first["roc"]
    result: FewShotResult = {
        "kind": "fewshot", "shots": list(cfg.shots), "rows": rows, "roc": roc,
        "synthetic_set": source.summary(),
        "synthetic_counts": next(iter(source.sets.values())).counts if source.sets else None,
        "n_train": len(data.train), "test_counts": data.counts,
        "shot_order": {str(r): [data.train[i].name for i in order] for r, order in orders.items()},
        "seeds": {"seed": cfg.seed, "shots_and_models": [cfg.seed + r for r in range(cfg.repeats)],
                  "synthetic_generation": cfg.seed if cfg.synthetic_from == "pool"
                  else [cfg.seed + r for r in range(cfg.repeats)],
                  "synthetic_split": [cfg.seed, 1]},
        "cells_reused": reused,
        "config": cfg.model_dump(mode="json"),
    }
    write_json(workdir / SUMMARY_FILE, result)
    return result


# --------------------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------------------

def _fmt(value: Any, std: Any = None) -> str:
    if value is None:
        return "-"
    text = f"{value:.3f}"
    return f"{text}±{std:.3f}" if std is not None else text


def fewshot_table(result: dict[str, Any],
                  metrics: tuple[str, ...] = ("image_auroc", "image_fpr", "image_recall")) -> str:
    """Markdown table of a ``run_fewshot`` result: rows model x synthetic mode, columns k; each cell shows
    ``metrics`` joined by " / " (default image AUROC / false-positive rate / recall at the chosen threshold)."""
    rows = result.get("rows") or []
    shots = list(result.get("shots") or dict.fromkeys(r["k"] for r in rows))
    sizes = {str(r["k"]): r.get("k_images") for r in rows if r.get("k_images") is not None}
    header = [f"k={k}" + (f" ({sizes[str(k)]})" if k == "all" and str(k) in sizes else "") for k in shots]
    labels = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO", "image_ap": "image AP",
              "image_f1": "image F1 at the chosen threshold", "image_f1_max": "image F1-max",
              "image_fpr": "false-positive rate at the chosen threshold", "image_recall": "recall at it",
              "oracle_recall": "recall at the target rate on the ROC"}
    lines = [f"Each cell: {' / '.join(labels.get(m, m.replace('_', ' ')) for m in metrics)}.", "",
             "| model | synthetic | " + " | ".join(header) + " |",
             "|---|---|" + "---:|" * len(shots)]
    table: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for row in rows:
        table.setdefault((str(row["model"]), str(row["synthetic"])), {})[str(row["k"])] = row
    for (model, mode), by_k in table.items():
        values = []
        for k in shots:
            row = by_k.get(str(k))
            if row is None:
                values.append("")
            elif row.get("skipped"):
                values.append("skipped")
            elif row.get("error"):
                values.append("error")
            else:
                values.append(" / ".join(_fmt(row.get(m), row.get(f"{m}_std")) for m in metrics))
        lines.append(f"| {model} | {mode} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# the pipeline stage
# --------------------------------------------------------------------------------------------------

def stage_fewshot(ctx: StageContext) -> FewShotResult:
    """The ``fewshot`` stage of ``pipelines run``: :func:`run_fewshot` in the stage folder, with the run's shared
    synthetic set unless the section names or makes its own."""
    section = ctx.section
    shared = synthetic_set_of(ctx.deps)
    if shared is not None and fewshot_uses_shared_set(ctx.loaded):
        # run_fewshot validates its config again, so the copy's new field is checked there.
        section = section.model_copy(update={"synthetic_set": shared[1]})
    return run_fewshot(section, ctx.plan.dir / "work", progress=ctx.progress)


def _fewshot_dependencies(loaded: LoadedConfig, enabled: set[str]) -> list[str]:
    return [shared_set_stage(enabled)] if fewshot_uses_shared_set(loaded) else []


# synthetic_set is the runner's too, unless the section sets it (see pipelines.stage.fewshot_wants_shared).
PIPELINE_STAGES = {"fewshot": Stage(stage_fewshot, FewShotConfig, ("data",), depends=_fewshot_dependencies,
                                    warm=True)}
