"""Thresholds and score normalisation.

Ways to set the image threshold, chosen by ``method``:

- ``"fpr"`` (default): the threshold for a target false-positive rate on normals, from held-out normal scores
  of every shot (cross-fitted or held out, see :mod:`detect.calibration`), with the recall it is expected to
  reach measured on the calibration anomalies.
- ``"f1"``: the F1-optimal threshold between normal validation scores and anomalous ones (real labeled
  anomalies when the validation data has them, otherwise synthetic anomalies made by ``synth`` from the
  validation normals). The threshold is placed halfway between the chosen anomalous score and the highest
  normal score below it, so it does not sit on a sample.
- ``"percentile"``: the ``q``-th percentile of normal validation scores (default 99), for when no
  anomalies of any kind should be used.
- ``"auto"``: ``"f1"`` when anomalous validation scores exist, else ``"percentile"``.

Why it cannot collapse (Anomalib's known failure, a threshold fixed at the minimum score or at 0 when the
validation set has no anomalies): the threshold is always computed from scores of *held-out* normal images
(never the training images a memory bank contains, whose scores are ~0), and the F1 method always has both
classes because synthetic anomalies fill in for missing real ones. A degenerate validation set (no spread
at all) raises an error instead of returning a meaningless threshold.

Normalised scores map the threshold to 0.5: ``0.5 + (score - threshold) / (max - min)`` over the validation
scores, clipped to [0, 1]; scores above 0.5 are anomalous.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from detect.calibration import fpr_threshold
from detect.metrics import f1_max
from synth.core.errors import InputError


@dataclass
class Calibration:
    """Image (and optional pixel) thresholds plus the range used for normalised scores."""

    image_threshold: float
    method: str
    score_min: float
    score_max: float
    pixel_threshold: float | None = None
    pixel_min: float | None = None
    pixel_max: float | None = None
    num_normal: int = 0
    num_anomalous: int = 0
    # The operating point on the calibration data (None for models saved before it existed); ``target_fpr`` and
    # the tail fields for method "fpr" only.
    target_fpr: float | None = None
    estimated_recall: float | None = None  # share of the calibration anomalies at or above the threshold
    calibration_fpr: float | None = None  # share of the held-out normals (and views) at or above it
    num_views: int = 0
    tail: str | None = None  # "empirical", "lognormal" or "normal" (see detect.calibration.fpr_threshold)
    normals_needed: int | None = None
    scheme: str | None = None  # how the normals were held out: "crossfit-<folds>", "holdout", "val", "in-sample"
    anomalies_are: str | None = None
    warning: str | None = None
    atypical_normals: list[str] | None = None  # held-out normals that score like outliers (named in the warning)

    def normalize(self, scores: np.ndarray) -> np.ndarray:
        span = max(self.score_max - self.score_min, 1e-12)
        return np.clip(0.5 + (np.asarray(scores, dtype=np.float64) - self.image_threshold) / span, 0, 1)

    def normalize_map(self, maps: np.ndarray) -> np.ndarray:
        if self.pixel_threshold is None or self.pixel_min is None or self.pixel_max is None:
            raise InputError("the model has no pixel threshold; fit it with validation images first.")
        span = max(self.pixel_max - self.pixel_min, 1e-12)
        return np.clip(0.5 + (np.asarray(maps, dtype=np.float64) - self.pixel_threshold) / span, 0, 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        return cls(**data)

    def describe(self) -> str:
        """The decision in words: threshold, how it was set and its operating point (CLI output, logs)."""
        text = f"threshold {self.image_threshold:.4g} ({self.method}"
        if self.target_fpr is not None:
            text += (f", target false-positive rate {self.target_fpr:.1%}; {self.num_normal} held-out normal "
                     f"image(s) [{self.scheme}], tail {self.tail}")
            if self.estimated_recall is not None:
                text += (f"; expected recall {self.estimated_recall:.1%} on {self.num_anomalous} "
                         f"{self.anomalies_are} anomalies")
        return text + ")"


def percentile_threshold(normal_scores: np.ndarray, q: float = 99.0) -> float:
    """The ``q``-th percentile of normal scores (linear interpolation)."""
    scores = np.asarray(normal_scores, dtype=np.float64).ravel()
    if scores.size == 0:
        raise InputError("no normal validation scores to set a threshold from.")
    if not 0 < q <= 100:
        raise InputError(f"percentile q={q} must be in (0, 100].")
    return float(np.percentile(scores, q))


def f1_optimal_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """F1-optimal threshold, moved halfway down to the next lower score (see module docstring)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    if not labels.any() or labels.all():
        raise InputError("F1-optimal threshold needs both normal and anomalous validation scores.")
    _, threshold = f1_max(scores, labels)
    below = scores[scores < threshold]
    return float((threshold + below.max()) / 2) if below.size else float(threshold)


def _subsample_pixels(values: np.ndarray, limit: int = 2_000_000, seed: int = 0) -> np.ndarray:
    if values.size <= limit:
        return values
    return values[np.random.default_rng(seed).choice(values.size, size=limit, replace=False)]


def calibrate(normal_scores: np.ndarray, anomalous_scores: np.ndarray | None = None, *, method: str = "auto",
              q: float = 99.0, normal_maps: np.ndarray | None = None, anomalous_maps: np.ndarray | None = None,
              anomalous_masks: np.ndarray | None = None, anomalies_are: str = "real",
              target_fpr: float = 0.05, view_scores: np.ndarray | None = None, scheme: str | None = None
              ) -> Calibration:
    """Compute a :class:`Calibration` from validation scores (and maps for the pixel threshold).

    ``anomalies_are`` ("real" or "synthetic") is recorded in ``method`` so reports say where it came from.
    ``target_fpr``, ``view_scores`` (scores of augmented views of the normals) and ``scheme`` are used by
    method ``"fpr"``; the anomalies only estimate its recall there.
    """
    normal = np.asarray(normal_scores, dtype=np.float64).ravel()
    anomalous = np.asarray(anomalous_scores if anomalous_scores is not None else [], dtype=np.float64).ravel()
    if normal.size == 0:
        raise InputError("threshold calibration needs at least one normal validation image.")
    if method not in ("auto", "fpr", "f1", "percentile"):
        raise InputError(f"threshold method {method!r}: choose 'fpr', 'auto', 'f1' or 'percentile'.")
    if method == "auto":
        method = "f1" if anomalous.size else "percentile"
    views = np.asarray(view_scores if view_scores is not None else [], dtype=np.float64).ravel()
    tail = None
    if method == "fpr":
        tail = fpr_threshold(normal, views, target_fpr)
        all_scores = np.r_[normal, views, anomalous]
        threshold, name = tail.threshold, f"fpr-{target_fpr:g}"
    elif method == "f1":
        if anomalous.size == 0:
            raise InputError("threshold method 'f1' needs anomalous validation images (real or synthetic).")
        all_scores = np.r_[normal, anomalous]
        threshold = f1_optimal_threshold(all_scores, np.r_[np.zeros(normal.size, bool), np.ones(anomalous.size, bool)])
        name = f"f1-{anomalies_are}"
    else:
        all_scores = np.r_[normal, anomalous]
        threshold = percentile_threshold(normal, q)
        name = f"percentile-{q:g}"
    if np.ptp(all_scores) <= 0:
        raise InputError("all validation scores are identical: the model does not separate anything yet "
                         "(check the training data and image size).")
    calibration = Calibration(image_threshold=threshold, method=name, score_min=float(all_scores.min()),
                              score_max=float(all_scores.max()), num_normal=int(normal.size),
                              num_anomalous=int(anomalous.size), scheme=scheme)
    # The operating point on the calibration data, whatever set the threshold: normals (and views) flagged, and
    # the share of the calibration anomalies caught.
    calibration.estimated_recall = float((anomalous >= threshold).mean()) if anomalous.size else None
    calibration.calibration_fpr = float((np.r_[normal, views] >= threshold).mean())
    calibration.num_views = int(views.size)
    calibration.anomalies_are = anomalies_are if anomalous.size else None
    if tail is not None:
        calibration.target_fpr = float(target_fpr)
        calibration.tail = tail.tail
        calibration.normals_needed = tail.normals_needed
        calibration.warning = tail.warning
    if normal_maps is not None:
        normal_pixels = _subsample_pixels(np.asarray(normal_maps, dtype=np.float32).ravel())
        if anomalous_maps is not None and anomalous_masks is not None and np.asarray(anomalous_masks).any():
            values = np.r_[normal_pixels, np.asarray(anomalous_maps, dtype=np.float32).ravel()]
            labels = np.r_[np.zeros(normal_pixels.size, bool), np.asarray(anomalous_masks, dtype=bool).ravel()]
            keep = np.random.default_rng(0).permutation(values.size)[:4_000_000]
            pixel_threshold = f1_optimal_threshold(values[keep], labels[keep])
        else:
            values = normal_pixels
            pixel_threshold = percentile_threshold(normal_pixels, 99.9)
        calibration.pixel_threshold = pixel_threshold
        calibration.pixel_min = float(values.min())
        calibration.pixel_max = float(values.max())
    return calibration
