"""The one Detector API every model shares: ``fit``, ``predict``, ``save``/``load``.

A detector is two parts, as in Anomalib: a plain ``torch.nn.Module`` (``self.model``, built by
``build_model``) whose ``forward(batch)`` maps images in [0, 1], shape (N, 3, S, S), to
``(scores (N,), anomaly_maps (N, S, S))`` — the whole inference, so an exported model is the in-framework
model — and the training logic in the Detector subclass (``_fit``). No Lightning.

Saved models are a folder: ``config.json`` (model name, config, calibration) and ``model.safetensors``
(every tensor of the module, memory banks and statistics included), written and read by :mod:`detect.persistence`.
Loading never unpickles anything.
"""

from __future__ import annotations

import functools
import logging
import operator
import os
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Annotated, Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Strict, ValidationError, create_model
from torch import nn
from tqdm import tqdm

from detect.calibration import (
    CROSSFIT_MAX_NORMALS,
    CalibrationScores,
    atypical_normals,
    augmented_views,
    fold_indices,
)
from detect.data import ImageInput, iter_batches, load_rgb, load_tensor, resize_mask, resolve_images
from detect.persistence import FORMAT_VERSION, load_state_with_buffers, write_model_folder
from detect.threshold import Calibration, calibrate
from synth.core.defect_set import DefectSet, read_defect_set
from synth.core.errors import ConfigError, InputError

logger = logging.getLogger(__name__)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a config dataclass's fields (cached; empty when they cannot be resolved)."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation only importable for type checkers: skip type checks
        return {}
    return {f.name: hints[f.name] for f in fields(cls) if f.name in hints}


def _strict_scalars(hint: Any) -> Any:
    """``hint`` with its scalar types made strict (no "3" for 3, no 1.5 or true for an integer); containers
    stay lax, so the lists that a JSON/YAML round trip makes of tuples (and tuples of lists) still pass."""
    if hint in (bool, int, float, str):
        return Annotated[hint, Strict()]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return functools.reduce(operator.or_, (_strict_scalars(a) for a in args))
    if origin in (list, tuple, Sequence) and args:
        return list[_strict_scalars(args[0])] if origin is not tuple or args[-1] is Ellipsis else hint
    return hint


@functools.cache
def _type_checker(cls: type) -> type[BaseModel]:
    """A pydantic model with one field per annotated config field: the type check of every DetectorConfig."""
    return create_model(f"{cls.__name__}Types", __config__=ConfigDict(arbitrary_types_allowed=True),
                        **{name: (_strict_scalars(hint), ...) for name, hint in _field_types(cls).items()})


def _plain(value: Any) -> Any:
    """What the type check sees: numpy scalars as Python numbers and paths as strings (both are accepted)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _describe(hint: Any) -> str:
    """A config field's annotation in the words of the error message (``an integer``, ``a number or null``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        words = " or ".join(_describe(a) for a in args if a is not type(None))
        return f"{words} or null" if type(None) in args else words
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if hint in (list, tuple) or origin in (list, tuple, Sequence):
        return f"a list ({_describe(args[0])} each)" if args and args[0] is not Any else "a list"
    if hint is dict or origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, "any value")


@dataclass
class DetectorConfig:
    """Settings every detector has; each model extends this dataclass with its own fields.

    image_size: square input size; every image is resized to it (see detect.data).
    threshold_method: "fpr" (default: the threshold for ``target_fpr`` on held-out normals), "auto", "f1" or
        "percentile" (see detect.threshold and detect.calibration).
    target_fpr: the false-positive rate on normal parts the "fpr" threshold aims at (default 5 %).
    calibration: how normals are held out for the threshold when ``fit`` gets no validation data: "crossfit"
        (fold models score the normals they did not see; the deployed model trains on all of them), "holdout"
        (``val_fraction`` is held out of training) or "auto" (crossfit for models with ``cheap_refit`` and at most
        ``detect.calibration.CROSSFIT_MAX_NORMALS`` normals, else holdout).
    calibration_folds: folds of "crossfit" (leave-one-out when there are fewer normals).
    calibration_views: augmented views scored per held-out normal (method "fpr").
    val_fraction: share of the training normals held out by "holdout" (only when there are at least 5).
    synthetic_val: add synthetic anomalies (synth CutPaste + DRAEM) made from the held-out normals to validation
        data that has none: the F1 threshold's anomalous class, and the recall estimate of "fpr".
    """

    image_size: int = 256
    seed: int = 0
    batch_size: int = 16
    threshold_method: str = "fpr"
    threshold_percentile: float = 99.0
    target_fpr: float = 0.05
    calibration: str = "auto"
    calibration_folds: int = 8
    calibration_views: int = 2
    val_fraction: float = 0.2
    synthetic_val: bool = True

    def __post_init__(self) -> None:
        # Types first: a YAML/--set value such as image_size=abc must name its key, not fail in a comparison below.
        hints = _field_types(type(self))
        try:
            _type_checker(type(self)).model_validate({name: _plain(getattr(self, name)) for name in hints})
        except ValidationError as exc:  # the first bad field, in declaration order, as before
            key = str(exc.errors()[0]["loc"][0])
            self.check(False, key, _describe(hints[key]))
        self.check(self.seed >= 0, "seed", "an integer >= 0")
        self.check(self.image_size >= 32 and self.image_size % 8 == 0, "image_size", "a multiple of 8, >= 32")
        self.check(self.batch_size >= 1, "batch_size", ">= 1")
        self.check(self.threshold_method in ("fpr", "auto", "f1", "percentile"), "threshold_method",
                   "'fpr', 'auto', 'f1' or 'percentile'")
        self.check(0 < self.threshold_percentile <= 100, "threshold_percentile", "in (0, 100]")
        self.check(0 < self.target_fpr < 1, "target_fpr", "in (0, 1), e.g. 0.05")
        self.check(self.calibration in ("auto", "crossfit", "holdout"), "calibration",
                   "'auto', 'crossfit' or 'holdout'")
        self.check(self.calibration_folds >= 2, "calibration_folds", "an integer >= 2")
        self.check(self.calibration_views >= 0, "calibration_views", "an integer >= 0")
        self.check(0 <= self.val_fraction < 1, "val_fraction", "in [0, 1)")
        if hasattr(self, "layers"):  # BackboneConfig fields, checked once here for every CNN-feature model
            layers = self.layers
            self.check(isinstance(layers, (list, tuple)) and len(layers) >= 1
                       and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
                       and list(layers) == sorted(set(layers)), "layers",
                       "a non-empty ascending list of distinct feature indices >= 0")
            self.check(isinstance(self.backbone, str) and bool(self.backbone), "backbone", "a timm model name")

    def check(self, ok: bool, key: str, allowed: str) -> None:
        """Raise a ConfigError naming ``key`` when ``ok`` is false."""
        if not ok:
            raise ConfigError(f"{type(self).__qualname__}: key '{key}' must be {allowed} (got {getattr(self, key)!r})")


@dataclass
class Prediction:
    """Output of ``Detector.predict`` for N images.

    scores: raw image anomaly scores (higher = more anomalous), (N,).
    anomaly_maps: raw pixel scores at the model input size, (N, S, S).
    image_shapes: original (H, W) of each image, for resizing maps back (detect.data.resize_map).
    normalized_scores / labels / masks: present once the detector is calibrated (threshold -> 0.5).
    """

    scores: np.ndarray
    anomaly_maps: np.ndarray
    image_shapes: list[tuple[int, int]]
    normalized_scores: np.ndarray | None = None
    labels: np.ndarray | None = None
    masks: np.ndarray | None = None


@dataclass
class AnomalySamples:
    """Labeled anomalous images (real or synthetic) that supervised detectors train on.

    images: paths or uint8 HxWx3 arrays; masks: bool (H, W) per image at that image's own size (None when
    only the image label is known); source: "real" or "synthetic" (recorded, not used for training).
    """

    images: list[ImageInput]
    masks: list[np.ndarray | None]
    source: str = "real"

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Image ``index`` as uint8 HxWx3 and its bool mask (same size, or None)."""
        image = load_rgb(self.images[index])
        mask = self.masks[index]
        if mask is not None and mask.shape != image.shape[:2]:
            raise InputError(f"anomaly sample {index} ({self.images[index]!r}): mask {mask.shape} differs from "
                             f"the image {image.shape[:2]}; give masks of the image's size.")
        return image, mask


def resolve_anomalies(data: DefectSet | str | Path | AnomalySamples | Sequence[tuple[ImageInput, Any]]
                      ) -> AnomalySamples:
    """Anomalous training samples from a defect set / MVTec folder (every anomalous sample of any split, with
    its mask), an ``AnomalySamples``, or a list of ``(image, mask_or_None)`` pairs."""
    if isinstance(data, AnomalySamples):
        samples = data
    elif isinstance(data, (str, Path, DefectSet)):
        dataset = data if isinstance(data, DefectSet) else read_defect_set(data)
        chosen = dataset.select(anomalous=True)
        if not chosen:
            raise InputError(f"{dataset.root}: no anomalous samples (test/<class>/ with ground_truth/ masks) to "
                             f"train on; generate some with `synth generate` or drop anomalies=.")
        source = "synthetic" if any(s.generator for s in chosen) else "real"
        samples = AnomalySamples([dataset.image_path(s) for s in chosen],
                                 [dataset.load_mask(s) if s.mask is not None else None for s in chosen], source)
    else:
        pairs = list(data)
        samples = AnomalySamples([p[0] for p in pairs],
                                 [None if p[1] is None else np.asarray(p[1]) > 0 for p in pairs])
    if len(samples) == 0:
        raise InputError("anomalies: no anomalous samples given.")
    return samples


@dataclass
class ValidationData:
    """Calibration images: held-out normals, their augmented views (``views`` True) and anomalies (``labels``)."""

    images: list[ImageInput]
    labels: np.ndarray
    masks: list[np.ndarray | None]
    anomalies_are: str = "real"
    views: np.ndarray | None = None
    scheme: str = "holdout"

    def __post_init__(self) -> None:
        if self.views is None:
            self.views = np.zeros(len(self.images), bool)

    @staticmethod
    def concatenate(parts: list[ValidationData]) -> ValidationData:
        return ValidationData([i for p in parts for i in p.images], np.concatenate([p.labels for p in parts]),
                              [m for p in parts for m in p.masks], parts[0].anomalies_are,
                              np.concatenate([p.views for p in parts]), parts[0].scheme)


def _no_registry() -> list[str]:
    return []


# Names of the registered models that train on labeled anomalies (fit's error message lists them). The registry
# installs its lister when it is imported (``set_model_lister``): it imports this module, so this one must not
# import it back.
_models_with_anomalies: Callable[[], list[str]] = _no_registry


def set_model_lister(lister: Callable[[], list[str]]) -> None:
    """Install the function that lists the registered models able to train on labeled anomalies."""
    global _models_with_anomalies
    _models_with_anomalies = lister


class Detector:
    """Base class; subclasses set ``name``, ``paradigm``, ``Config`` and implement ``build_model``/``_fit``."""

    name: ClassVar[str] = ""
    paradigm: ClassVar[str] = ""
    Config: ClassVar[type[DetectorConfig]] = DetectorConfig
    # True for models that can also train on labeled anomalies (fit(..., anomalies=...)).
    supports_anomalies: ClassVar[bool] = False
    # True where a refit costs about one pass over the images (memory banks, statistics): calibration="auto"
    # then cross-fits the threshold instead of holding normals out of training (see detect.calibration).
    cheap_refit: ClassVar[bool] = False

    def __init__(self, _loading: bool = False, **config: Any):
        # _loading: built by detect.load(), whose weights file replaces every tensor, so pretrained
        # backbone weights need not (and, on another machine, might not) be found again.
        self.loading = _loading
        known = {f.name for f in fields(self.Config)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"{self.name}: unknown option(s) {unknown}; valid options: {sorted(known)}")
        try:
            self.config = self.Config(**config)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:  # a model's own check that compares a value of the wrong type
            raise ConfigError(f"{self.name}: invalid option value ({exc}); check the values given with --set / "
                              f"--config against the option types in {type(self).__module__}.") from None
        self.calibration: Calibration | None = None
        self.calibration_scores: CalibrationScores | None = None  # what the last fit's threshold came from
        self.fitted = False
        # Labeled anomalies for this fit (None: normal images only); read by supervised models' _fit.
        self.train_anomalies: AnomalySamples | None = None
        self.model = self.build_model()

    # ----- to implement -------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def _fit(self, images: list[ImageInput], progress: bool) -> None:
        raise NotImplementedError

    # ----- shared logic ---------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return f"{type(self).__name__}({asdict(self.config)})"

    def load_tensor(self, images: list[ImageInput]) -> torch.Tensor:
        """Training images as one (N, 3, S, S) tensor in [0, 1]."""
        return load_tensor(images, self.config.image_size)

    def fit(self, train: DefectSet | str | Path | list[ImageInput], val: DefectSet | str | Path | list | None = None,
            *, anomalies: DefectSet | str | Path | AnomalySamples | Sequence[tuple[ImageInput, Any]] | None = None,
            progress: bool = True, calibrate: bool = True) -> Detector:
        """Train on normal images, then calibrate the threshold (see :mod:`detect.calibration`).

        ``train``: a defect set / MVTec folder (its ``train/good``), an image folder or a list of images.
        ``val``: a defect set / MVTec folder (its ``test`` split, labels and masks used), or normal images;
        when omitted, the training normals are cross-fitted or ``val_fraction`` of them is held out
        (``calibration``).
        ``anomalies``: labeled anomalous images (real, or synthetic from ``synth generate``) for models with
        ``supports_anomalies`` (supervised training); see :func:`resolve_anomalies` for the accepted forms.
        ``calibrate=False``: train on every image and set no threshold (``calibration`` stays None; ``val`` is
        ignored), for callers that choose thresholds themselves.
        """
        if anomalies is not None and not self.supports_anomalies:
            able = _models_with_anomalies()
            raise InputError(f"{self.name} trains on normal images only and cannot use anomalies=; models that "
                             f"train on labeled anomalies: {', '.join(able) or 'none registered'}.")
        resolved = resolve_anomalies(anomalies) if anomalies is not None else None
        images = resolve_images(train)
        scheme = self.calibration_scheme(len(images), val) if calibrate else None
        held_out: list[ImageInput] = []
        if scheme == "holdout":
            order = np.random.default_rng(self.config.seed).permutation(len(images))
            n_val = max(1, int(round(self.config.val_fraction * len(images))))
            held_out = [images[i] for i in sorted(order[:n_val])]
            images = [images[i] for i in sorted(order[n_val:])]
        self._train(images, resolved, progress)
        self.calibration = self.calibration_scores = None
        if scheme == "crossfit":
            data, scores, maps = self._crossfit(images, resolved, progress)
            self.calibration = self._calibration_from(data, scores, maps)
        elif scheme is not None:
            self._calibrate_on(val if scheme == "val" else held_out or images, scheme)
        return self

    def calibrate(self, val: DefectSet | str | Path | list[ImageInput] | None = None, *,
                  anomalies: DefectSet | str | Path | AnomalySamples | Sequence[tuple[ImageInput, Any]] | None = None,
                  target_fpr: float | None = None, threshold_method: str | None = None) -> Detector:
        """Set the decision threshold of a fitted detector from validation data; the weights do not change.

        The step ``fit`` ends with, on its own: after ``fit(calibrate=False)``, or to re-set a saved model's
        threshold on good parts of a changed line (``detect calibrate``). ``val``: normal images the model did not
        train on (a folder or a list), or a defect set / MVTec folder whose ``test`` split (labels and masks) is
        used. ``anomalies``: labeled anomalous images the model did not train on (real, or synthetic such as a
        generated set's calibration share; the forms of :func:`resolve_anomalies`): with ``val`` they join its
        images; without ``val`` the normals are the ones the last ``fit`` held out, with the scores they had
        there (a cross-fitted normal is not scored again by the deployed model, which trained on it), and the
        pixel threshold is kept. ``target_fpr`` / ``threshold_method`` replace the config's values (validated,
        kept when saved).
        """
        if not self.fitted:
            raise InputError(f"{self.name}: the model is not fitted; call fit() or load a saved model before "
                             f"calibrating its threshold.")
        if val is None and anomalies is None:
            raise InputError(f"{self.name}: calibrate() needs val= (normal images the model did not train on, or a "
                             f"labeled defect set) or anomalies= (scored against the normals fit held out).")
        if val is None and self.calibration_scores is None:
            raise InputError(f"{self.name}: no held-out normal scores to add the anomalies to (they are kept only "
                             f"by the detector that ran fit(), not by a loaded one); give val= normal images too.")
        extra = resolve_anomalies(anomalies) if anomalies is not None else None
        changes = {k: v for k, v in (("target_fpr", target_fpr), ("threshold_method", threshold_method))
                   if v is not None}
        if changes:
            self.config = replace(self.config, **changes)  # __post_init__ checks the new values
        if val is None:
            assert extra is not None
            self.calibration = self._calibration_with(extra)
        else:
            self._calibrate_on(val, "val", extra)
        return self

    def _calibrate_on(self, images: Any, scheme: str, anomalies: AnomalySamples | None = None) -> None:
        self.calibration = self._calibrate(self._validation_data(images, [], scheme=scheme, anomalies=anomalies))

    def _calibration_with(self, anomalies: AnomalySamples) -> Calibration:
        """The last fit's held-out normal scores (and views) against newly scored anomalies; pixel threshold kept."""
        held = self.calibration_scores
        assert held is not None
        scores = self._predict_raw(anomalies.images).scores
        calibration = calibrate(held.normal, scores, method=self.config.threshold_method,
                                q=self.config.threshold_percentile, anomalies_are=anomalies.source,
                                target_fpr=self.config.target_fpr, view_scores=held.views, scheme=held.scheme)
        previous = self.calibration
        if previous is not None:
            calibration.pixel_threshold = previous.pixel_threshold
            calibration.pixel_min, calibration.pixel_max = previous.pixel_min, previous.pixel_max
            if calibration.target_fpr is not None and previous.atypical_normals:
                _note_atypical_normals(calibration, previous.atypical_normals)
        self.calibration_scores = replace(held, anomalous=scores, anomalies_are=anomalies.source)
        return calibration

    def calibration_scheme(self, n_images: int, val: Any = None) -> str:
        """How ``fit`` holds normals out for the threshold: "val", "crossfit", "holdout" or "in-sample"."""
        if val is not None:
            return "val"
        wanted = self.config.calibration
        if wanted == "auto":
            wanted = "crossfit" if self.cheap_refit and n_images <= CROSSFIT_MAX_NORMALS else "holdout"
        if wanted == "crossfit" and n_images >= 2:
            return "crossfit"
        if n_images >= 5 and self.config.val_fraction > 0:
            return "holdout"
        return "in-sample"  # too few images to hold any out; the threshold's warning says so

    def _train(self, images: list[ImageInput], anomalies: AnomalySamples | None, progress: bool) -> None:
        torch.manual_seed(self.config.seed)
        self.train_anomalies = anomalies
        try:
            self._fit(images, progress)
        finally:
            self.train_anomalies = None  # paths/arrays of one fit are not kept on the detector
        self.model.eval()
        self.fitted = True

    def _crossfit(self, images: list[ImageInput], anomalies: AnomalySamples | None, progress: bool
                  ) -> tuple[ValidationData, np.ndarray, np.ndarray]:
        """Score every normal with a copy of this detector fitted on the other folds (not on that normal)."""
        folds = fold_indices(len(images), self.config.calibration_folds, self.config.seed)
        parts, scores, maps = [], [], []
        for fold in tqdm(folds, desc=f"{self.name} calibration folds", unit="fold", disable=not progress):
            inside = set(fold.tolist())
            clone = type(self)(**asdict(self.config))
            clone._train([image for i, image in enumerate(images) if i not in inside], anomalies, progress=False)
            data = self._validation_data([images[i] for i in fold], [], scheme=f"crossfit-{len(folds)}",
                                         seed=[self.config.seed, int(fold[0])])
            prediction = clone._predict_raw(data.images)
            parts.append(data)
            scores.append(prediction.scores)
            maps.append(prediction.anomaly_maps)
        return ValidationData.concatenate(parts), np.concatenate(scores), np.concatenate(maps)

    def _validation_data(self, val: DefectSet | str | Path | list | None, fallback: list[ImageInput], *,
                         scheme: str = "holdout", seed: Any = None, anomalies: AnomalySamples | None = None
                         ) -> ValidationData:
        if isinstance(val, (str, Path)) and Path(val).is_dir() and (Path(val) / "test").is_dir():
            val = read_defect_set(val)
        if isinstance(val, DefectSet):
            samples = val.select(split="test") or val.select()
            images = [val.image_path(s) for s in samples]
            labels = np.array([s.is_anomalous for s in samples])
            masks = [val.load_mask(s) if s.is_anomalous and s.mask is not None else None for s in samples]
            data = ValidationData(images, labels, masks, scheme=scheme)
        else:
            images = resolve_images(val) if val is not None else list(fallback)
            data = ValidationData(images, np.zeros(len(images), bool), [None] * len(images), scheme=scheme)
        if anomalies is not None:  # given anomalies join the validation images (their source names the mix)
            source = data.anomalies_are if data.labels.any() else anomalies.source
            added = ValidationData(list(anomalies.images), np.ones(len(anomalies), bool), list(anomalies.masks))
            data = ValidationData.concatenate([data, added])
            data.anomalies_are = source
        seed = self.config.seed if seed is None else seed
        if self.config.threshold_method == "fpr" and self.config.calibration_views > 0:
            data = add_views(data, self.config.calibration_views, seed=seed)
        if not data.labels.any() and self.config.synthetic_val and self.config.threshold_method != "percentile":
            data = add_synthetic_anomalies(data, seed=seed)
        return data

    def _calibrate(self, data: ValidationData) -> Calibration:
        prediction = self._predict_raw(data.images, progress=False)
        return self._calibration_from(data, prediction.scores, prediction.anomaly_maps)

    def _calibration_from(self, data: ValidationData, scores: np.ndarray, maps: np.ndarray) -> Calibration:
        """The calibration for validation data scored as ``scores`` / ``maps`` (one per image of ``data``)."""
        size = self.config.image_size
        anomalous = data.labels
        normal = ~anomalous & ~data.views
        masks = [resize_mask(m, size) if m is not None else np.zeros((size, size), bool) for m in data.masks]
        have_masks = all(m is not None for m, a in zip(data.masks, anomalous, strict=True) if a)
        self.calibration_scores = CalibrationScores(scores[normal], scores[data.views], scores[anomalous],
                                                    data.anomalies_are, data.scheme)
        calibration = calibrate(
            scores[normal], scores[anomalous] if anomalous.any() else None,
            method=self.config.threshold_method, q=self.config.threshold_percentile,
            normal_maps=maps[~anomalous],
            anomalous_maps=maps[anomalous] if anomalous.any() and have_masks else None,
            anomalous_masks=np.stack([masks[i] for i in np.flatnonzero(anomalous)])
            if anomalous.any() and have_masks else None,
            anomalies_are=data.anomalies_are, target_fpr=self.config.target_fpr,
            view_scores=scores[data.views], scheme=data.scheme,
        )
        if calibration.target_fpr is not None:
            images = [data.images[i] for i in np.flatnonzero(normal)]
            names = [_image_name(images[i], i) for i in atypical_normals(scores[normal])]
            if names:
                _note_atypical_normals(calibration, names)
        return calibration

    @torch.no_grad()
    def _predict_raw(self, images: Any, *, batch_size: int | None = None, progress: bool = False) -> Prediction:
        if not self.fitted:
            raise InputError(f"{self.name}: the model is not fitted; call fit() or load a saved model first.")
        self.model.eval()
        scores, maps, shapes = [], [], []
        items = images if not isinstance(images, np.ndarray) or images.ndim == 4 else [images]
        total = len(items) if hasattr(items, "__len__") else None
        with tqdm(total=total, desc=f"{self.name} predict", unit="img", disable=not progress) as bar:
            for batch, batch_shapes in iter_batches(items, self.config.image_size,
                                                    batch_size or self.config.batch_size):
                batch_scores, batch_maps = self.model(batch)
                scores.append(batch_scores.float().cpu().numpy())
                maps.append(batch_maps.float().cpu().numpy())
                shapes.extend(batch_shapes)
                bar.update(len(batch_shapes))
        if not scores:
            raise InputError("no images to predict.")
        return Prediction(np.concatenate(scores), np.concatenate(maps), shapes)

    def predict(self, images: Any, *, batch_size: int | None = None, progress: bool = False) -> Prediction:
        """Score images (paths, arrays, or an iterable of them; streamed in batches)."""
        prediction = self._predict_raw(images, batch_size=batch_size, progress=progress)
        if self.calibration is not None:
            prediction.normalized_scores = self.calibration.normalize(prediction.scores)
            prediction.labels = prediction.scores >= self.calibration.image_threshold
            if self.calibration.pixel_threshold is not None:
                prediction.masks = prediction.anomaly_maps >= self.calibration.pixel_threshold
        return prediction

    # ----- persistence ----------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into the folder ``path`` (atomically, file by file)."""
        if not self.fitted:
            raise InputError(f"{self.name}: refusing to save an unfitted model; call fit() first.")
        return write_model_folder(Path(path), self.model, {
            "format_version": FORMAT_VERSION,
            "model": self.name,
            "config": asdict(self.config),
            "calibration": self.calibration.to_dict() if self.calibration else None,
        })

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load a state dict whose data-dependent buffers (memory banks, statistics) may differ in shape."""
        load_state_with_buffers(self.model, tensors, self.name)


def _image_name(item: ImageInput, index: int) -> str:
    return Path(item).name if isinstance(item, (str, Path)) else f"array #{index}"


def _seed_list(seed: Any) -> list[int]:
    return [int(s) for s in np.atleast_1d(seed)]


def _note_atypical_normals(calibration: Calibration, names: list[str]) -> None:
    """Name the held-out normals that score like outliers in the calibration's warning."""
    calibration.atypical_normals = names
    note = (f"{len(names)} normal image(s) score far above the other held-out normals "
            f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): check that they are good "
            f"parts; they raise the threshold.")
    calibration.warning = f"{calibration.warning} {note}" if calibration.warning else note


def add_views(data: ValidationData, count: int, *, seed: Any) -> ValidationData:
    """Append ``count`` augmented views (detect.calibration.augmented_views) of every validation normal."""
    images: list[ImageInput] = list(data.images)
    views = list(data.views)
    for index, (item, anomalous) in enumerate(zip(data.images, data.labels, strict=True)):
        if anomalous or data.views[index]:
            continue
        rng = np.random.default_rng([*_seed_list(seed), index, 5])
        made = augmented_views(load_rgb(item), count, rng)
        images += made
        views += [True] * len(made)
    extra = len(images) - len(data.images)
    return ValidationData(images, np.r_[data.labels, np.zeros(extra, bool)], list(data.masks) + [None] * extra,
                          data.anomalies_are, np.array(views, dtype=bool), data.scheme)


def add_synthetic_anomalies(data: ValidationData, *, seed: Any) -> ValidationData:
    """Append one synthetic anomaly per validation normal (CutPaste and DRAEM alternately), from synth."""
    from synth.generators import make_generator

    makers = [make_generator("cutpaste"), make_generator("draem")]  # draem built by name adds a defect (p 1)
    images: list[ImageInput] = list(data.images)
    labels = list(data.labels)
    masks = list(data.masks)
    views = list(data.views)
    for index, item in enumerate(data.images):
        if data.views[index]:
            continue
        rng = np.random.default_rng([*_seed_list(seed), index, 7])
        result = makers[index % 2](load_rgb(item), rng)
        if result.mask.any():
            images.append(result.image)
            labels.append(True)
            masks.append(result.mask)
            views.append(False)
    return ValidationData(images, np.array(labels, dtype=bool), masks, "synthetic", np.array(views, dtype=bool),
                          data.scheme)
