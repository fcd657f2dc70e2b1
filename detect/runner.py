"""What the ``detect`` subcommands do, as functions: fit and save, predict a folder, evaluate, benchmark."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from detect.base import Detector
from detect.calibration import operating_point, oracle_recall
from detect.data import resize_map, resize_mask
from detect.metrics import auroc, evaluate, roc_points
from detect.persistence import CONFIG_FILE, WEIGHTS_FILE
from detect.registry import create, load
from synth.core.defect_set import GOOD, read_defect_set
from synth.core.errors import ConfigError, InputError
from synth.core.io import durable_writes, iter_paths, read_image, write_image, write_json, write_text
from synth.parallel import Shard, current_shard, default_workers

logger = logging.getLogger(__name__)


def fit_model(name: str, data: str | Path, out: str | Path, *, options: dict[str, Any] | None = None,
              val: str | Path | None = None, anomalies: str | Path | None = None, progress: bool = True,
              force: bool = False) -> Detector:
    """Create, fit and save a model; the folder appears complete or not at all (written beside, then renamed).

    Crash safety: a fit killed at any point leaves ``out`` as it was (or, killed inside the final swap, the
    previous model in ``.NAME.old``, which the next run puts back); staging folders of killed runs are removed by
    the next run, and the rerun, being seeded, writes the same model as an uninterrupted run.
    """
    out = Path(out)
    prepare_model_folder(out, CONFIG_FILE, force=force)
    detector = create(name, **(options or {}))
    start = time.perf_counter()
    detector.fit(data, val, anomalies=anomalies, progress=progress)
    elapsed = time.perf_counter() - start
    save_into_place(detector.save, out)
    logger.info("fitted %s in %.1f s; saved to %s", name, elapsed, out)
    _print_decision(detector)
    return detector


def calibrate_model(model_dir: str | Path, data: str | Path, out: str | Path | None = None, *,
                    target_fpr: float | None = None) -> Detector:
    """Re-set a saved model's threshold on ``data`` (good parts it did not train on, or a labeled defect set)
    with ``Detector.calibrate``; the weights stay. Written to ``out`` (default: ``model_dir`` itself) with the
    fit's all-or-nothing swap, so a killed run leaves the previous model."""
    model_dir = Path(model_dir)
    out = Path(out) if out is not None else model_dir
    check_output_folder(out)
    # Before loading: a killed fit or calibrate may have left the model moved aside mid-swap.
    for folder in {model_dir, out}:
        _recover_interrupted_fit(folder)
    detector = load(model_dir).calibrate(data, target_fpr=target_fpr)
    save_into_place(detector.save, out)
    logger.info("calibrated %s on %s; saved to %s", detector.name, data, out)
    _print_decision(detector)
    return detector


def _print_decision(detector: Detector) -> None:
    """The decision the user deploys, with its operating point: printed, not only logged."""
    calibration = detector.calibration
    if calibration is not None:
        print(f"{detector.name}: {calibration.describe()}")
        if calibration.warning:
            print(f"warning: {calibration.warning}")


def prepare_model_folder(out: Path, config_file: str, *, force: bool) -> None:
    """Before a fit: recover what a killed fit left, refuse to overwrite a saved model unless ``force``."""
    _recover_interrupted_fit(out)
    if (out / config_file).exists() and not force:
        raise InputError(f"{out}: already holds a saved model; pass --force to overwrite it or choose another --out.")
    check_output_folder(out)


def save_into_place(save: Any, out: Path) -> None:
    """``save(folder)`` into a staging folder beside ``out``, then swap it in: ``out`` is complete or as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.stage-", dir=out.parent))
    save(staging)
    old = None
    if out.exists():
        old = _moved_aside(out)
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _moved_aside(out: Path) -> Path:
    """Where ``fit_model`` moves the previous model while it swaps the new one in."""
    return out.with_name(f".{out.name}.old")


def _recover_interrupted_fit(out: Path) -> None:
    """Undo what a killed ``fit_model`` left beside ``out``: restore a moved-away model, drop staging folders."""
    old = _moved_aside(out)
    if old.is_dir():
        if not out.exists():
            old.rename(out)
            logger.warning("%s: restored the previous folder that an interrupted fit had moved aside", out)
        else:
            shutil.rmtree(old, ignore_errors=True)
    if out.parent.is_dir():
        for staging in out.parent.glob(f".{out.name}.stage-*"):
            shutil.rmtree(staging, ignore_errors=True)


def check_output_folder(out: Path) -> None:
    """Refuse an output folder that is an existing file before any work is done."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is a file; choose a folder for --out.")


def heatmap_overlay(image: np.ndarray, anomaly_map: np.ndarray, *, vmin: float, vmax: float,
                    mask: np.ndarray | None = None) -> np.ndarray:
    """Original | JET heat map blended over it (| predicted mask contour in green when given)."""
    span = max(vmax - vmin, 1e-12)
    scaled = np.clip((anomaly_map - vmin) / span, 0, 1)
    heat = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
    blended = (0.55 * image + 0.45 * heat).astype(np.uint8)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        blended = np.ascontiguousarray(blended)
        cv2.drawContours(blended, contours, -1, (0, 255, 0), 1)
    return np.concatenate([image, blended], axis=1)


def prediction_overlay(image: np.ndarray, anomaly_map: np.ndarray, calibration: Any, *, with_mask: bool
                       ) -> np.ndarray:
    """The overlay ``detect predict`` writes: the map (model size) resized to the image, coloured on the
    calibration's pixel range, with the predicted mask's contour when the model has a pixel threshold."""
    amap = resize_map(anomaly_map, image.shape[:2])
    mask = amap >= calibration.pixel_threshold if with_mask and calibration is not None else None
    vmin = calibration.pixel_min if calibration and calibration.pixel_min is not None else 0.0
    vmax = calibration.pixel_max if calibration and calibration.pixel_max is not None else float(amap.max())
    return heatmap_overlay(image, amap, vmin=vmin, vmax=vmax, mask=mask)


SCORE_FIELDS = ["image", "score", "normalized_score", "anomalous", "error"]
# Rows of a running `detect predict`, appended batch by batch; a rerun of the same command resumes from it.
PARTIAL_SCORES = ".scores.partial.csv"


def read_batch(paths: Sequence[Path], indices: Sequence[int]) -> tuple[list[np.ndarray], list[int], dict[int, str]]:
    """Read ``paths[i]`` for ``i`` in ``indices``: (images, their indices, {index: one-line error} for unreadable
    files, each logged as a warning). One line per error: partial CSV files are read back line by line."""
    images, kept, failed = [], [], {}
    for i in indices:
        try:
            images.append(read_image(paths[i]))
            kept.append(i)
        except InputError as exc:
            logger.warning("%s", exc)
            failed[i] = " ".join(str(exc).split())
    return images, kept, failed


def predict_run_key(model_dir: Path, paths: Sequence[Path], overlays: bool, config_file: str = CONFIG_FILE) -> str:
    """What a partial predict run depends on: the model (config + weights file identity) and the image list."""
    digest = hashlib.sha256((model_dir / config_file).read_bytes())
    weights = (model_dir / WEIGHTS_FILE).stat()
    digest.update(f"{weights.st_size}:{weights.st_mtime_ns}:{overlays}\n".encode())
    for path in paths:
        digest.update(f"{path}\0".encode())
    return digest.hexdigest()[:16]


def read_partial_rows(partial: Path, key: str) -> dict[int, dict[str, str]]:
    """Rows (by image index) of an interrupted run with the same key; anything else is discarded."""
    if not partial.is_file():
        return {}
    text = partial.read_text(encoding="utf-8")
    header, _, body = text.partition("\n")
    if header != f"# {key}":
        logger.info("%s: from another model or image list; starting over", partial)
        return {}
    body = body[:body.rfind("\n") + 1]  # a kill mid-write leaves an unterminated last line: drop it
    return {int(row.pop("index")): row for row in csv.DictReader(io.StringIO(body))}


def _shard_partial(partial: Path, shard: Shard) -> Path:
    return partial.with_name(f"{partial.name}.shard-{shard.index:03d}-of-{shard.count:03d}")


ScoredRows = dict[int, dict[str, str]]


def write_rows_resumably(out: Path, paths: Sequence[Path], fields: list[str], key: str,
                         score: Callable[[list[np.ndarray], list[int]], ScoredRows | Callable[[], ScoredRows]], *,
                         partial_name: str, final_name: str, batch_size: int, desc: str, progress: bool
                         ) -> dict[int, dict[str, str]]:
    """The resumable batch loop of ``detect predict`` and ``detect classify predict``.

    ``score(images, indices)`` returns one CSV row per readable image (writing any side files such as overlays
    first), or a callable that waits for the side files and then returns the rows: the loop calls it only after
    the next batch has been scored, so side files are written while the model runs; unreadable images get a row
    with only ``image`` and ``error``. Rows are appended to ``OUT/partial_name`` batch by batch (a row there means
    its side files are complete), so a rerun with the same ``key`` (model + image list) only scores the missing
    images; ``OUT/final_name`` is written atomically in
    input order at the end and the partial file removed. Returns the rows by image index.

    The next batch is decoded on a background thread while the model scores the current one. Under
    ``accelerate launch`` process ``r`` of ``W`` scores the batches ``b % W == r`` into its own partial file; the
    main process writes the final table once all are done (the same bytes as one process), and any later run
    resumes from every partial file with the same key.
    """
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    shard = current_shard()
    partial = out / partial_name if shard.count == 1 else _shard_partial(out / partial_name, shard)
    rows: dict[int, dict[str, str]] = {}
    for done in [out / partial_name, *sorted(out.glob(f"{partial_name}.shard-*"))]:
        rows.update(read_partial_rows(done, key))
    todo = [i for i in range(len(paths)) if i not in rows]
    if rows:
        logger.info("resuming: %d of %d images already done", len(rows), len(paths))
    # Rewritten with only its complete rows, so a line a kill cut short is not continued by the next append.
    own = io.StringIO()
    own_writer = csv.DictWriter(own, fieldnames=["index", *fields], lineterminator="\n")
    own_writer.writerows({"index": i, **row} for i, row in sorted(read_partial_rows(partial, key).items()))
    write_text(partial, f"# {key}\n" + ",".join(["index", *fields]) + "\n" + own.getvalue())
    # Shards take whole batches of the one-process order: each image is scored in the batch it would have been in,
    # so float results (which can depend on the batch) match a one-process run.
    chunks = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)][shard.index::shard.count]
    with tqdm(total=len(paths), initial=len(paths) - len(todo), desc=desc, unit="img",
              disable=not progress or not shard.is_main) as bar, \
            open(partial, "a", encoding="utf-8", newline="") as handle, ThreadPoolExecutor(1) as decoder:
        writer = csv.DictWriter(handle, fieldnames=["index", *fields], lineterminator="\n")
        upcoming = decoder.submit(read_batch, paths, chunks[0]) if chunks else None
        pending: tuple[ScoredRows, ScoredRows | Callable[[], ScoredRows]] | None = None

        def append(done: tuple[ScoredRows, ScoredRows | Callable[[], ScoredRows]]) -> None:
            """Append one batch's rows once its side files exist (a row in the partial file means complete)."""
            new_rows, scored = done
            new_rows.update(scored() if callable(scored) else scored)
            writer.writerows({"index": i, **row} for i, row in sorted(new_rows.items()))
            handle.flush()
            if durable_writes():
                os.fsync(handle.fileno())
            rows.update(new_rows)
            bar.update(len(new_rows) * shard.count)

        for number in range(len(chunks)):
            assert upcoming is not None
            images, kept, failed = upcoming.result()
            if number + 1 < len(chunks):
                upcoming = decoder.submit(read_batch, paths, chunks[number + 1])
            failed_rows = {i: {**dict.fromkeys(fields, ""), "image": str(paths[i]), "error": error}
                           for i, error in failed.items()}
            try:
                scored = score(images, kept) if images else {}
            except BaseException:
                if pending is not None:  # the finished batch still counts: a rerun resumes after it
                    append(pending)
                raise
            if pending is not None:
                append(pending)
            pending = (failed_rows, scored)
        if pending is not None:
            append(pending)
    shard.wait_for_everyone()
    if not shard.is_main:
        return rows
    for done in sorted(out.glob(f"{partial_name}.shard-*")):
        rows.update(read_partial_rows(done, key))
    buffer = io.StringIO()
    table = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    table.writeheader()
    table.writerows(rows[i] for i in range(len(paths)))
    write_text(out / final_name, buffer.getvalue())
    for done in [out / partial_name, *out.glob(f"{partial_name}.shard-*")]:
        done.unlink(missing_ok=True)
    return rows


def predict_to_folder(model_dir: str | Path, inputs: Sequence[str | Path], out: str | Path, *,
                      overlays: bool = True, batch_size: int | None = None, progress: bool = True) -> Path:
    """Score every image under ``inputs``; writes ``scores.csv`` (+ ``overlays/``) into ``out``.

    Images are streamed batch by batch, so memory stays bounded for any number of images. Unreadable
    images are skipped, listed in the CSV's ``error`` column and reported at the end. Rows are appended to
    ``OUT/.scores.partial.csv`` after each batch, so a killed run resumes where it stopped when the same
    command is rerun (same model, same images); ``scores.csv`` is written atomically at the end, in input order.
    """
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: must be >= 1 (leave it out to use the model's batch size).")
    started = time.time()
    out = Path(out)
    check_output_folder(out)
    # A run killed while overlays were being written leaves their temporary files (written beside, then renamed);
    # remove those of earlier runs (older than this one: a launched sibling's files are newer).
    for stale in (out / "overlays").glob(".*.tmp"):
        if stale.stat().st_mtime < started:
            stale.unlink(missing_ok=True)
    detector = load(model_dir)
    paths = iter_paths(inputs)
    if not paths:
        raise InputError("no images to predict: pass image files or folders.")
    batch_size = batch_size or detector.config.batch_size
    calibration = detector.calibration

    def write_overlay(index: int, i: int, images: list[np.ndarray], prediction: Any) -> None:
        write_image(out / "overlays" / f"{i:05d}_{paths[i].stem}.png",
                    prediction_overlay(images[index], prediction.anomaly_maps[index], calibration,
                                       with_mask=prediction.masks is not None))

    def score(images: list[np.ndarray], kept: list[int]) -> ScoredRows | Callable[[], ScoredRows]:
        prediction = detector.predict(images)
        normalized = prediction.normalized_scores
        scored = {}
        for index, i in enumerate(kept):
            scored[i] = {
                "image": str(paths[i]), "score": f"{float(prediction.scores[index]):.6g}",
                "normalized_score": "" if normalized is None else f"{normalized[index]:.4f}",
                "anomalous": "" if prediction.labels is None else str(int(prediction.labels[index])),
                "error": "",
            }
        if not overlays:
            return scored
        # PNG encoding (the larger part of an overlay's cost) releases the GIL: a batch's overlays are written on
        # all cores while the model scores the next batch; its rows are appended once they exist.
        writes = [overlay_pool.submit(write_overlay, index, i, images, prediction) for index, i in enumerate(kept)]

        def rows_once_written() -> ScoredRows:
            for write in writes:
                write.result()  # re-raises a failed write
            return scored

        return rows_once_written

    with ThreadPoolExecutor(default_workers()) as overlay_pool:
        rows = write_rows_resumably(out, paths, SCORE_FIELDS, predict_run_key(Path(model_dir), paths, overlays),
                                    score, partial_name=PARTIAL_SCORES, final_name="scores.csv",
                                    batch_size=batch_size, desc="detect predict", progress=progress)
    if not current_shard().is_main:  # a shard under accelerate launch: the main process wrote scores.csv
        return out / "scores.csv"
    errors = sum(1 for r in rows.values() if r["error"])
    flagged = sum(1 for r in rows.values() if r["anomalous"] == "1")
    point = ""
    if calibration is not None and calibration.target_fpr is not None:
        point = f", set for a {calibration.target_fpr:.1%} false-positive rate on normals"
    print(f"scored {len(rows) - errors} images ({flagged} anomalous at the calibrated threshold{point}) -> "
          f"{out}/scores.csv" + (f"; {errors} unreadable, see the error column" if errors else ""))
    return out / "scores.csv"


def _plot_roc(curves: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    for label, points in curves.items():
        ax.plot(points["fpr"], points["tpr"], label=label)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)


def evaluate_detector(detector: Detector, data: str | Path, *, progress: bool = False) -> dict[str, Any]:
    """Metrics of a fitted detector on the ``test`` split of a labeled dataset (maps compared at model size)."""
    dataset = read_defect_set(data)
    samples = dataset.select(split="test")
    if not samples:
        raise InputError(f"{dataset.root}: no test/ images to evaluate on.")
    size = detector.config.image_size
    start = time.perf_counter()
    prediction = detector.predict([dataset.image_path(s) for s in samples], progress=progress)
    elapsed = time.perf_counter() - start
    labels = np.array([s.is_anomalous for s in samples])
    have_masks = all(s.mask is not None for s in samples if s.is_anomalous)
    masks = None
    if have_masks and labels.any():
        masks = np.stack([resize_mask(dataset.load_mask(s, shape), size)
                          for s, shape in zip(samples, prediction.image_shapes, strict=True)])
    metrics = evaluate(prediction.scores, labels, prediction.anomaly_maps if masks is not None else None, masks)
    metrics["predict_images_per_s"] = len(samples) / elapsed
    per_class = {}
    for defect_class in dataset.defect_classes:
        chosen = np.array([s.defect_class in (GOOD, defect_class) for s in samples])
        per_class[defect_class] = auroc(prediction.scores[chosen], labels[chosen])
    metrics["per_class_image_auroc"] = per_class
    calibration = detector.calibration
    if calibration is not None:
        predicted = prediction.scores >= calibration.image_threshold
        point = operating_point(prediction.scores, labels, calibration.image_threshold)
        metrics["threshold"] = {
            "method": calibration.method,
            "value": calibration.image_threshold,
            "precision": point["precision"] or 0.0,
            "recall": point["recall"] or 0.0,
            "false_positive_rate": point["fpr"] or 0.0,
            "accuracy": float((predicted == labels).mean()),
            # What the calibration promised, beside what the test split measures.
            "target_fpr": calibration.target_fpr,
            "calibration_fpr": calibration.calibration_fpr,  # share of the held-out normals flagged at fit time
            "estimated_recall": calibration.estimated_recall,
            "roc_recall_at_target": oracle_recall(prediction.scores, labels, calibration.target_fpr)
            if calibration.target_fpr is not None and labels.any() and (~labels).any() else None,
            "calibration_warning": calibration.warning,
        }
    metrics["roc"] = roc_points(prediction.scores, labels) if labels.any() and (~labels).any() else None
    return metrics


def evaluate_model(model_dir: str | Path, data: str | Path, out: str | Path | None = None, *,
                   progress: bool = True) -> dict[str, Any]:
    """``detect eval``: metrics.json and roc.png in ``out`` (default MODEL_DIR/eval)."""
    check_output_folder(Path(out) if out is not None else Path(model_dir) / "eval")
    detector = load(model_dir)
    metrics = evaluate_detector(detector, data, progress=progress)
    metrics["model"] = detector.name
    out = Path(out) if out is not None else Path(model_dir) / "eval"
    write_json(out / "metrics.json", metrics)
    if metrics["roc"] is not None:
        _plot_roc({f"{detector.name} (AUROC {metrics['image_auroc']:.3f})": metrics["roc"]}, out / "roc.png")
    return metrics


def _benchmark_one(name: str, data: str, options: dict[str, Any], max_train: int | None) -> dict[str, Any]:
    import os
    import resource

    from detect.data import resolve_images

    try:
        train = resolve_images(data)
        if max_train is not None:
            train = train[:max_train]
        detector = create(name, **options)
        start = time.perf_counter()
        detector.fit(train, progress=False)
        fit_s = time.perf_counter() - start
        metrics = evaluate_detector(detector, data)
    except Exception as exc:  # one model's failure (e.g. hub weights absent offline) must not end the table
        return {"model": name, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    keys = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "predict_images_per_s")
    return {"model": name, "fit_s": fit_s, "peak_rss_mb": peak_mb, "train_images": len(train),
            "load_avg_1min": os.getloadavg()[0], **{k: metrics.get(k) for k in keys}}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if np.isnan(value) else f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def benchmark(names: Sequence[str], data: str | Path, out: str | Path, *, options: dict[str, Any] | None = None,
              model_options: dict[str, dict[str, Any]] | None = None, max_train: int | None = None,
              progress: bool = True, resume: bool = True) -> str:
    """Fit and evaluate each model in its own process (so peak memory is per model); returns a markdown table.

    ``options`` go to every model; ``model_options[name]`` override them for one model (e.g. a CPU epoch
    budget) and are listed in that model's row. Results are written after every model; with ``resume`` a rerun
    with the same data and options skips the models already measured (an interrupted benchmark continues where
    it stopped). A model that fails (for example a foundation model whose hub weights are absent offline) gets
    its error in the table.
    """
    import json
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from tqdm import tqdm

    from detect.registry import get_model_class

    if not names:
        raise InputError("no model names given: pass --models NAME[,NAME...] (see `detect models`).")
    for name in names:  # unknown names and options fail before any work, not as a row after hours of others
        cls = get_model_class(name)
        settings = {**(options or {}), **(model_options or {}).get(name, {})}
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(cls.Config)})
        if unknown:
            raise ConfigError(f"{name}: unknown option(s) {unknown}; valid options: "
                              f"{sorted(f.name for f in dataclasses.fields(cls.Config))}")
        cls.Config(**settings)  # checks the values
    if max_train is not None and max_train < 1:
        raise InputError(f"--max-train {max_train}: must be >= 1 (leave it out to use every training image).")
    if not read_defect_set(data).select(split="test"):  # bad data fails here, not once per model
        raise InputError(f"{data}: no test/ images to evaluate on; benchmark needs a labeled MVTec-layout dataset.")
    out = Path(out)
    check_output_folder(out)
    setup = {"data": str(data), "options": options or {}, "max_train": max_train}
    done: dict[str, dict[str, Any]] = {}
    previous = out / "benchmark.json"
    if resume and previous.is_file():
        try:
            stored = json.loads(previous.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            stored = {}
        if all(stored.get(k) == v for k, v in setup.items()):
            done = {r["model"]: r for r in stored.get("results", []) if "error" not in r
                    and r.get("model_options", {}) == (model_options or {}).get(r["model"], {})}
    context = multiprocessing.get_context("spawn")
    results: list[dict[str, Any]] = []
    for name in tqdm(names, desc="detect benchmark", disable=not progress):
        if name in done:
            results.append(done[name])
        else:
            # A fresh process per model; one killed (e.g. out of memory) becomes an error row, not a hang.
            own = dict((model_options or {}).get(name, {}))
            with ProcessPoolExecutor(1, mp_context=context) as pool:
                try:
                    row = pool.submit(_benchmark_one, name, str(data), {**(options or {}), **own}, max_train).result()
                except BrokenProcessPool:
                    row = {"model": name, "error": "the process died (out of memory or killed)"}
            results.append({**row, "model_options": own} if own else row)
        write_json(out / "benchmark.json", {**setup, "results": results + [
            r for n, r in done.items() if n not in {x["model"] for x in results}]})
    columns = ["model", "image_auroc", "pixel_auroc", "aupro", "image_f1_max", "fit_s", "predict_images_per_s",
               "peak_rss_mb", "train_images", "load_avg_1min", "options"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | not run: {r['error'].replace('|', '/')} |" + " |" * (len(columns) - 2))
        else:
            own = ", ".join(f"{k}={v}" for k, v in r.get("model_options", {}).items()) or "defaults"
            lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns[:-1]) + f" | {own} |")
    table = "\n".join(lines)
    write_json(out / "benchmark.json", {**setup, "results": results})
    write_text(out / "benchmark.md", table + "\n")
    return table
