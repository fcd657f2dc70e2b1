"""Defect-class classification pipeline (the AnomalyDiffusion protocol): what is a synthetic set worth?

Protocol (Hu et al. 2024, "AnomalyDiffusion", defect classification experiment):

1. Every real defect class under ``test/<class>`` (``good`` is not a defect class) is split, seeded and per class,
   into a *generation* part (``generation_fraction``, default 1/3) and a *test* part (the rest). Both parts hold
   at least one image; a class with fewer than two images is an error naming it.
2. ``n_per_class`` synthetic defects per class are generated from that class's generation part only, with any
   ``synth generate`` method (``method``; default ``paste``: the generation part's real masks are deformed and
   placed on the normal images of ``train/good``, and the defect's appearance is carried over with blend
   ``poisson`` (default) or ``texture``). Each class is generated separately from a folder that holds only its own
   exemplars, so every generated sample carries its class label by construction.
3. The user-facing classifier (``detect.classify.DefectClassifier``, offline ``tf_efficientnet_lite0`` by default)
   is trained on the synthetic set alone and evaluated on the real test part: per-class accuracy (recall), their
   mean (balanced accuracy), overall accuracy and the confusion matrix.
4. Baselines in the same run, with the same training recipe (augmentation, optimizer, number of steps):
   ``real_only`` trains on the real generation-part images; ``real_plus_synthetic`` (opt-in) on those plus the
   synthetic set; ``crop_paste`` cuts the bounding box of each real
   generation-part defect (from its mask) and pastes it unblended at a random spot of a random normal image,
   ``n_per_class`` times per class.

Every method trains for the same number of optimizer steps (``steps``, or ``epochs`` passes over an
``n_per_class``-per-class set), so a method's number is not an artefact of how many images it happens to have.

Workdir layout (a rerun reuses every finished unit; a changed setting recomputes only what it affects)::

    exemplars/<class>/{masks,images}/<class>/<name>.png   the generation part, as ``synth generate`` reads it
    generated/<method>/classes/<class>/                    ``synth generate`` output per class (resumable)
    generated/<method>/set/                                the merged labeled set the classifier trains on
    generated/crop_paste/set/                              the naive crop & paste baseline set
    results/<method>.json                                  one finished classifier: {"key", "result"}
    classification.json                                    the returned summary
"""

from __future__ import annotations

import logging
import math
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Literal, TypedDict

import cv2
import numpy as np
from pydantic import Field, field_validator
from tqdm import tqdm

from detect.classify import ClassifierConfig, DefectClassifier, LabeledImages
from detect.classify.metrics import classification_metrics
from pipelines.stage import Stage, StageContext
from synth.config import GenerateConfig
from synth.core.config import StrictModel, validate_config
from synth.core.defect_set import GOOD, DefectSample, DefectSet, DefectSetWriter, read_defect_set
from synth.core.errors import InputError
from synth.core.io import copy_file, list_images, read_image, read_json_if_exists, write_image, write_json
from synth.core.io import stable_hash as io_stable_hash
from synth.generate import generate, make_preview, sample_seed
from synth.generators import check_generator_name

logger = logging.getLogger(__name__)

__all__ = ["BASELINES", "PIPELINE_STAGES", "ClassificationConfig", "class_seed", "crop_paste_one", "merge_class_sets",
           "prepare_dir", "run_classification", "split_classes", "stable_hash", "write_exemplars"]

BASELINES = ("real_only", "crop_paste")
# Also accepted in ``baselines``: the real generation-part images together with the synthetic set (how a user
# would use the generator), trained with the same recipe and steps.
EXTRA_BASELINES = ("real_plus_synthetic",)
KEY_FILE = "pipeline_key.json"
SUMMARY_FILE = "classification.json"


class ClassificationConfig(StrictModel):
    """Settings of the defect-class classification pipeline (see the module docstring)."""

    data: Path = Field(description="MVTec-layout folder: train/good, test/<class>, ground_truth/<class> masks")
    generation_fraction: float = Field(1 / 3, gt=0, lt=1,
                                       description="share of each class's real images used for generation")
    method: str = Field("paste", description="synth generate method for the synthetic set")
    method_params: dict[str, Any] = Field(default_factory=dict, description="extra generator arguments")
    blend: Literal["alpha", "poisson", "texture"] = Field(
        "poisson", description="blend of method 'paste'; poisson/texture carry the real defect's appearance")
    n_per_class: int = Field(100, gt=0, description="synthetic (and crop & paste) images per class")
    baselines: list[Literal["real_only", "crop_paste", "real_plus_synthetic"]] = Field(
        default_factory=lambda: list(BASELINES))
    backbone: str = Field("tf_efficientnet_lite0", description="timm classifier")
    pretrained: bool = True
    image_size: int = Field(224, ge=32, le=1024)
    epochs: int = Field(10, gt=0, description="passes over an n_per_class-per-class set; sets the step count")
    steps: int | None = Field(None, gt=0, description="optimizer steps per method; overrides epochs")
    batch_size: int = Field(16, gt=0)
    lr: float = Field(1e-3, gt=0)
    seed: int = Field(0, ge=0)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        return check_generator_name(value)

    @field_validator("baselines")
    @classmethod
    def _unique_baselines(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


# --------------------------------------------------------------------------------------------------
# split and seeds
# --------------------------------------------------------------------------------------------------

def class_seed(seed: int, salt: str, defect_class: str) -> int:
    """A seed per (purpose, class) that does not move when other classes are added or removed."""
    words = [seed, zlib.crc32(f"{salt}:{defect_class}".encode())]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint32)[0])


def seeded_subset(items: list, limit: int | None, seed: int) -> list:
    """At most ``limit`` of ``items`` (all when ``limit`` is None), drawn with ``seed``, in their original order."""
    if limit is None or len(items) <= limit:
        return list(items)
    keep = np.sort(np.random.default_rng(seed).choice(len(items), size=limit, replace=False))
    return [items[i] for i in keep]


def split_classes(dataset: DefectSet, classes: list[str], fraction: float,
                  seed: int) -> dict[str, dict[str, list[DefectSample]]]:
    """Seeded per-class split of the real defect images into ``generation`` and ``test`` parts (disjoint)."""
    out = {}
    for defect_class in classes:
        samples = sorted(dataset.select(split="test", defect_class=defect_class), key=lambda s: s.image)
        n = len(samples)
        if n < 2:
            raise InputError(f"{dataset.root}: defect class {defect_class!r} has {n} image(s); the split needs at "
                             f"least 2 (1 to generate from, 1 to test on). Add images to test/{defect_class} "
                             f"or remove that class folder.")
        n_gen = min(max(round(n * fraction), 1), n - 1)
        order = np.random.default_rng(class_seed(seed, "split", defect_class)).permutation(n)
        chosen = set(order[:n_gen].tolist())
        out[defect_class] = {"generation": [s for i, s in enumerate(samples) if i in chosen],
                             "test": [s for i, s in enumerate(samples) if i not in chosen]}
    return out


def stable_hash(obj: Any) -> str:
    """16 hex digits of :func:`synth.core.io.stable_hash`: this pipeline's cache keys (unchanged across versions)."""
    return io_stable_hash(obj, digits=16)


def prepare_dir(folder: Path, key: str) -> None:
    """Make ``folder`` belong to ``key``: a folder left by other settings is removed (it is pipeline output)."""
    record = read_json_if_exists(folder / KEY_FILE)
    if record is not None and record != {"key": key}:
        logger.warning("%s: made with other settings; regenerating", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / KEY_FILE, {"key": key})


# --------------------------------------------------------------------------------------------------
# training sets
# --------------------------------------------------------------------------------------------------

def write_exemplars(dataset: DefectSet, samples: list[DefectSample], folder: Path, defect_class: str) -> None:
    """Lay out one class's generation part as ``synth generate`` reads it: masks/<class>/<name>.png + images."""
    if folder.exists():
        shutil.rmtree(folder)  # rebuilt every time so files of an older split never linger
    for sample in samples:
        image_path = dataset.image_path(sample)
        shape = read_image(image_path).shape[:2]
        write_image(folder / "masks" / defect_class / f"{sample.name}.png", dataset.load_mask(sample, shape))
        copy_file(image_path, folder / "images" / defect_class / f"{sample.name}{image_path.suffix.lower()}")


def merge_class_sets(parts: dict[str, DefectSet], out: Path, extra: dict[str, Any]) -> DefectSet:
    """One labeled set from per-class generated sets; labels are the class each part was generated for."""
    writer = DefectSetWriter(out)
    dropped = 0
    for defect_class, part in parts.items():
        for sample in part.select(split="test"):
            if not sample.is_anomalous:
                dropped += 1  # a generator may leave an image without defect pixels: no class to learn
                continue
            if writer.has(sample.name, split="test", defect_class=defect_class):
                continue
            image = part.load_image(sample)
            writer.add(image, name=sample.name, split="test", defect_class=defect_class,
                       mask=part.load_mask(sample, image.shape[:2]), generator=sample.generator,
                       params=sample.params, seed=sample.seed, source_image=sample.source_image)
    if dropped:
        logger.warning("%s: %d generated image(s) without defect pixels left out", out, dropped)
    merged = writer.finalize(extra)
    preview = make_preview(merged, 16)
    if preview is not None:
        write_image(out / "preview.png", preview)
    return merged


def _generate_synthetic(cfg: ClassificationConfig, dataset: DefectSet, split: dict, seeds: dict, normal: Path,
                        folder: Path, exemplars: Path, progress: bool) -> DefectSet:
    parts = {}
    for defect_class, part in split.items():
        write_exemplars(dataset, part["generation"], exemplars / defect_class, defect_class)
        gen_cfg = validate_config(GenerateConfig, {
            "normal": normal, "out": folder / "classes" / defect_class, "method": cfg.method,
            "n": cfg.n_per_class, "seed": seeds["generation"][defect_class],
            "masks": exemplars / defect_class / "masks", "defects": exemplars / defect_class / "images",
            "blend": cfg.blend, "defect_class": defect_class, "copy_normals": False, "preview": 0,
            "method_params": cfg.method_params,
        }, source="classification config (method, method_params, blend)")
        logger.info("generating %d %r images with %s", cfg.n_per_class, defect_class, cfg.method)
        parts[defect_class] = generate(gen_cfg, progress=progress).dataset
    return merge_class_sets(parts, folder / "set", {"generator": cfg.method, "pipeline": "classification",
                                          "classes": sorted(parts)})


def crop_paste_one(normal: np.ndarray, image: np.ndarray, mask: np.ndarray,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paste the defect's bounding box (no blending) at a uniformly random spot of ``normal``."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    patch, patch_mask = image[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    height, width = normal.shape[:2]
    factor = min(1.0, height / patch.shape[0], width / patch.shape[1])
    if factor < 1.0:  # a defect larger than the normal image (other resolution): shrink it to fit
        size = (max(1, int(patch.shape[1] * factor)), max(1, int(patch.shape[0] * factor)))
        patch = cv2.resize(patch, size, interpolation=cv2.INTER_AREA)
        patch_mask = cv2.resize(patch_mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    top = int(rng.integers(0, height - patch.shape[0] + 1))
    left = int(rng.integers(0, width - patch.shape[1] + 1))
    out, out_mask = normal.copy(), np.zeros((height, width), dtype=bool)
    out[top:top + patch.shape[0], left:left + patch.shape[1]] = patch
    out_mask[top:top + patch.shape[0], left:left + patch.shape[1]] = patch_mask
    return out, out_mask


def _generate_crop_paste(cfg: ClassificationConfig, dataset: DefectSet, split: dict, seeds: dict, normal: Path,
                         out: Path, progress: bool) -> DefectSet:
    normals = list_images(normal)
    writer = DefectSetWriter(out)
    total = cfg.n_per_class * len(split)
    with tqdm(total=total, desc="crop & paste", unit="img", disable=not progress) as bar:
        for defect_class, part in split.items():
            sources = []
            for sample in part["generation"]:
                image = dataset.load_image(sample)
                mask = dataset.load_mask(sample, image.shape[:2])
                if mask.any():
                    sources.append((sample, image, mask))
            if not sources:
                raise InputError(f"{dataset.root}: every generation-part mask of class {defect_class!r} is empty; "
                                 f"crop & paste needs defect pixels in ground_truth/{defect_class}.")
            for index in range(cfg.n_per_class):
                name = f"crop_paste_{index:05d}"
                bar.update(1)
                if writer.has(name, split="test", defect_class=defect_class):
                    continue
                seed = sample_seed(seeds["crop_paste"][defect_class], index)
                rng = np.random.default_rng(seed)
                sample, image, mask = sources[int(rng.integers(len(sources)))]
                target = normals[int(rng.integers(len(normals)))]
                result, result_mask = crop_paste_one(read_image(target), image, mask, rng)
                writer.add(result, name=name, split="test", defect_class=defect_class, mask=result_mask,
                           generator="crop_paste", params={"source": sample.image}, seed=seed,
                           source_image=str(target))
    merged = writer.finalize({"generator": "crop_paste", "pipeline": "classification", "classes": sorted(split)})
    preview = make_preview(merged, 16)
    if preview is not None:
        write_image(out / "preview.png", preview)
    return merged


def _labeled(dataset: DefectSet, samples: list[DefectSample], classes: list[str]) -> tuple[list, list[int]]:
    images = [dataset.load_image(s) for s in samples]
    return images, [classes.index(s.defect_class) for s in samples]


# --------------------------------------------------------------------------------------------------
# pipeline
# --------------------------------------------------------------------------------------------------

def _result_file(workdir: Path, method: str) -> Path:
    # ':' is not allowed in Windows file names.
    return workdir / "results" / f"{method.replace(':', '_')}.json"


class ClassificationResult(TypedDict):
    """What the classification stage records (``classification.json``, ``results.json["classification"]``)."""

    kind: Literal["classification"]
    classes: list[str]
    split: dict[str, dict[str, list[str]]]  # class -> train / test -> the real images of that part
    methods: dict[str, dict[str, Any]]  # "synthetic:<method>" or a baseline -> accuracy over seeds, per-class F1
    generated_sets: dict[str, str]  # method -> its generated defect set's folder
    seeds: dict[str, Any]
    steps: int
    config: dict[str, Any]


def run_classification(cfg: ClassificationConfig, workdir: Path, *, progress: bool = True) -> ClassificationResult:
    """Run the protocol for ``synthetic:<cfg.method>`` and ``cfg.baselines``; returns a JSON-safe summary.

    Finished classifiers are cached in ``workdir/results/<method>.json`` under a hash of everything they depend
    on (data, split, generation and training settings); a rerun with the same settings reuses them.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    dataset = read_defect_set(cfg.data)
    classes = [c for c in dataset.defect_classes if c != GOOD]
    if len(classes) < 2:
        raise InputError(f"{cfg.data}: classification needs at least 2 defect classes under test/ "
                         f"(found {classes}); 'good' is not a defect class.")
    normal = (cfg.data / "train" / GOOD).resolve()
    if not normal.is_dir():
        raise InputError(f"{normal}: folder of normal images not found; the synthetic sets are generated on "
                         f"train/good.")
    split = split_classes(dataset, classes, cfg.generation_fraction, cfg.seed)
    seeds = {
        "seed": cfg.seed,
        "split": {c: class_seed(cfg.seed, "split", c) for c in classes},
        "generation": {c: class_seed(cfg.seed, "generate", c) for c in classes},
        "crop_paste": {c: class_seed(cfg.seed, "crop_paste", c) for c in classes},
        "train": cfg.seed,
    }
    split_paths = {c: {k: [s.image for s in v] for k, v in part.items()} for c, part in split.items()}
    steps = cfg.steps or cfg.epochs * math.ceil(cfg.n_per_class * len(classes) / cfg.batch_size)
    train_key = {"backbone": cfg.backbone, "pretrained": cfg.pretrained, "image_size": cfg.image_size,
                 "steps": steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed}
    base_key = {"data": str(cfg.data.resolve()), "classes": classes, "split": split_paths, "train": train_key}
    gen_key = {"data": base_key["data"], "split": split_paths, "seeds": seeds, "n_per_class": cfg.n_per_class,
               "method": cfg.method, "method_params": cfg.method_params, "blend": cfg.blend}
    crop_key = {"data": base_key["data"], "split": split_paths, "seeds": seeds["crop_paste"],
                "n_per_class": cfg.n_per_class}

    synthetic_name = f"synthetic:{cfg.method}"
    folders = {synthetic_name: workdir / "generated" / cfg.method, "crop_paste": workdir / "generated" / "crop_paste"}
    unit_keys = {synthetic_name: stable_hash({**base_key, "generation": gen_key}),
                 "real_only": stable_hash({**base_key, "real_only": True}),
                 "real_plus_synthetic": stable_hash({**base_key, "real_plus_synthetic": gen_key}),
                 "crop_paste": stable_hash({**base_key, "crop_paste": crop_key})}
    test_data: tuple[list, list[int]] | None = None
    methods: dict[str, dict] = {}
    for name in [synthetic_name, *cfg.baselines]:
        cache = _result_file(workdir, name)
        cached = read_json_if_exists(cache)
        if isinstance(cached, dict) and cached.get("key") == unit_keys[name]:
            logger.info("%s: reusing %s", name, cache)
            methods[name] = cached["result"]
            continue
        if name in ("real_only", "real_plus_synthetic"):
            samples = [s for part in split.values() for s in part["generation"]]
            train_set: DefectSet = dataset
        else:
            folder = folders[name]
            # The folder key adds the workdir: ``synth generate`` records absolute exemplar paths, so a moved
            # workdir regenerates instead of failing on a config mismatch.
            folder_key = {"workdir": str(workdir), **(gen_key if name == synthetic_name else crop_key)}
            prepare_dir(folder, stable_hash(folder_key))
            if name == synthetic_name:
                train_set = _generate_synthetic(cfg, dataset, split, seeds, normal, folder,
                                                workdir / "exemplars", progress)
            else:
                train_set = _generate_crop_paste(cfg, dataset, split, seeds, normal, folder / "set", progress)
            samples = [s for s in train_set.select(split="test", anomalous=True) if s.defect_class in classes]
        images, labels = _labeled(train_set, samples, classes)
        sources = ["real"] * len(images)
        if name == "real_plus_synthetic":
            generated = read_defect_set(folders[synthetic_name] / "set")
            extra = [s for s in generated.select(split="test", anomalous=True) if s.defect_class in classes]
            more_images, more_labels = _labeled(generated, extra, classes)
            images, labels = images + more_images, labels + more_labels
            sources += ["synthetic"] * len(more_images)
        if test_data is None:
            test_data = _labeled(dataset, [s for part in split.values() for s in part["test"]], classes)
        started = time.perf_counter()
        classifier = DefectClassifier(ClassifierConfig(backbone=cfg.backbone, pretrained=cfg.pretrained,
                                                       image_size=cfg.image_size, steps=steps,
                                                       batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed))
        classifier.fit_labeled(LabeledImages(images, labels, classes, sources), progress=progress,
                               desc=f"train {name}")
        fit_s = time.perf_counter() - started
        predicted = classifier.predict(test_data[0], batch_size=max(cfg.batch_size, 32)).indices
        result = {**classification_metrics(test_data[1], predicted.tolist(), classes), "n_train": len(images),
                  "n_test": len(test_data[1]), "steps": steps, "final_loss": classifier.history["final_loss"],
                  "fit_s": round(fit_s, 3), "weights_source": classifier.history["weights_source"]}
        write_json(cache, {"key": unit_keys[name], "method": name, "result": result})
        logger.info("%s: mean accuracy %.3f", name, result["mean_accuracy"])
        methods[name] = result

    summary: ClassificationResult = {
        "kind": "classification",
        "classes": classes,
        "split": split_paths,
        "methods": methods,
        "generated_sets": {name: str(folders[name] / "set") for name in methods
                           if name in folders and (folders[name] / "set").is_dir()},
        "seeds": seeds,
        "steps": steps,
        "config": cfg.model_dump(mode="json"),
    }
    write_json(workdir / SUMMARY_FILE, summary)
    return summary


def stage_classification(ctx: StageContext) -> ClassificationResult:
    """The ``classification`` stage of ``pipelines run``: :func:`run_classification` in the stage folder."""
    return run_classification(ctx.section, ctx.plan.dir / "work", progress=ctx.progress)


PIPELINE_STAGES = {"classification": Stage(stage_classification, ClassificationConfig, ("data",), warm=True)}
