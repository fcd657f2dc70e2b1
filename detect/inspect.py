"""``detect inspect``: a saved anomaly detector and a saved defect classifier on the same images.

Every image gets the detector's anomaly score and decision (its calibrated threshold, see detect/calibration.py)
and a heat-map overlay; images judged defective also get the classifier's defect class and probability. Output::

    OUT/inspection.csv     image, score, anomalous, defect_class, class_probability, top classes, overlay, error
    OUT/overlays/NNNNN_<name>.png   image | heat map with the predicted defect region
    OUT/gallery.html       self-contained page (inline thumbnails), one section per predicted class

Images are read and scored batch by batch (memory stays bounded); an unreadable image gets an ``error`` row and
the rest go on. ``inspection.csv`` and ``gallery.html`` are written atomically at the end. A detector without a
threshold (fitted with ``calibrate=False``) is refused: there is no decision to inspect.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from detect.classify.classifier import DefectClassifier
from detect.registry import load
from detect.runner import check_output_folder, prediction_overlay, read_batch
from synth.core.errors import InputError
from synth.core.io import iter_paths, write_image, write_text

logger = logging.getLogger(__name__)

FIELDS = ["image", "score", "anomalous", "defect_class", "class_probability", "top_classes", "overlay", "error"]
GOOD_GROUP = "good (not defective)"
THUMB_WIDTH = 360
GALLERY_LIMIT = 60  # thumbnails per class section; the CSV lists every image


def _thumbnail(overlay: np.ndarray) -> str:
    scale = THUMB_WIDTH / overlay.shape[1]
    small = cv2.resize(overlay, (THUMB_WIDTH, max(1, round(overlay.shape[0] * scale))), interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(small[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 image
        raise RuntimeError("could not encode a thumbnail")
    return "data:image/jpeg;base64," + base64.b64encode(data.tobytes()).decode("ascii")


def _gallery(rows: list[dict[str, str]], thumbs: dict[int, str], title: str) -> str:
    groups: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        if row["error"]:
            key = "unreadable"
        elif row["anomalous"] == "1":
            key = row["defect_class"] or "defective (no class)"
        else:
            key = GOOD_GROUP
        groups.setdefault(key, []).append(index)
    order = sorted(groups, key=lambda k: (k == GOOD_GROUP, k == "unreadable", k))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;margin:1.5em}figure{display:inline-block;margin:6px;width:"
             f"{THUMB_WIDTH}px;vertical-align:top}}figcaption{{font-size:12px;word-break:break-all}}"
             "img{width:100%}</style></head><body>", f"<h1>{html.escape(title)}</h1><ul>"]
    parts += [f"<li><a href='#g{i}'>{html.escape(k)}</a>: {len(groups[k])}</li>" for i, k in enumerate(order)]
    parts.append("</ul>")
    for i, key in enumerate(order):
        members = groups[key]
        parts.append(f"<h2 id='g{i}'>{html.escape(key)} ({len(members)})</h2>")
        if len(members) > GALLERY_LIMIT:
            parts.append(f"<p>Showing the {GALLERY_LIMIT} highest anomaly scores; inspection.csv lists all.</p>")
            members = sorted(members, key=lambda j: -float(rows[j]["score"] or 0))[:GALLERY_LIMIT]
        for j in members:
            row = rows[j]
            caption = html.escape(Path(row["image"]).name)
            if row["error"]:
                parts.append(f"<figure><figcaption>{caption}: {html.escape(row['error'])}</figcaption></figure>")
                continue
            detail = f"score {row['score']}"
            if row["defect_class"]:
                detail += f", {html.escape(row['defect_class'])} {row['class_probability']}"
            image = f"<img src='{thumbs[j]}' alt='{caption}'>" if j in thumbs else ""
            parts.append(f"<figure>{image}<figcaption>{caption}: {detail}</figcaption></figure>")
    parts.append("</body></html>")
    return "".join(parts)


def inspect_images(detector_dir: str | Path, classifier_dir: str | Path, inputs: Sequence[str | Path],
                   out: str | Path, *, batch_size: int = 16, overlays: bool = True, top_k: int = 3,
                   progress: bool = True) -> Path:
    """Run detector + classifier over ``inputs``; writes the files listed in the module docstring."""
    from tqdm import tqdm

    if batch_size < 1 or top_k < 1:
        raise InputError(f"--batch-size {batch_size} / --top-k {top_k}: both must be >= 1.")
    out = Path(out)
    check_output_folder(out)
    detector = load(detector_dir)
    if detector.calibration is None:
        raise InputError(f"{detector_dir}: the detector has no threshold (fitted without calibration); fit it with "
                         f"`detect fit` so it can decide which images are defective.")
    classifier = DefectClassifier.load(classifier_dir)
    paths = iter_paths(inputs)
    if not paths:
        raise InputError("no images to inspect: pass image files or folders.")
    rows: list[dict[str, str]] = []
    thumbs: dict[int, str] = {}
    with tqdm(total=len(paths), desc="inspect", unit="img", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = list(range(start, min(start + batch_size, len(paths))))
            images, kept, failed = read_batch(paths, chunk)
            batch_rows = {i: {**dict.fromkeys(FIELDS, ""), "image": str(paths[i]), "error": error}
                          for i, error in failed.items()}
            if images:
                found = detector.predict(images)
                defective = [n for n, flag in enumerate(found.labels) if flag]
                classes = classifier.predict([images[n] for n in defective]).top_k(top_k) if defective else []
                by_image = dict(zip(defective, classes, strict=True))
                for n, i in enumerate(kept):
                    ranked = by_image.get(n)
                    name = f"{i:05d}_{paths[i].stem}.png"
                    batch_rows[i] = {
                        "image": str(paths[i]), "score": f"{float(found.scores[n]):.6g}",
                        "anomalous": str(int(found.labels[n])),
                        "defect_class": ranked[0][0] if ranked else "",
                        "class_probability": f"{ranked[0][1]:.4f}" if ranked else "",
                        "top_classes": " ".join(f"{c}:{p:.4f}" for c, p in ranked) if ranked else "",
                        "overlay": f"overlays/{name}" if overlays else "", "error": ""}
                    if overlays:
                        picture = prediction_overlay(images[n], found.anomaly_maps[n], detector.calibration,
                                                     with_mask=found.masks is not None)
                        write_image(out / "overlays" / name, picture)
                        thumbs[i] = _thumbnail(picture)
            rows += [batch_rows[i] for i in chunk]
            bar.update(len(chunk))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "inspection.csv", buffer.getvalue())
    title = f"Inspection: {detector.name} + defect classifier ({', '.join(classifier.classes)})"
    write_text(out / "gallery.html", _gallery(rows, thumbs, title))
    flagged = sum(1 for r in rows if r["anomalous"] == "1")
    errors = sum(1 for r in rows if r["error"])
    print(f"inspected {len(rows) - errors} images: {flagged} defective ({detector.calibration.describe()}) -> "
          f"{out / 'inspection.csv'}, {out / 'gallery.html'}"
          + (f"; {errors} unreadable, see the error column" if errors else ""))
    return out / "inspection.csv"
