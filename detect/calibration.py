"""Thresholds at a stated operating point, set with every normal shot.

A user with k normal images has to pick the decision threshold with those same images. Two things make that
hard, and this module answers each:

1. **Held-out scores from every shot.** A memory-bank model scores its own training images near 0, so in-sample
   scores say nothing about a new good part; holding 20 % out leaves 1-3 images when k is small. Instead the
   normals are scored by models that did not see them:

   - ``crossfit`` (default for models whose refit is cheap, ``Detector.cheap_refit``: the memory-bank models,
     and only while the normals are few, ``CROSSFIT_MAX_NORMALS``): the normals are split into
     ``calibration_folds`` seeded folds (leave-one-out when k <= folds); a copy of the detector is fitted on the
     other folds and scores the held-out fold. The deployed model is then fitted on *all* k images.
   - ``holdout``: ``val_fraction`` of the normals is held out of training and scored by the deployed model (the
     choice for models that train for minutes, and for many normals, where 20 % is enough).
   - ``val``: normal images the user gives (``fit(val=...)``), scored by the deployed model.

   Each held-out normal is also scored in ``calibration_views`` mildly augmented views (a shift of up to 3 % of
   the side, brightness and contrast within +-5 %: the nuisance variation of a production line), and synthetic
   anomalies are made from the held-out normals (synth CutPaste and DRAEM) to estimate the recall.

2. **A threshold for a stated false-positive rate, not a percentile of 1-3 images.** ``threshold_method="fpr"``
   (default) sets the threshold for ``target_fpr`` (default 5 %) on normals:

   - with at least :func:`normals_needed` held-out normal images, the conformal empirical quantile: the
     ``ceil((n + 1)(1 - target))``-th smallest held-out score;
   - with fewer, the upper ``target`` quantile of the *predictive* distribution of a new normal score: a normal
     fit (on log scores when every score is positive, since distances and likelihood ratios are right-skewed)
     whose mean and spread come from the held-out scores and their views, widened by Student's t with n - 1
     degrees of freedom and ``sqrt(1 + 1/n)`` for the uncertainty of both (n = distinct images). The result
     carries a warning that names the number of normals needed to set the threshold from data alone.

   The expected recall at that threshold is measured on the anomalies of the calibration data (real ones when
   ``val`` has them, else the synthetic ones) and reported beside the threshold; it is an estimate, since
   synthetic anomalies are not the defects of the line.

Why the number of normals needed is ``ceil(4 (1 - a) / a)`` (76 at 5 %, 396 at 1 %): the false-positive rate of
an empirical quantile set on n normals has a standard deviation of about ``sqrt(a (1 - a) / n)``; below that n,
two standard deviations exceed the target itself, i.e. the measured rate may well be twice the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.special import ndtri, stdtrit  # t / normal quantiles; scipy.stats costs ~1 s of CLI start

from synth.core.errors import InputError

__all__ = ["CROSSFIT_MAX_NORMALS", "CalibrationScores", "TailEstimate", "atypical_normals", "augmented_views",
           "fold_indices", "fpr_threshold", "normals_needed", "operating_point", "oracle_recall"]

# Above this many training normals ``calibration="auto"`` holds out val_fraction instead of cross-fitting: the
# held-out share alone is then >= 13 images, and cross-fitting would refit the model calibration_folds times.
CROSSFIT_MAX_NORMALS = 64
VIEW_SHIFT = 0.03
VIEW_GAIN = 0.05
# Iglewicz & Hoaglin's cut on the modified z-score (0.6745 (x - median) / MAD) for an outlying observation.
ATYPICAL_Z = 3.5


@dataclass
class CalibrationScores:
    """Raw scores the threshold was set from (kept on the detector after ``fit``, not saved).

    normal: held-out normal images, one score each; views: their augmented views; anomalous: the calibration
    anomalies (``anomalies_are`` says real or synthetic); scheme: how the normals were held out.
    """

    normal: np.ndarray
    views: np.ndarray
    anomalous: np.ndarray
    anomalies_are: str
    scheme: str


@dataclass
class TailEstimate:
    """A threshold for a target false-positive rate and how it was reached."""

    threshold: float
    tail: str  # "empirical", "lognormal" or "normal"
    n_normals: int
    normals_needed: int
    warning: str | None


def normals_needed(target_fpr: float) -> int:
    """Held-out normal images needed to set an empirical threshold at ``target_fpr`` within a factor 2 (see the
    module docstring)."""
    return math.ceil(4 * (1 - target_fpr) / target_fpr - 1e-9)


def fold_indices(n: int, folds: int, seed: int) -> list[np.ndarray]:
    """``min(n, folds)`` disjoint folds covering ``range(n)`` (seeded permutation, sorted within each fold)."""
    if n < 2:
        raise InputError(f"cross-fitting needs at least 2 normal images (got {n}).")
    order = np.random.default_rng([seed, 11]).permutation(n)
    return [np.sort(part) for part in np.array_split(order, min(n, max(2, folds)))]


def augmented_views(image: np.ndarray, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` mild views of a normal image: alternately a shift (reflected border) and a gain/offset change.

    Mild on purpose: flips or large rotations would turn oriented objects into anomalies.
    """
    h, w = image.shape[:2]
    views = []
    for index in range(count):
        if index % 2 == 0:
            limit_x, limit_y = max(1, round(VIEW_SHIFT * w)), max(1, round(VIEW_SHIFT * h))
            dx, dy = int(rng.integers(-limit_x, limit_x + 1)), int(rng.integers(-limit_y, limit_y + 1))
            matrix = np.float32([[1, 0, dx], [0, 1, dy]])
            views.append(cv2.warpAffine(image, matrix, (w, h), borderMode=cv2.BORDER_REFLECT_101))
        else:
            gain = rng.uniform(1 - VIEW_GAIN, 1 + VIEW_GAIN)
            offset = rng.uniform(-VIEW_GAIN, VIEW_GAIN) * 128
            mean = image.reshape(-1, image.shape[-1]).mean(0)
            views.append(np.clip((image.astype(np.float32) - mean) * gain + mean + offset, 0, 255).astype(np.uint8))
    return views


def fpr_threshold(normal: np.ndarray, views: np.ndarray | None, target_fpr: float) -> TailEstimate:
    """Threshold for ``target_fpr`` from held-out normal scores (and their views); see the module docstring."""
    normal = np.asarray(normal, dtype=np.float64).ravel()
    extra = np.asarray(views if views is not None else [], dtype=np.float64).ravel()
    if not 0 < target_fpr < 1:
        raise InputError(f"target_fpr={target_fpr} must be in (0, 1), e.g. 0.05 for 5 % false alarms.")
    n = normal.size
    if n == 0:
        raise InputError("threshold calibration needs at least one held-out normal image.")
    needed = normals_needed(target_fpr)
    if n >= needed:
        rank = math.ceil((n + 1) * (1 - target_fpr))
        threshold = float(np.sort(normal)[min(rank, n) - 1]) + 1e-12 * max(1.0, abs(float(normal.max())))
        return TailEstimate(threshold, "empirical", n, needed, None)
    pooled = np.r_[normal, extra]
    log = bool((pooled > 0).all())
    values = np.log(pooled) if log else pooled
    spread = float(values.std(ddof=1)) if values.size > 1 else 0.0
    if n >= 2:
        quantile = stdtrit(n - 1, 1 - target_fpr) * math.sqrt(1 + 1 / n)
    else:  # one image: no spread between images to widen by; the views' spread is all there is
        quantile = ndtri(1 - target_fpr) * math.sqrt(2)
    if spread <= 0:
        spread = 0.1 * abs(float(values.mean())) or 1.0  # one score, no views: a guess, said in the warning
    value = float(values.mean()) + quantile * spread
    threshold = float(math.exp(value)) if log else value
    tail = "lognormal" if log else "normal"
    warning = (f"only {n} held-out normal image(s): the threshold for a {target_fpr:.1%} false-positive rate is "
               f"extrapolated from a {tail} fit of their scores; about {needed} normal images are needed to set "
               f"it from data alone, so the false-positive rate on the line may differ by a factor of 2 or more.")
    if n == 1:
        warning += " With one image the spread comes from its augmented views only: treat it as a first guess."
    return TailEstimate(threshold, tail, n, needed, warning)


def atypical_normals(normal: np.ndarray) -> np.ndarray:
    """Indices of held-out normal scores far above the others (modified z-score > 3.5, on log scores when all
    are positive); empty below 5 scores. Such a shot is kept (a real normal tail is information: removing it
    raised the false-positive rate on kolektorsdd at k = 16 from 0.036 to 0.103 in an exploratory run) but named
    in the calibration's warning: it may be a defective part among the normals, and it raises the threshold."""
    scores = np.asarray(normal, dtype=np.float64).ravel()
    if scores.size < 5:
        return np.zeros(0, dtype=int)
    values = np.log(scores) if (scores > 0).all() else scores
    median = np.median(values)
    mad = np.median(np.abs(values - median))
    if mad <= 0:
        return np.zeros(0, dtype=int)
    return np.flatnonzero(0.6745 * (values - median) / mad > ATYPICAL_Z)


def operating_point(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float | None]:
    """False-positive rate, recall, precision and F1 of ``score >= threshold`` (``Detector.predict``'s rule)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    predicted = scores >= threshold
    tp = int((predicted & labels).sum())
    fp = int((predicted & ~labels).sum())
    fn = int((~predicted & labels).sum())
    n_normal, n_anomalous = int((~labels).sum()), int(labels.sum())
    return {"fpr": fp / n_normal if n_normal else None, "recall": tp / n_anomalous if n_anomalous else None,
            "precision": tp / (tp + fp) if tp + fp else None, "f1": 2 * tp / max(2 * tp + fp + fn, 1)}


def oracle_recall(scores: np.ndarray, labels: np.ndarray, target_fpr: float) -> float:
    """Recall on the ROC at ``target_fpr``: the threshold that flags at most that share of the normals, set on
    the evaluated data itself (a bound no calibration can beat, reported beside the tool's threshold)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    normal = np.sort(scores[~labels])[::-1]
    allowed = int(np.floor(target_fpr * normal.size + 1e-9))  # normals that may lie at or above the threshold
    threshold = normal[allowed] if allowed < normal.size else -np.inf
    return float((scores[labels] > threshold).mean())
