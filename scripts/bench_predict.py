"""Prediction speed: ``detect predict`` end to end (CLI, overlays on) against its own floor.

    python scripts/bench_predict.py                    # writes scripts/results/bench_predict.{json,md}
    python scripts/bench_predict.py --models padim patchcore --n 300 --repeats 3

Two image kinds, as in ``bench_synth.py``: 256x256 RGB (scikit-image's coffee photo) and 500x1250 grayscale (a
KolektorSDD normal when ``../shared/data/kolektorsdd`` is there, else scikit-image gravel), ``--n`` distinct
variants of each (flips and shifts) on disk as PNG. Each model is fitted once per kind on 16 of them at
``--image-size``, then:

- **floor**: one process, all torch threads, the model's batch size: decode every image (``synth.core.io.read_image``),
  resize and run the model's forward (``Detector.predict``), nothing written. No predictor can be faster than
  reading, resizing and scoring its images;
- **end to end**: ``python -m detect.cli predict --model-dir M FOLDER --out OUT`` as a user runs it (overlays and
  ``scores.csv`` written, the next batch decoded on a background thread), wall time of the whole command,
  start-up and model load included.

``end to end / floor`` is the share of the model's own speed that the command delivers. Median of ``--repeats``
(default 3) with min and max; the quiet-machine rule of ``scripts/quiet_run.py`` marks the run.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_synth import fmt, repeat, write_variants  # noqa: E402  (scripts/ is sys.path[0] when this script runs)
from quiet_run import LoadWatch  # noqa: E402

from synth.core.io import read_image, write_json, write_text  # noqa: E402

KINDS = ("rgb256", "gray500x1250")


def write_images(kind: str, folder: Path, n: int) -> list[Path]:
    """``n`` distinct images of the kind (bench_synth's variants, 3 px shifts), as PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    return write_variants(kind, folder, n, shift=3, stem="image", digits=5)


def rate_floor(model_dir: Path, paths: list[Path], batch_size: int) -> float:
    """Images/s of decode + resize + forward, one process, the model's batch size."""
    from detect.registry import load

    detector = load(model_dir)
    detector.predict([read_image(paths[0])])  # warm-up: lazy imports, allocator
    start = time.perf_counter()
    for first in range(0, len(paths), batch_size):
        detector.predict([read_image(path) for path in paths[first:first + batch_size]])
    return len(paths) / (time.perf_counter() - start)


def rate_end_to_end(model_dir: Path, folder: Path, n: int, out: Path) -> float:
    """Images/s of the whole ``detect predict`` command (start-up, model load, overlays, scores.csv)."""
    command = [sys.executable, "-m", "detect.cli", "predict", "-q", "--model-dir", str(model_dir), str(folder),
               "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return n / (time.perf_counter() - start)


def bench_kind(kind: str, args: argparse.Namespace, tmp: Path) -> list[dict]:
    from detect.registry import create
    from detect.runner import fit_model

    folder = tmp / kind / "images"
    paths = write_images(kind, folder, args.n)
    train = tmp / kind / "train"
    write_images(kind, train / "train" / "good", 16)
    rows = []
    runs = iter(range(10**6))
    for model in args.models:
        model_dir = tmp / kind / model
        fit_model(model, train, model_dir, options={"image_size": args.image_size}, progress=False)
        batch_size = create(model, image_size=args.image_size).config.batch_size
        floor = repeat(lambda: rate_floor(model_dir, paths, batch_size), args.repeats)  # noqa: B023
        end_to_end = repeat(lambda: rate_end_to_end(model_dir, folder, args.n,  # noqa: B023
                                                    tmp / kind / f"out{next(runs)}"), args.repeats)
        ratio = end_to_end["median"] / floor["median"]
        rows.append({"kind": kind, "model": model, "n": args.n, "image_size": args.image_size,
                     "batch_size": batch_size, "floor_img_s": floor, "end_to_end_img_s": end_to_end,
                     "end_to_end_over_floor": ratio})
        print(f"{kind}: {model:10s} floor {fmt(floor)}  end to end {fmt(end_to_end)}  ratio {ratio:.2f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["padim", "patchcore"])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--n", type=int, default=300, help="images per predict run")
    parser.add_argument("--image-size", type=int, default=256, help="model input size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "scripts" / "results" / "bench_predict")
    args = parser.parse_args()

    rows: list[dict] = []
    with LoadWatch() as watch, tempfile.TemporaryDirectory() as tmp_dir:
        for kind in args.kinds:
            rows += bench_kind(kind, args, Path(tmp_dir))
    meta = {**watch.record(), "repeats": args.repeats, "python": platform.python_version(),
            "command": " ".join([Path(sys.executable).name, *sys.argv])}
    write_json(args.out.with_suffix(".json"), {"meta": meta, "results": rows})
    lines = [watch.status_line() + f" Median of {args.repeats} (min-max).", "",
             "| image | model | input px | batch | floor img/s (decode + resize + forward) | "
             "end to end img/s (detect predict, overlays) | end to end / floor |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['model']} | {r['image_size']} | {r['batch_size']} | {fmt(r['floor_img_s'])} | "
              f"{fmt(r['end_to_end_img_s'])} | {r['end_to_end_over_floor']:.2f} |" for r in rows]
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
