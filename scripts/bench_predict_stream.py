"""Load check for ``detect predict``: memory stays bounded and throughput steady over thousands of images.

    python scripts/bench_predict_stream.py                   # 2,000 images (and a 500-image peer run)
    python scripts/bench_predict_stream.py --n 5000 --model patchcore

Writes ``--n`` real-texture crops (skimage brick / grass / gravel, JPEG, ``--disk-size`` px) to a cached folder, fits
``--model`` on 20 of them, then runs the real CLI ``detect predict MODEL_DIR FOLDER --out OUT`` (overlays on, as
users run it) in a subprocess while sampling its resident memory (psutil, every 0.2 s) and counting the overlays
written (progress). The same command on the first ``--peer-n`` images is the peer: if predict streams, its peak RSS
is the same for 500 and for 2,000 images (ratio ~1); a predictor that kept every anomaly map would grow linearly.
Results: OUT/bench_predict_stream.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from quiet_run import LoadWatch  # noqa: E402  (scripts/ is sys.path[0] when this script runs)


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` random crops of three real textures (cached: reused when the folder already has ``n`` images)."""
    from synth.toyset import load_texture

    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    textures = [load_texture(name) for name in ("brick", "grass", "gravel")]
    for i in range(n):
        texture = textures[i % 3]
        y, x = (int(rng.integers(0, texture.shape[d] - size)) for d in (0, 1))
        crop = np.ascontiguousarray(texture[y:y + size, x:x + size, ::-1])
        cv2.imwrite(str(folder / f"img_{i:05d}.jpg"), crop, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return folder


def monitored_predict(model_dir: Path, images: Path, out: Path, batch_size: int) -> dict:
    """Run ``detect predict`` in a subprocess; sample its RSS and overlay count until it exits."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "detect.cli", "predict", "-q", "--model-dir", str(model_dir), str(images),
               "--out", str(out), "--batch-size", str(batch_size)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    handle = psutil.Process(process.pid)
    samples: list[tuple[float, float, int]] = []  # (seconds, RSS MiB, overlays written)
    overlays = out / "overlays"
    while process.poll() is None:
        try:
            rss = handle.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            break
        done = sum(1 for _ in os.scandir(overlays)) if overlays.is_dir() else 0
        samples.append((time.perf_counter() - started, rss, done))
        time.sleep(0.2)
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"detect predict failed ({process.returncode}):\n{stderr.decode()[-2000:]}")
    n = sum(1 for _ in os.scandir(overlays))
    return {"wall_s": round(wall, 2), "images": n, "samples": samples, "stdout": stdout.decode().strip()}


def summarize(run: dict, n: int) -> dict:
    """Peak RSS, RSS at progress quartiles, and images/s per tenth of the run (after start-up)."""
    samples = run["samples"]
    peak = max(rss for _, rss, _ in samples)
    by_progress = {}
    for fraction in (0.1, 0.25, 0.5, 0.75, 1.0):
        after = [rss for _, rss, done in samples if done >= fraction * n]
        by_progress[f"{int(fraction * 100)}%"] = round(after[0], 1) if after else None
    # Throughput per 10 % of the images, from the first overlay on (start-up and model load excluded).
    rates = []
    for k in range(10):
        lo, hi = k * n / 10, (k + 1) * n / 10
        t0 = next((t for t, _, done in samples if done >= max(lo, 1)), None)
        t1 = next((t for t, _, done in samples if done >= hi), None)
        if t0 is not None and t1 is not None and t1 > t0:
            rates.append((hi - max(lo, 1)) / (t1 - t0))
    first = next(t for t, _, done in samples if done >= 1) if any(d >= 1 for *_, d in samples) else 0.0
    return {
        "images": run["images"], "wall_s": run["wall_s"], "startup_s": round(first, 2),
        "images_per_s": round(run["images"] / max(run["wall_s"] - first, 1e-9), 1),
        "peak_rss_mib": round(peak, 1), "rss_mib_at_progress": by_progress,
        "rss_growth_10_to_100_mib": (round(by_progress["100%"] - by_progress["10%"], 1)
                                     if by_progress["100%"] is not None and by_progress["10%"] is not None else None),
        "images_per_s_by_tenth": [round(r, 1) for r in rates],
        "throughput_cv": round(float(np.std(rates) / np.mean(rates)), 3) if len(rates) >= 3 else None,
    }


def measure(args: argparse.Namespace, images: Path, peer_images: Path, work: Path) -> dict:
    """Fit the model on 20 images, then the peer and the main predict runs; the work folder is removed."""
    from detect.runner import fit_model

    try:
        train = work / "train"
        train.mkdir()
        for path in sorted(images.glob("*.jpg"))[:20]:
            shutil.copy(path, train / path.name)
        model_dir = work / "model"
        fit_model(args.model, train, model_dir, options={"image_size": args.image_size}, progress=False)
        runs = {}
        for label, folder, n in (("peer", peer_images, args.peer_n), ("main", images, args.n)):
            print(f"detect predict over {n} images ...", flush=True)
            runs[label] = summarize(monitored_predict(model_dir, folder, work / f"out_{label}", args.batch_size), n)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--peer-n", type=int, default=500)
    parser.add_argument("--disk-size", type=int, default=256, help="side of the images on disk (px)")
    parser.add_argument("--model", default="padim")
    parser.add_argument("--image-size", type=int, default=128, help="model input size")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "pixelvision_stream_images")
    parser.add_argument("--out", type=Path, default=REPO / "scripts" / "results")
    args = parser.parse_args()

    images = make_images(args.cache / f"{args.n}_{args.disk_size}", args.n, args.disk_size)
    peer_images = args.cache / f"{args.peer_n}_{args.disk_size}_peer"
    if not peer_images.is_dir() or len(list(peer_images.glob("*.jpg"))) != args.peer_n:
        shutil.rmtree(peer_images, ignore_errors=True)
        peer_images.mkdir(parents=True)
        for path in sorted(images.glob("*.jpg"))[:args.peer_n]:
            shutil.copy(path, peer_images / path.name)
    work = Path(tempfile.mkdtemp(prefix="pixelvision_stream_"))
    with LoadWatch() as watch:
        runs = measure(args, images, peer_images, work)
    main_run, peer = runs["main"], runs["peer"]
    result = {
        "command": "python scripts/bench_predict_stream.py " + " ".join(sys.argv[1:]),
        "model": args.model, "image_size": args.image_size, "disk_size": args.disk_size,
        "batch_size": args.batch_size, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "load": watch.record(),
        "peak_rss_ratio_main_over_peer": round(main_run["peak_rss_mib"] / peer["peak_rss_mib"], 3),
        "images_ratio_main_over_peer": round(args.n / args.peer_n, 2),
        "main": main_run, "peer": peer,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_predict_stream.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    lines = [
        f"# `detect predict` load check: {args.n} images vs {args.peer_n} (peer), {args.model} at {args.image_size} px",
        "",
        watch.status_line(),
        "",
        f"`{result['command']}` on {os.cpu_count()} CPU cores; images "
        f"{args.disk_size}x{args.disk_size} JPEG, overlays written, batch {args.batch_size}.",
        "",
        "| run | images | wall s | start-up s | images/s | peak RSS MiB | RSS growth 10%->100% MiB | throughput CV |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label in ("peer", "main"):
        r = runs[label]
        lines.append(f"| {label} | {r['images']} | {r['wall_s']} | {r['startup_s']} | {r['images_per_s']} | "
                     f"{r['peak_rss_mib']} | {r['rss_growth_10_to_100_mib']} | {r['throughput_cv']} |")
    lines += ["", f"Peak RSS ratio {args.n} / {args.peer_n} images: {result['peak_rss_ratio_main_over_peer']} "
              f"(for {result['images_ratio_main_over_peer']}x the images). Images/s per tenth of the "
              f"{args.n}-image run: {main_run['images_per_s_by_tenth']}."]
    (args.out / "bench_predict_stream.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
