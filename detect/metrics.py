"""Anomaly detection metrics: image/pixel AUROC, AUPRO, F1-max and average precision.

ROC and precision-recall curves come from scikit-learn; AUPRO (per-region overlap, integrated up to a false
positive rate of 0.3 and normalised by it, as in the MVTec AD paper) is computed here in one sort of all
pixels (O(P log P)) and checked in the tests against a plain threshold-by-threshold reference.

scikit-learn and scipy.ndimage are imported where used: every ``detect`` command imports this module, most
(fit, predict) never compute a metric, and the two cost about a second of start-up.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _check_two_classes(labels: np.ndarray, what: str) -> bool:
    return bool(labels.any() and (~labels).any())


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    labels = np.asarray(labels, dtype=bool).ravel()
    if not _check_two_classes(labels, "auroc"):
        return float("nan")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64).ravel()))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    labels = np.asarray(labels, dtype=bool).ravel()
    if not labels.any():
        return float("nan")
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(labels, np.asarray(scores, dtype=np.float64).ravel()))


def f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold reaching it (predict anomalous when score >= threshold)."""
    labels = np.asarray(labels, dtype=bool).ravel()
    if not labels.any():
        return float("nan"), float("nan")
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(labels, np.asarray(scores, dtype=np.float64).ravel())
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    return float(f1[best]), float(thresholds[best]) if len(thresholds) else float("nan")


def aupro(anomaly_maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit``.

    ``anomaly_maps`` and ``masks`` are (N, H, W). Each connected defect region (8-connectivity) weighs the
    same, whatever its size; the false positive rate is taken over all defect-free pixels.
    """
    from scipy import ndimage

    maps = np.asarray(anomaly_maps, dtype=np.float64)
    masks = np.asarray(masks, dtype=bool)
    if maps.shape != masks.shape:
        raise ValueError(f"anomaly maps {maps.shape} and masks {masks.shape} differ in shape")
    region_weight = np.zeros(masks.shape, dtype=np.float64)
    n_regions = 0
    structure = np.ones((3, 3), dtype=bool)
    for index in range(masks.shape[0]):
        labeled, count = ndimage.label(masks[index], structure=structure)
        if count == 0:
            continue
        sizes = np.bincount(labeled.ravel())
        weights = np.zeros(count + 1)
        weights[1:] = 1.0 / sizes[1:]
        region_weight[index] = weights[labeled]
        n_regions += count
    normal = ~masks
    if n_regions == 0 or not normal.any():
        return float("nan")
    scores = maps.ravel()
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    fpr = np.cumsum(normal.ravel()[order]) / normal.sum()
    pro = np.cumsum(region_weight.ravel()[order]) / n_regions
    # Thresholds sit between distinct scores: keep the last position of each run of equal scores.
    last_of_run = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    fpr = np.r_[0.0, fpr[last_of_run]]
    pro = np.r_[0.0, pro[last_of_run]]
    cut = int(np.searchsorted(fpr, fpr_limit, side="right"))
    fpr_kept, pro_kept = fpr[:cut], pro[:cut]
    if cut < len(fpr) and fpr_kept[-1] < fpr_limit:
        # Interpolate the curve at exactly fpr_limit.
        x0, x1, y0, y1 = fpr[cut - 1], fpr[cut], pro[cut - 1], pro[cut]
        y = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        fpr_kept, pro_kept = np.r_[fpr_kept, fpr_limit], np.r_[pro_kept, y]
    return float(np.trapezoid(pro_kept, fpr_kept) / fpr_limit)


def roc_points(scores: np.ndarray, labels: np.ndarray) -> dict[str, list[float]]:
    """ROC curve points (for plots)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(labels, dtype=bool).ravel(), np.asarray(scores, dtype=np.float64).ravel())
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist()}


def _subsample(values: np.ndarray, labels: np.ndarray, limit: int, seed: int = 0):
    if values.size <= limit:
        return values, labels
    keep = np.random.default_rng(seed).choice(values.size, size=limit, replace=False)
    return values[keep], labels[keep]


def evaluate(image_scores: np.ndarray, image_labels: np.ndarray, anomaly_maps: np.ndarray | None = None,
             masks: np.ndarray | None = None, *, max_pixels: int = 20_000_000) -> dict[str, Any]:
    """All metrics in one dict: image_auroc, image_ap, image_f1_max, and with maps+masks pixel_auroc,
    pixel_ap, pixel_f1_max and aupro (pixel curves use a fixed random subset above ``max_pixels``)."""
    image_labels = np.asarray(image_labels, dtype=bool)
    f1, threshold = f1_max(image_scores, image_labels)
    result: dict[str, Any] = {
        "image_auroc": auroc(image_scores, image_labels),
        "image_ap": average_precision(image_scores, image_labels),
        "image_f1_max": f1,
        "image_f1_threshold": threshold,
        "num_images": int(len(image_labels)),
        "num_anomalous": int(image_labels.sum()),
    }
    if anomaly_maps is not None and masks is not None:
        values = np.asarray(anomaly_maps, dtype=np.float32).ravel()
        labels = np.asarray(masks, dtype=bool).ravel()
        values, labels = _subsample(values, labels, max_pixels)
        result["pixel_auroc"] = auroc(values, labels)
        result["pixel_ap"] = average_precision(values, labels)
        result["pixel_f1_max"] = f1_max(values, labels)[0]
        result["aupro"] = aupro(anomaly_maps, masks)
    return result
