"""The k-shot decision table: what do synthetic defects buy an engineer who has k real photos of each defect?

Protocol (one readable pass; every unit is cached, so a killed run resumes):

1. **Split, per repeat and per defect class** (seeded): the class's real defects are shuffled; the first
   ``max(shots)`` are the *pool* of known defects and the first ``k`` of it the known defects at ``k`` (nested:
   the 1 known defect is among the 3, the 3 among the 10). Everything after the pool, plus every ``test/good``
   image, is the **evaluation set**, the same for every k and arm of a repeat. No generator, filter, threshold or
   model choice ever sees it: the run records file fingerprints of everything generation reads and refuses to go
   on if one is an evaluation image (``leak_check`` in the result).
2. **Training normals**: ``normals`` images of ``train/good`` (seeded per repeat), the same for every arm.
3. **Synthetic sets per (repeat, k)**, each class generated separately from its k known defects only:
   ``synthetic`` (``synth generate`` with ``generator``, by default mask-guided ``paste`` with the exemplars'
   statistics: position, orientation, harmonised texture, context-matched normals); ``filtered`` (that set after
   ``synth filter``, ranked per class against the k known defects only); ``crop_paste`` (the bounding box pasted
   unblended: the naive baseline). Per repeat: ``generic`` (``synth generate`` DRAEM anomalies; no real defect).
4. **Arms** (the same model, recipe and step budget within a task):

   ============== ===================================================================== ======= ==========
   arm            training anomalies                                                    classif detection
   ============== ===================================================================== ======= ==========
   normals_only   none (the best unsupervised detector, ``unsupervised``: "do nothing")  --      yes
   real           the k known defects per class (augmented by the model's recipe)       yes     yes
   synthetic      synthetic made from them, without the real ones                       yes     yes
   real+synthetic both; real and synthetic each ``real_share`` / 1 - ``real_share``     yes     yes
   real+filtered  the known defects + the filtered synthetic set                        yes     yes
   real+crop_paste the known defects + crop & paste                                     yes     yes
   generic        DRAEM anomalies only (no real defect)                                 --      yes
   ============== ===================================================================== ======= ==========

5. **Tasks**: ``classification`` (datasets with 2+ classes): ``detect.classify.DefectClassifier``, balanced
   accuracy (mean per-class accuracy) on the evaluation defects. ``detection``: the supervised detector-segmenter
   ``detector`` (a registered model with ``supports_anomalies``, default SuperSimpleNet-supervised) fitted on the
   training normals plus the arm's anomalies; its own threshold (``target_fpr`` on held-out normals, see
   ``detect.calibration``); image AUROC, FPR / recall / F1 at that threshold, pixel AP and AUPRO at the model's
   input size, on the evaluation set.
6. **Realism** of every synthetic set beside its arm: KID against the evaluation defects and IC-LPIPS diversity
   (``pipelines.realism``; measured, never used to choose anything).

Workdir layout::

    r<repeat>/normals/                      the repeat's training normals (copies)
    r<repeat>/generic/                      generic synthetic set (DRAEM)
    r<repeat>/k<k>/exemplars/<class>/       the k known defects as ``synth generate`` reads them
    r<repeat>/k<k>/known/<class>/           the same images as ``synth filter``'s real-defect reference
    r<repeat>/k<k>/{synthetic,filtered,crop_paste}/set/
    cells/<task>__<arm>__k<k>__r<repeat>.json   one finished model: {"key", "result"}
    realism/<set>__k<k>__r<repeat>.json
    decision.json                           the returned summary
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np
from pydantic import Field, field_validator

from detect import registry
from detect.calibration import operating_point
from detect.classify import ClassifierConfig, DefectClassifier, LabeledImages
from detect.classify.metrics import classification_metrics
from detect.data import resize_mask
from detect.metrics import evaluate
from pipelines.classification import (
    class_seed,
    crop_paste_one,
    merge_class_sets,
    prepare_dir,
    seeded_subset,
    stable_hash,
    write_exemplars,
)
from pipelines.stage import Stage, StageContext
from synth.config import GenerateConfig
from synth.core.config import StrictModel, validate_config
from synth.core.defect_set import GOOD, DefectSample, DefectSet, DefectSetWriter, read_defect_set
from synth.core.errors import InputError
from synth.core.io import copy_file, read_image, read_json_if_exists, write_json
from synth.generate import generate, sample_seed

logger = logging.getLogger(__name__)

__all__ = ["ARMS", "PIPELINE_STAGES", "DecisionConfig", "decision_rows", "run_decision", "split_pool"]

ARMS = ("normals_only", "real", "synthetic", "real+synthetic", "real+filtered", "real+crop_paste", "generic")
TASKS = ("classification", "detection")
# Arms that need no real defect and no class label: they exist for detection only and do not depend on k.
K_FREE_ARMS = ("normals_only", "generic")
CLASSIFICATION_ARMS = ("real", "synthetic", "real+synthetic", "real+filtered", "real+crop_paste")
# The synthetic set each arm trains on (None: real defects only / none).
ARM_SET = {"synthetic": "synthetic", "real+synthetic": "synthetic", "real+filtered": "filtered",
           "real+crop_paste": "crop_paste", "generic": "generic"}
DETECTION_METRICS = ("image_auroc", "image_ap", "image_fpr", "image_recall", "image_f1", "pixel_ap", "aupro")
HEADLINE = {"classification": "mean_accuracy", "detection": "image_auroc", "segmentation": "pixel_ap"}
SUMMARY_FILE = "decision.json"
CACHE_VERSION = 1

DEFAULT_GENERATOR: dict[str, Any] = {
    "method": "paste", "blend": "texture", "normal_match": "exemplar",
    "method_params": {"size_reference": "image", "min_inside": 0.5, "position": "exemplar",
                      "orientation": "exemplar", "harmonize": True},
}


class DecisionConfig(StrictModel):
    """Settings of the decision table (see the module docstring)."""

    data: Path = Field(description="MVTec-layout folder: train/good, test/<class> and ground_truth/<class> masks")
    shots: list[int] = Field(default_factory=lambda: [1, 3, 10], description="known real defects per class (k)")
    repeats: int = Field(3, ge=1, description="seeded repeats (split, normals, generation, training)")
    seed: int = Field(0, ge=0)
    arms: list[Literal["normals_only", "real", "synthetic", "real+synthetic", "real+filtered", "real+crop_paste",
                       "generic"]] = Field(default_factory=lambda: list(ARMS))
    tasks: list[Literal["classification", "detection"]] = Field(
        default_factory=lambda: list(TASKS), description="classification is skipped for one-class data")
    normals: int = Field(100, ge=2, description="training normals drawn from train/good per repeat")
    max_eval_good: int | None = Field(None, gt=0, description="most test/good images evaluated (seeded)")
    n_per_class: int = Field(60, gt=0, description="synthetic (and crop & paste) defects per class")
    generator: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_GENERATOR),
                                      description="synth generate settings of the synthetic arms (no normal/out)")
    generic: dict[str, Any] = Field(default_factory=lambda: {"method": "draem"},
                                    description="synth generate settings of the generic arm (model-free)")
    filter: dict[str, Any] = Field(default_factory=lambda: {"embedder": "lite0", "image_size": 128},
                                   description="synth filter settings (ratios, embedder); per_class is on")
    real_share: float = Field(0.5, gt=0, lt=1, description="share of the training anomalies that are real in the "
                                                           "real+... arms (sampling weight / repeats)")
    image_size: int = Field(128, ge=32, le=1024, description="input size of both models")
    classifier: dict[str, Any] = Field(default_factory=lambda: {"steps": 100, "batch_size": 16},
                                       description="detect.classify.ClassifierConfig settings")
    detector: str = Field("supersimplenet", description="registered model with supports_anomalies")
    detector_options: dict[str, Any] = Field(default_factory=lambda: {
        "steps": 150, "batch_size": 16, "hidden_dim": 256, "upscale": 1, "flips": True})
    unsupervised: str = Field("patchcore", description="model of the normals_only arm")
    unsupervised_options: dict[str, Any] = Field(default_factory=dict)
    target_fpr: float = Field(0.05, gt=0, lt=1, description="the detectors' threshold target")
    realism: bool = Field(True, description="KID and IC-LPIPS of every synthetic set")
    realism_max_images: int = Field(30, ge=2, description="most images per side in the realism metrics")

    @field_validator("shots")
    @classmethod
    def _valid_shots(cls, value: list[int]) -> list[int]:
        if not value or any(k < 1 for k in value):
            raise ValueError("shots must be a non-empty list of integers >= 1")
        return sorted(set(value))

    @field_validator("arms", "tasks")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one")
        return list(dict.fromkeys(value))

    @field_validator("detector")
    @classmethod
    def _supervised(cls, value: str) -> str:
        if value not in registry.list_models():
            raise ValueError(f"unknown model; choose one of {registry.list_models()}")
        if not registry.get_model_class(value).supports_anomalies:
            able = [n for n in registry.list_models() if registry.get_model_class(n).supports_anomalies]
            raise ValueError(f"{value} cannot train on labeled anomalies; choose one of {able}")
        return value

    @field_validator("unsupervised")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in registry.list_models():
            raise ValueError(f"unknown model; choose one of {registry.list_models()}")
        return value


# --------------------------------------------------------------------------------------------------
# split, fingerprints
# --------------------------------------------------------------------------------------------------

def split_pool(dataset: DefectSet, classes: list[str], pool_size: int, seed: int
               ) -> dict[str, tuple[list[DefectSample], list[DefectSample]]]:
    """Per class (pool, held out): the first ``pool_size`` of a seeded shuffle and the rest (disjoint)."""
    out = {}
    for defect_class in classes:
        samples = sorted(dataset.select(split="test", defect_class=defect_class), key=lambda s: s.image)
        if len(samples) <= pool_size:
            raise InputError(f"{dataset.root}: defect class {defect_class!r} has {len(samples)} image(s); shots up "
                             f"to {pool_size} need at least {pool_size + 1} (one left to evaluate on). Lower the "
                             f"largest 'shots' value or add images to test/{defect_class}.")
        order = np.random.default_rng(class_seed(seed, "pool", defect_class)).permutation(len(samples))
        out[defect_class] = ([samples[i] for i in order[:pool_size]], [samples[i] for i in order[pool_size:]])
    return out


def file_digest(path: Path) -> str:
    """sha1 of the file's bytes: identifies an image wherever it was copied."""
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# data of one repeat
# --------------------------------------------------------------------------------------------------

@dataclass
class _Known:
    """The known real defects at one k: per class a list of (image path, bool mask)."""

    by_class: dict[str, list[tuple[Path, np.ndarray]]]

    def items(self) -> list[tuple[Path, np.ndarray, str]]:
        return [(p, m, c) for c, pairs in self.by_class.items() for p, m in pairs]


@dataclass
class _Repeat:
    index: int
    seed: int
    normals: list[Path]
    normal_dir: Path
    pool: dict[str, list[DefectSample]]
    eval_images: list[Path]
    eval_labels: np.ndarray        # anomalous?
    eval_classes: list[str]        # "good" or the defect class
    eval_masks: list[Path | None]


def _load_repeat(cfg: DecisionConfig, dataset: DefectSet, classes: list[str], repeat: int, workdir: Path
                 ) -> _Repeat:
    seed = cfg.seed + repeat
    split = split_pool(dataset, classes, max(cfg.shots), seed)
    train_good = sorted(dataset.select(split="train", defect_class=GOOD), key=lambda s: s.image)
    if len(train_good) < 2:
        raise InputError(f"{dataset.root}: train/good has {len(train_good)} image(s); the table needs normal images "
                         f"to train on and to generate on.")
    normals = [dataset.image_path(s) for s in seeded_subset(train_good, cfg.normals, class_seed(seed, "normals", ""))]
    normal_dir = workdir / f"r{repeat}" / "normals"
    prepare_dir(normal_dir, stable_hash([str(p) for p in normals]))
    for path in normals:
        if not (normal_dir / path.name).exists():
            copy_file(path, normal_dir / path.name)
    good = sorted(dataset.select(split="test", defect_class=GOOD), key=lambda s: s.image)
    if not good:
        raise InputError(f"{dataset.root}: test/good is empty; the false-positive rate needs normal test images.")
    good = seeded_subset(good, cfg.max_eval_good, class_seed(seed, "eval_good", ""))
    held = [s for c in classes for s in split[c][1]]
    samples = good + held
    return _Repeat(
        index=repeat, seed=seed, normals=normals, normal_dir=normal_dir,
        pool={c: split[c][0] for c in classes},
        eval_images=[dataset.image_path(s) for s in samples],
        eval_labels=np.array([s.is_anomalous for s in samples]),
        eval_classes=[s.defect_class for s in samples],
        eval_masks=[dataset.mask_path(s) if s.is_anomalous else None for s in samples],
    )


def _known_at(dataset: DefectSet, rep: _Repeat, k: int) -> _Known:
    by_class = {}
    for defect_class, pool in rep.pool.items():
        pairs = []
        for sample in pool[:k]:
            path = dataset.image_path(sample)
            pairs.append((path, dataset.load_mask(sample, read_image(path).shape[:2])))
        by_class[defect_class] = pairs
    return _Known(by_class)


# --------------------------------------------------------------------------------------------------
# synthetic sets
# --------------------------------------------------------------------------------------------------

def _generate_from_known(cfg: DecisionConfig, dataset: DefectSet, rep: _Repeat, k: int, folder: Path,
                         progress: bool) -> DefectSet:
    """``n_per_class`` defects per class from that class's k known defects only, merged into one labeled set."""
    exemplars = folder.parent / "exemplars"
    parts = {}
    for defect_class, pool in rep.pool.items():
        write_exemplars(dataset, pool[:k], exemplars / defect_class, defect_class)
        gen_cfg = validate_config(GenerateConfig, {
            **cfg.generator, "normal": rep.normal_dir, "out": folder / "classes" / defect_class,
            "n": cfg.n_per_class, "seed": class_seed(rep.seed, f"generate-k{k}", defect_class),
            "masks": exemplars / defect_class / "masks", "defects": exemplars / defect_class / "images",
            "defect_class": defect_class, "copy_normals": False, "preview": 0,
        }, source="decision config (generator)")
        parts[defect_class] = generate(gen_cfg, progress=progress).dataset
    return merge_class_sets(parts, folder / "set", {"generator": cfg.generator.get("method"), "pipeline": "decision",
                                                   "k": k, "repeat": rep.index})


def _filter_set(cfg: DecisionConfig, dataset: DefectSet, rep: _Repeat, k: int, generated: Path, folder: Path,
                progress: bool) -> DefectSet:
    """``synth filter`` of the synthetic set, ranked per class against the k known defects only."""
    from synth.filter import FilterConfig, filter_defect_set

    known = folder.parent / "known"
    for defect_class, pool in rep.pool.items():
        for sample in pool[:k]:
            path = dataset.image_path(sample)
            if not (known / defect_class / path.name).exists():
                copy_file(path, known / defect_class / path.name)
    filter_cfg = validate_config(FilterConfig, {
        **cfg.filter, "generated": generated, "real_defects": known, "out": folder / "set",
        "normals": rep.normal_dir, "per_class": True, "copy_normals": False, "seed": rep.seed,
    }, source="decision config (filter)")
    return filter_defect_set(filter_cfg, progress=progress).dataset


def _crop_paste_set(cfg: DecisionConfig, known: _Known, rep: _Repeat, k: int, out: Path) -> DefectSet:
    writer = DefectSetWriter(out)
    for defect_class, pairs in known.by_class.items():
        # A known defect image whose mask is empty has nothing to crop (the paste generator skips it too).
        sources = [(p, read_image(p), m) for p, m in pairs if m.any()]
        if not sources:
            logger.warning("repeat %d, k=%d: every known %r defect has an empty mask; no crop & paste samples for "
                           "that class", rep.index, k, defect_class)
            continue
        for index in range(cfg.n_per_class):
            name = f"crop_paste_{index:05d}"
            if writer.has(name, split="test", defect_class=defect_class):
                continue
            seed = sample_seed(class_seed(rep.seed, f"crop_paste-k{k}", defect_class), index)
            rng = np.random.default_rng(seed)
            path, image, mask = sources[int(rng.integers(len(sources)))]
            target = rep.normals[int(rng.integers(len(rep.normals)))]
            result, result_mask = crop_paste_one(read_image(target), image, mask, rng)
            writer.add(result, name=name, split="test", defect_class=defect_class, mask=result_mask,
                       generator="crop_paste", params={"source": path.name}, seed=seed, source_image=str(target))
    return writer.finalize({"generator": "crop_paste", "pipeline": "decision", "k": k, "repeat": rep.index})


def _generic_set(cfg: DecisionConfig, rep: _Repeat, classes: list[str], folder: Path, progress: bool) -> DefectSet:
    gen_cfg = validate_config(GenerateConfig, {
        **cfg.generic, "normal": rep.normal_dir, "out": folder,
        "n": cfg.n_per_class * max(1, len(classes)), "seed": class_seed(rep.seed, "generic", ""),
        "copy_normals": False, "preview": 0,
    }, source="decision config (generic)")
    return generate(gen_cfg, progress=progress).dataset


class _Sets:
    """Builds (or reuses) every synthetic set of the run; each folder is keyed by what made it."""

    def __init__(self, cfg: DecisionConfig, dataset: DefectSet, classes: list[str], workdir: Path, progress: bool):
        self.cfg, self.dataset, self.classes, self.workdir, self.progress = cfg, dataset, classes, workdir, progress
        self.generation_inputs: dict[str, set[str]] = {}  # set folder -> digests of the real images it read

    def folder(self, rep: _Repeat, k: int | None, name: str) -> Path:
        base = self.workdir / f"r{rep.index}"
        return base / name if k is None else base / f"k{k}" / name

    def key(self, rep: _Repeat, k: int | None, name: str) -> str:
        cfg = self.cfg
        pool = {c: [s.image for s in p[:k]] for c, p in rep.pool.items()} if k is not None else None
        settings = {"synthetic": cfg.generator, "filtered": [cfg.generator, cfg.filter], "crop_paste": None,
                    "generic": cfg.generic}[name]
        return stable_hash({"v": CACHE_VERSION, "data": str(cfg.data.resolve()), "pool": pool, "seed": rep.seed,
                            "normals": [str(p) for p in rep.normals], "n": cfg.n_per_class, "settings": settings,
                            "workdir": str(self.workdir)})

    def get(self, rep: _Repeat, k: int | None, name: str, known: _Known | None = None) -> DefectSet:
        folder = self.folder(rep, k, name)
        key = self.key(rep, k, name)
        done = read_json_if_exists(folder / "done.json")
        set_dir = folder if name == "generic" else folder / "set"
        if isinstance(done, dict) and done.get("key") == key and (set_dir / "manifest.jsonl").is_file():
            dataset = read_defect_set(set_dir)
        else:
            prepare_dir(folder, key)
            logger.info("repeat %d, k=%s: building the %s set", rep.index, k, name)
            if name == "synthetic":
                assert k is not None
                dataset = _generate_from_known(self.cfg, self.dataset, rep, k, folder, self.progress)
            elif name == "filtered":
                assert k is not None
                synthetic = self.get(rep, k, "synthetic", known)
                dataset = _filter_set(self.cfg, self.dataset, rep, k, synthetic.root, folder, self.progress)
            elif name == "crop_paste":
                assert k is not None and known is not None
                dataset = _crop_paste_set(self.cfg, known, rep, k, folder / "set")
            else:
                dataset = _generic_set(self.cfg, rep, self.classes, set_dir, self.progress)
            write_json(folder / "done.json", {"key": key})
        # Every image this set's generation read: the training normals, the known defects and their copies in the
        # exemplar folders. The run checks that none of them is an evaluation image.
        reads = list(rep.normals) + ([p for p, _m, _c in known.items()] if known is not None else [])
        if k is not None:
            reads += [p for sub in ("exemplars", "known") for p in (folder.parent / sub).rglob("*")
                      if p.is_file() and p.suffix.lower() != ".json"]
        self.generation_inputs[str(dataset.root)] = {file_digest(p) for p in reads}
        return dataset


def _synthetic_items(dataset: DefectSet, classes: list[str]) -> list[tuple[Path, DefectSample]]:
    return [(dataset.image_path(s), s) for s in dataset.select(split="test", anomalous=True)
            if s.defect_class in classes or not classes]


# --------------------------------------------------------------------------------------------------
# cells
# --------------------------------------------------------------------------------------------------

def _classification_cell(cfg: DecisionConfig, arm: str, known: _Known, synthetic: DefectSet | None,
                         rep: _Repeat, classes: list[str]) -> dict[str, Any]:
    images: list[Any] = []
    labels: list[int] = []
    sources: list[str] = []
    if arm != "synthetic":
        for path, _mask, defect_class in known.items():
            images.append(path)
            labels.append(classes.index(defect_class))
            sources.append("real")
    n_real = len(images)
    if synthetic is not None:
        for path, sample in _synthetic_items(synthetic, classes):
            images.append(path)
            labels.append(classes.index(sample.defect_class))
            sources.append("synthetic")
    n_synthetic = len(images) - n_real
    options = {"image_size": cfg.image_size, "seed": rep.seed, **cfg.classifier}
    if n_real and n_synthetic:
        # Real and synthetic each get their share of the batches whatever the set sizes (a weight per image).
        options["synthetic_weight"] = (1 - cfg.real_share) / cfg.real_share * n_real / n_synthetic
    classifier = DefectClassifier(validate_config(ClassifierConfig, options, source="decision config (classifier)"))
    started = time.perf_counter()
    classifier.fit_labeled(LabeledImages(images, labels, classes, sources), progress=False)
    fit_s = time.perf_counter() - started
    held = [i for i, c in enumerate(rep.eval_classes) if c != GOOD]
    truth = [classes.index(rep.eval_classes[i]) for i in held]
    prediction = classifier.predict([rep.eval_images[i] for i in held])
    metrics = classification_metrics(truth, prediction.indices.tolist(), classes)
    # The mean probability of the true class: tells two models apart even where both predict the same labels.
    true_class_probability = float(prediction.probabilities[np.arange(len(truth)), truth].mean()) if truth else 0.0
    return {**metrics, "true_class_probability": round(true_class_probability, 6),
            "n_real": n_real, "n_synthetic": n_synthetic, "n_eval": len(held),
            "synthetic_weight": options.get("synthetic_weight", 1.0), "fit_s": round(fit_s, 3),
            "steps": classifier.config.steps}


def _eval_masks(rep: _Repeat, size: int) -> np.ndarray:
    from synth.core.io import read_mask

    masks = []
    for path, mask_path in zip(rep.eval_images, rep.eval_masks, strict=True):
        if mask_path is None:
            masks.append(np.zeros((size, size), bool))
        else:
            masks.append(resize_mask(read_mask(mask_path, shape=read_image(path).shape[:2]), size))
    return np.stack(masks)


def _detection_cell(cfg: DecisionConfig, arm: str, known: _Known | None, synthetic: DefectSet | None,
                    rep: _Repeat, masks: np.ndarray) -> dict[str, Any]:
    anomalies: list[tuple[Any, np.ndarray]] = []
    real = [(path, mask) for path, mask, _ in known.items()] if known is not None else []  # the caller: real arms only
    synthetic_items = []
    if synthetic is not None:
        synthetic_items = [(path, synthetic.load_mask(s)) for path, s in _synthetic_items(synthetic, [])]
    if real and synthetic_items:
        # The supervised detector samples anomalies uniformly: repeat the real ones to their real_share.
        copies = max(1, round(cfg.real_share / (1 - cfg.real_share) * len(synthetic_items) / len(real)))
        anomalies = real * copies + synthetic_items
    else:
        anomalies = real + synthetic_items
    common = {"image_size": cfg.image_size, "seed": rep.seed, "threshold_method": "fpr", "target_fpr": cfg.target_fpr}
    if arm == "normals_only":
        detector = registry.create(cfg.unsupervised, **{**cfg.unsupervised_options, **common})
        model = cfg.unsupervised
    else:
        detector = registry.create(cfg.detector, **{**cfg.detector_options, **common})
        model = cfg.detector
    started = time.perf_counter()
    detector.fit(rep.normals, anomalies=anomalies or None, progress=False)
    fit_s = time.perf_counter() - started
    prediction = detector.predict(rep.eval_images)
    metrics = evaluate(prediction.scores, rep.eval_labels, prediction.anomaly_maps, masks)
    calibration = detector.calibration
    assert calibration is not None
    point = operating_point(prediction.scores, rep.eval_labels, calibration.image_threshold)
    return {"model": model, "image_auroc": metrics["image_auroc"], "image_ap": metrics["image_ap"],
            "pixel_ap": metrics.get("pixel_ap"), "pixel_auroc": metrics.get("pixel_auroc"),
            "aupro": metrics.get("aupro"), "image_fpr": point["fpr"], "image_recall": point["recall"],
            "image_precision": point["precision"], "image_f1": point["f1"],
            "threshold": float(calibration.image_threshold), "target_fpr": cfg.target_fpr,
            "calibration_warning": calibration.warning, "n_real": len(real), "n_anomalies": len(anomalies),
            "n_eval": len(rep.eval_images), "n_eval_anomalous": int(rep.eval_labels.sum()),
            "fit_s": round(fit_s, 3)}


def _realism_cell(cfg: DecisionConfig, synthetic: DefectSet, rep: _Repeat) -> dict[str, Any]:
    from pipelines.realism import realism_metrics

    held = [i for i, c in enumerate(rep.eval_classes) if c != GOOD]
    held = seeded_subset(held, cfg.realism_max_images, rep.seed)
    generated = seeded_subset(synthetic.select(anomalous=True), cfg.realism_max_images, rep.seed + 1)
    if len(generated) < 2 or len(held) < 2:
        return {"skipped": "fewer than 2 images on a side"}
    metrics = realism_metrics([rep.eval_images[i] for i in held], [synthetic.image_path(s) for s in generated],
                              masks_real=[rep.eval_masks[i] for i in held],
                              masks_generated=[synthetic.mask_path(s) for s in generated],
                              image_size=min(cfg.image_size, 224), seed=rep.seed, kid_subsets=50,
                              kid_subset_size=max(2, 3 * min(len(held), len(generated)) // 4), ic_lpips_max_pairs=200)
    return {key: metrics[key] for key in ("kid_mean", "kid_std", "ic_lpips", "lpips_to_nearest_real", "n_real",
                                          "n_generated")}


@dataclass
class _Unit:
    """The cells of one (repeat, k): cached under keys of everything they depend on."""

    cfg: DecisionConfig
    workdir: Path
    rep: _Repeat
    k: int
    known: _Known
    classes: list[str]
    masks: np.ndarray | None

    def _base(self) -> dict[str, Any]:
        cfg, rep = self.cfg, self.rep
        return {"v": CACHE_VERSION, "data": str(cfg.data.resolve()), "normals": [str(p) for p in rep.normals],
                "eval": [str(p) for p in rep.eval_images], "image_size": cfg.image_size,
                "known": [str(p) for p, _m, _c in self.known.items()], "real_share": cfg.real_share}

    def _set_key(self, sets: _Sets, set_name: str | None) -> str | None:
        if set_name is None:
            return None
        return sets.key(self.rep, None if set_name == "generic" else self.k, set_name)

    def cell(self, task: str, arm: str, synthetic: DefectSet | None, sets: _Sets) -> dict[str, Any]:
        cfg = self.cfg
        model = (cfg.classifier if task == "classification" else
                 [cfg.detector, cfg.detector_options, cfg.unsupervised, cfg.unsupervised_options, cfg.target_fpr])
        key = stable_hash({**self._base(), "task": task, "arm": arm, "set": self._set_key(sets, ARM_SET.get(arm)),
                           "model": model})
        path = self.workdir / "cells" / f"{task}__{arm.replace('+', '_')}__k{self.k}__r{self.rep.index}.json"
        cached = read_json_if_exists(path)
        if isinstance(cached, dict) and cached.get("key") == key:
            return cached["result"]
        if task == "classification":
            result = _classification_cell(cfg, arm, self.known, synthetic, self.rep, self.classes)
        else:
            assert self.masks is not None
            result = _detection_cell(cfg, arm, self.known if arm.startswith("real") else None, synthetic, self.rep,
                                     self.masks)
        write_json(path, {"key": key, "result": result})
        return result

    def realism(self, set_name: str | None, synthetic: DefectSet, sets: _Sets) -> dict[str, Any]:
        key = stable_hash({**self._base(), "set": self._set_key(sets, set_name), "max": self.cfg.realism_max_images})
        k = "any" if set_name == "generic" else self.k
        path = self.workdir / "realism" / f"{set_name}__k{k}__r{self.rep.index}.json"
        cached = read_json_if_exists(path)
        if isinstance(cached, dict) and cached.get("key") == key:
            return cached["result"]
        result = _realism_cell(self.cfg, synthetic, self.rep)
        write_json(path, {"key": key, "result": result})
        return result


# --------------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------------

def _stats(values: list[float | None]) -> tuple[float | None, float | None]:
    done = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not done:
        return None, None
    # One repeat has no spread: None, not a misleading 0.
    return float(np.mean(done)), float(np.std(done)) if len(done) > 1 else None


def decision_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, arm, k): mean and std over repeats of every metric of the task."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault((cell["task"], cell["arm"], cell["k"]), []).append(cell)
    rows = []
    for (task, arm, k), members in sorted(groups.items(), key=lambda item: (TASKS.index(item[0][0]),
                                                                            item[0][2], ARMS.index(item[0][1]))):
        metrics = ("mean_accuracy", "overall_accuracy") if task == "classification" else DETECTION_METRICS
        row: dict[str, Any] = {"task": task, "arm": arm, "k": k, "repeats": len(members)}
        for metric in metrics:
            row[metric], row[f"{metric}_std"] = _stats([m["result"].get(metric) for m in members])
        for extra in ("kid_mean", "ic_lpips"):
            values = [m.get("realism", {}).get(extra) for m in members if m.get("realism")]
            if values:
                row[extra], row[f"{extra}_std"] = _stats(values)
        rows.append(row)
    return rows


def _verdicts(rows: list[dict[str, Any]], shots: list[int]) -> list[dict[str, Any]]:
    """Per task metric and k: the best arm, and whether real+synthetic beats real by more than the seed spread."""
    index = {(r["task"], r["arm"], r["k"]): r for r in rows}
    out = []
    for task, metric in (("classification", "mean_accuracy"), ("detection", "image_auroc"),
                         ("detection", "pixel_ap")):
        for k in shots:
            candidates = [r for (t, _a, kk), r in index.items() if t == task and kk == k and r.get(metric) is not None]
            if not candidates:
                continue
            best = max(candidates, key=lambda r: r[metric])
            real, mixed = index.get((task, "real", k)), index.get((task, "real+synthetic", k))
            verdict: dict[str, Any] = {"task": "segmentation" if metric == "pixel_ap" else task, "metric": metric,
                                       "k": k, "best_arm": best["arm"], "best": best[metric]}
            if real and mixed and real.get(metric) is not None and mixed.get(metric) is not None:
                gain = mixed[metric] - real[metric]
                spread = max(real.get(f"{metric}_std") or 0.0, mixed.get(f"{metric}_std") or 0.0)
                verdict.update(real=real[metric], real_plus_synthetic=mixed[metric], gain=gain, spread=spread,
                               synthetic_pays=bool(gain > spread), synthetic_loses=bool(gain < -spread))
            out.append(verdict)
    return out


class DecisionResult(TypedDict):
    """What the decision stage records (``decision.json``, ``results.json["decision"]``)."""

    kind: Literal["decision"]
    data: str
    classes: list[str]
    tasks: list[str]
    shots: list[int]
    arms: list[str]
    repeats: int
    cells: list[dict[str, Any]]  # one per (task, arm, k, repeat): its result, realism and synthetic set
    rows: list[dict[str, Any]]  # the cells aggregated over repeats (decision_rows)
    verdicts: list[dict[str, Any]]  # per task metric and k: the best arm, whether real+synthetic beats real
    leak_check: dict[str, int]  # evaluation images and generation inputs counted; "shared" must stay 0
    exemplars: dict[str, str]
    elapsed_s: float
    config: dict[str, Any]


def run_decision(cfg: DecisionConfig, workdir: Path, *, progress: bool = True) -> DecisionResult:
    """Run (or reuse) every set and cell of the table; returns the JSON-safe summary (also ``decision.json``)."""
    cfg = validate_config(DecisionConfig, cfg.model_dump(), source="decision config")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    dataset = read_defect_set(cfg.data)
    classes = [c for c in dataset.defect_classes if c != GOOD]
    if not classes:
        raise InputError(f"{cfg.data}: no defect classes under test/ (with ground_truth/ masks); the table needs "
                         f"real defects to know and to evaluate on.")
    tasks = [t for t in cfg.tasks if t != "classification" or len(classes) >= 2]
    if "classification" in cfg.tasks and "classification" not in tasks:
        logger.info("%s: one defect class (%s): classification skipped", cfg.data, classes[0])
    sets = _Sets(cfg, dataset, classes, workdir, progress)
    cells: list[dict[str, Any]] = []
    leak = {"evaluation_images": 0, "generation_inputs": 0, "shared": 0}  # shared stays 0, or the run stops
    plan = [(r, k) for r in range(cfg.repeats) for k in cfg.shots]
    loaded: dict[int, tuple[_Repeat, set[str], np.ndarray | None]] = {}
    for step, (repeat, k) in enumerate(plan, start=1):
        if repeat not in loaded:  # split, fingerprints and evaluation masks once per repeat, for all its k
            rep = _load_repeat(cfg, dataset, classes, repeat, workdir)
            loaded = {repeat: (rep, {file_digest(p) for p in rep.eval_images},
                               _eval_masks(rep, cfg.image_size) if "detection" in tasks else None)}
        rep, eval_digests, eval_masks = loaded[repeat]
        leak["evaluation_images"] = max(leak["evaluation_images"], len(eval_digests))
        known = _known_at(dataset, rep, k)
        if progress:
            logger.warning("decision table: repeat %d, k=%d (%d/%d) after %.0f s", repeat, k, step, len(plan),
                           time.perf_counter() - started)
        unit = _Unit(cfg, workdir, rep, k, known, classes, eval_masks)
        for task in tasks:
            for arm in [a for a in cfg.arms if task == "detection" or a in CLASSIFICATION_ARMS]:
                if arm in K_FREE_ARMS and k != cfg.shots[0]:
                    continue  # the same model for every k: fitted once per repeat, shown at every k
                set_name = ARM_SET.get(arm)
                synthetic = None
                if set_name is not None:
                    generic = set_name == "generic"  # made from the normals alone: no k, no known defect
                    synthetic = sets.get(rep, None if generic else k, set_name, None if generic else known)
                    inputs = sets.generation_inputs[str(synthetic.root)]
                    shared = inputs & eval_digests
                    if shared:
                        raise InputError(f"{synthetic.root}: generation read {len(shared)} evaluation image(s); the "
                                         f"held-out set must never reach generation (a bug: please report it).")
                    leak["generation_inputs"] = max(leak["generation_inputs"], len(inputs))
                result = unit.cell(task, arm, synthetic, sets)
                realism = unit.realism(set_name, synthetic, sets) if cfg.realism and synthetic is not None else None
                for shown_k in (cfg.shots if arm in K_FREE_ARMS else [k]):
                    cells.append({"task": task, "arm": arm, "k": shown_k, "repeat": repeat, "seed": rep.seed,
                                  "result": result, "realism": realism,
                                  "set": str(synthetic.root) if synthetic is not None else None})
    rows = decision_rows(cells)
    summary: DecisionResult = {
        "kind": "decision",
        "data": str(cfg.data),
        "classes": classes,
        "tasks": tasks,
        "shots": cfg.shots,
        "arms": cfg.arms,
        "repeats": cfg.repeats,
        "cells": cells,
        "rows": rows,
        "verdicts": _verdicts(rows, cfg.shots),
        "leak_check": leak,
        "exemplars": {f"r{r}/k{k}": str(workdir / f"r{r}" / f"k{k}" / "exemplars") for r in range(cfg.repeats)
                      for k in cfg.shots},
        "elapsed_s": round(time.perf_counter() - started, 1),
        "config": cfg.model_dump(mode="json"),
    }
    write_json(workdir / SUMMARY_FILE, summary)
    return summary


def _fmt(mean: Any, std: Any) -> str:
    if mean is None:
        return "-"
    return f"{mean:.3f} ± {std:.3f}" if std is not None else f"{mean:.3f}"


def decision_table(summary: dict[str, Any], metric: str) -> str:
    """Markdown table of ``metric`` (rows: arms, columns: k) from a summary of :func:`run_decision`."""
    task = "classification" if metric in ("mean_accuracy", "overall_accuracy") else "detection"
    rows = [r for r in summary["rows"] if r["task"] == task and r.get(metric) is not None]
    shots = summary["shots"]
    lines = [f"| arm | {' | '.join(f'k = {k}' for k in shots)} |", "|---|" + "---|" * len(shots)]
    for arm in [a for a in ARMS if any(r["arm"] == a for r in rows)]:
        cells = []
        for k in shots:
            row = next((r for r in rows if r["arm"] == arm and r["k"] == k), None)
            cells.append(_fmt(row.get(metric), row.get(f"{metric}_std")) if row else "-")
        lines.append(f"| {arm} | {' | '.join(cells)} |")
    return "\n".join(lines)


def stage_decision(ctx: StageContext) -> DecisionResult:
    """The ``decision`` stage of ``pipelines run``: :func:`run_decision` in the stage folder."""
    return run_decision(ctx.section, ctx.plan.dir / "work", progress=ctx.progress)


PIPELINE_STAGES = {"decision": Stage(stage_decision, DecisionConfig, ("data",), warm=True)}
