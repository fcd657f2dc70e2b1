"""What ``detect classify fit|predict|eval`` do, as functions.

- ``fit_classifier``: train and save; the folder appears complete or not at all (staging folder, then a swap, as
  ``detect fit``); a rerun of a killed fit starts over and, being seeded, writes the same model.
- ``predict_classes``: ``predictions.csv`` with the class, its probability and the top-k classes per image;
  streamed batch by batch, rows appended to ``OUT/.predictions.partial.csv`` so a killed run resumes (same model,
  same images); unreadable images get an ``error`` row.
- ``evaluate_classifier``: per-class accuracy, balanced accuracy, confusion matrix (``metrics.json``,
  ``confusion.png``) and a reliability diagram (``reliability.png``) on a labeled defect set; test classes the
  model never saw are reported (``unseen_classes``, their images counted apart), not an error.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detect.classify.classifier import CONFIG_FILE, ClassifierConfig, DefectClassifier
from detect.classify.metrics import classification_metrics, reliability
from detect.runner import (
    check_output_folder,
    predict_run_key,
    prepare_model_folder,
    save_into_place,
    write_rows_resumably,
)
from synth.core.config import validate_config
from synth.core.defect_set import read_defect_set
from synth.core.errors import InputError
from synth.core.io import iter_paths, write_bytes, write_json

logger = logging.getLogger(__name__)

PARTIAL = ".predictions.partial.csv"


def fit_classifier(real: Sequence[str | Path], out: str | Path, *, synthetic: Sequence[str | Path] = (),
                   options: dict[str, Any] | None = None, progress: bool = True, force: bool = False
                   ) -> DefectClassifier:
    """Train a classifier on the defect sets ``real`` (+ ``synthetic``) and save it into ``out``."""
    out = Path(out)
    config = validate_config(ClassifierConfig, dict(options or {}), source="classifier options")
    prepare_model_folder(out, CONFIG_FILE, force=force)
    classifier = DefectClassifier(config)
    start = time.perf_counter()
    classifier.fit(list(real), list(synthetic), progress=progress)
    save_into_place(classifier.save, out)
    history = classifier.history
    val = history.get("val_balanced_accuracy")
    print(f"trained a classifier over {len(classifier.classes)} classes ({', '.join(classifier.classes)}) on "
          f"{history['n_train']} images in {time.perf_counter() - start:.1f} s"
          + (f"; held-out balanced accuracy {val:.3f} at step {history['best_step']}" if val is not None else "")
          + f" -> {out}")
    return classifier


def _fields(top_k: int) -> list[str]:
    return ["image", "class", "probability", *[f"top{i}" for i in range(1, top_k + 1)], "error"]


def predict_classes(model_dir: str | Path, inputs: Sequence[str | Path], out: str | Path, *, top_k: int = 3,
                    batch_size: int = 32, progress: bool = True) -> Path:
    """Classify every image under ``inputs``; writes ``OUT/predictions.csv`` (see the module docstring)."""
    if batch_size < 1 or top_k < 1:
        raise InputError(f"--batch-size {batch_size} / --top-k {top_k}: both must be >= 1.")
    out = Path(out)
    check_output_folder(out)
    classifier = DefectClassifier.load(model_dir)
    top_k = min(top_k, len(classifier.classes))
    paths = iter_paths(inputs)
    if not paths:
        raise InputError("no images to classify: pass image files or folders.")
    fields = _fields(top_k)

    def score(images: list, kept: list[int]) -> dict[int, dict[str, str]]:
        prediction = classifier.predict(images, batch_size=batch_size)
        return {i: {"image": str(paths[i]), "class": ranked[0][0], "probability": f"{ranked[0][1]:.4f}", "error": "",
                    **{f"top{r + 1}": f"{name}:{p:.4f}" for r, (name, p) in enumerate(ranked)}}
                for i, ranked in zip(kept, prediction.top_k(top_k), strict=True)}

    rows = write_rows_resumably(out, paths, fields, predict_run_key(Path(model_dir), paths, bool(top_k), CONFIG_FILE),
                                score, partial_name=PARTIAL, final_name="predictions.csv", batch_size=batch_size,
                                desc="classify", progress=progress)
    errors = sum(1 for r in rows.values() if r["error"])
    print(f"classified {len(paths) - errors} images -> {out / 'predictions.csv'}"
          + (f"; {errors} unreadable, see the error column" if errors else ""))
    return out / "predictions.csv"


def _plot_confusion(matrix: list[list[int]], classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix, dtype=float)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(3.5, 0.6 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center",
                    color="white" if rates[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    _save_figure(fig, path)


def _plot_reliability(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    bins = table["bins"]
    ax.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["accuracy"] for b in bins], width=0.09,
           edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    ax.set_xlabel("confidence of the predicted class")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {table['ece']:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)


def _save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_bytes(path, buffer.getvalue())


def evaluate_classifier(model_dir: str | Path, data: str | Path, out: str | Path | None = None, *,
                        progress: bool = True) -> dict[str, Any]:
    """``detect classify eval``: metrics.json, confusion.png and reliability.png in ``out`` (default
    MODEL_DIR/eval) for the defect images of ``data`` (and its normal test images when the model has 'good')."""
    out = Path(out) if out is not None else Path(model_dir) / "eval"
    check_output_folder(out)
    classifier = DefectClassifier.load(model_dir)
    dataset = read_defect_set(data)
    samples = [s for s in dataset.select(split="test") if s.is_anomalous or "good" in classifier.classes]
    if not samples:
        raise InputError(f"{dataset.root}: no labeled test images (test/<class>/*) to evaluate on.")
    seen = [s for s in samples if s.defect_class in classifier.classes]
    unseen: dict[str, int] = {}
    for sample in samples:
        if sample.defect_class not in classifier.classes:
            unseen[sample.defect_class] = unseen.get(sample.defect_class, 0) + 1
    if unseen:
        logger.warning("%s: classes the model never saw are left out of the accuracy: %s", dataset.root,
                       ", ".join(f"{c} ({n} images)" for c, n in sorted(unseen.items())))
    if not seen:
        raise InputError(f"{dataset.root}: none of its classes ({', '.join(sorted(unseen))}) is one the model "
                         f"knows ({', '.join(classifier.classes)}).")
    prediction = classifier.predict([dataset.image_path(s) for s in seen])
    truth = [classifier.classes.index(s.defect_class) for s in seen]
    metrics = classification_metrics(truth, prediction.indices.tolist(), classifier.classes)
    metrics["balanced_accuracy"] = metrics["mean_accuracy"]
    metrics["reliability"] = reliability(prediction.probabilities, truth)
    metrics["classes"] = classifier.classes
    metrics["n_images"] = len(seen)
    metrics["unseen_classes"] = unseen
    write_json(out / "metrics.json", metrics)
    _plot_confusion(metrics["confusion"], classifier.classes, out / "confusion.png")
    _plot_reliability(metrics["reliability"], out / "reliability.png")
    return metrics
