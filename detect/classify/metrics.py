"""Classification metrics: per-class accuracy, balanced accuracy, confusion matrix, calibration (reliability)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix

__all__ = ["classification_metrics", "reliability"]


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str]) -> dict:
    """Per-class accuracy (recall), their mean (balanced accuracy), overall accuracy and the confusion matrix.

    ``confusion[i][j]`` counts test images of class ``classes[i]`` predicted as ``classes[j]``.
    """
    matrix = confusion_matrix(list(y_true), list(y_pred), labels=list(range(len(classes))))
    support = matrix.sum(axis=1)
    # A class without test images has no accuracy: None keeps the JSON strict (no NaN).
    per_class = {cls: float(matrix[i, i] / support[i]) if support[i] else None for i, cls in enumerate(classes)}
    valid = [v for v in per_class.values() if v is not None]
    return {
        "per_class": per_class,
        "mean_accuracy": float(np.mean(valid)) if valid else None,
        "overall_accuracy": float(np.trace(matrix) / max(int(matrix.sum()), 1)),
        "confusion": matrix.astype(int).tolist(),
    }


def reliability(probabilities: np.ndarray, y_true: Sequence[int], bins: int = 10) -> dict:
    """Reliability of the top-class probability: per equal-width confidence bin the mean confidence, the accuracy
    and the count, plus the expected calibration error (count-weighted |accuracy - confidence|)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    truth = np.asarray(list(y_true), dtype=int)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == truth
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        members = which == b
        if not members.any():
            continue
        conf, acc = float(confidence[members].mean()), float(correct[members].mean())
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "confidence": conf, "accuracy": acc,
                     "count": int(members.sum())})
        ece += members.sum() / max(len(truth), 1) * abs(acc - conf)
    return {"bins": rows, "ece": float(ece)}
