"""Generation speed: in memory, end to end through ``synth generate`` (CLI, all cores), and the I/O floor.

Run on a quiet machine (Anomalib is not a project dependency; give it a venv that sees the project):

    python -m venv --system-site-packages /tmp/anomalib-venv && /tmp/anomalib-venv/bin/pip install anomalib
    /tmp/anomalib-venv/bin/python scripts/bench_synth.py      # writes scripts/results/bench_synth.{json,md}

Two image kinds: 256x256 RGB (scikit-image's coffee photo) and 500x1250 grayscale (a KolektorSDD normal when
``../shared/data/kolektorsdd`` is there, else scikit-image gravel). For each kind and generator:

- **in memory**: one process calling the generator on one image (no disk);
- **end to end**: ``python -m synth.cli generate --method M --n N`` on a folder of normals of that kind, with the
  default workers (all cores) and writer settings, wall time of the whole command (start-up included);
- **I/O floor**: the least any generator could cost, on all cores with the same worker pool: read one normal,
  write one image and one mask with the project's writer (``synth.core.io.write_image``) at its default settings.

``end to end / floor`` is the share of the disk's speed that generation reaches. Beside it, our ``perlin`` against
Anomalib's ``PerlinAnomalyGenerator`` (probability 1) in memory and with the same PNG writer, one process each.
Every number is the median of ``--repeats`` (default 3) with min and max. The quiet-machine rule of
``scripts/quiet_run.py`` marks the run (LOADED results are not for publication).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from quiet_run import LoadWatch  # noqa: E402  (scripts/ is sys.path[0] when this script runs)

from synth.core.io import list_images, read_image, write_image, write_json, write_text  # noqa: E402
from synth.parallel import default_workers, ordered_map  # noqa: E402

KOLEKTOR = REPO.parent / "shared" / "data" / "kolektorsdd" / "train" / "good"
DEMO = REPO / "assets" / "demo"
METHODS = ("perlin", "draem", "cutpaste", "paste")
NORMALS_PER_KIND = 16


def base_image(kind: str) -> np.ndarray:
    from skimage import data

    if kind == "rgb256":
        return cv2.resize(data.coffee(), (256, 256), interpolation=cv2.INTER_AREA)
    if KOLEKTOR.is_dir():
        return read_image(list_images(KOLEKTOR)[0], mode="L")
    return cv2.resize(data.gravel(), (500, 1250), interpolation=cv2.INTER_LINEAR)


def write_variants(kind: str, folder: Path, n: int, *, shift: int, stem: str, digits: int) -> list[Path]:
    """``n`` distinct images of the kind (flips and shifts by ``shift * i`` px of the base image), in its mode, as
    ``folder/<stem>_<i, zero-padded to digits>.png``."""
    image = base_image(kind)
    paths = []
    for i in range(n):
        variant = np.roll(image[:, ::-1] if i % 2 else image, shift=shift * i, axis=1)
        paths.append(folder / f"{stem}_{i:0{digits}d}.png")
        write_image(paths[-1], np.ascontiguousarray(variant))
    return paths


def write_normals(kind: str, folder: Path) -> list[Path]:
    """NORMALS_PER_KIND distinct normals of the kind, the inputs of the end-to-end runs."""
    return write_variants(kind, folder, NORMALS_PER_KIND, shift=7, stem="normal", digits=2)


def in_memory_generator(method: str) -> Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]:
    from synth.config import GenerateConfig
    from synth.generate import build_generator

    cfg = GenerateConfig(normal=DEMO / "normal", out=Path("unused"), method=method, **paste_settings(method))
    generator = build_generator(cfg)

    def run(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        result = generator(image, rng)
        return result.image, result.mask

    return run


def paste_settings(method: str) -> dict:
    return {"masks": DEMO / "masks", "defects": DEMO / "defects", "blend": "texture"} if method == "paste" else {}


def anomalib_perlin() -> tuple[Callable | None, str]:
    try:
        import anomalib
        import torch
        from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return None, f"not available ({type(exc).__name__}: {exc})"
    generator = PerlinAnomalyGenerator(probability=1.0)

    def run(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        tensor = torch.from_numpy(image).permute(2, 0, 1).float().div_(255)
        augmented, mask = generator(tensor)
        out = (augmented.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return out, mask[0].numpy() > 0.5

    return run, f"anomalib {anomalib.__version__}"


def rate_in_memory(generate: Callable, image: np.ndarray, n: int, write_dir: Path | None = None) -> float:
    """Images/s of one process calling ``generate`` (and writing image + mask when ``write_dir`` is given)."""
    rng = np.random.default_rng(0)
    generate(image, rng)  # warm-up: caches, lazy imports
    start = time.perf_counter()
    for index in range(n):
        out, mask = generate(image, rng)
        if write_dir is not None:
            write_image(write_dir / f"{index:05d}.png", out)
            write_image(write_dir / f"{index:05d}_mask.png", mask)
    return n / (time.perf_counter() - start)


def rate_floor(normals: list[Path], n: int, out: Path) -> float:
    """Images/s of read normal + write image + write mask on all cores, in a fresh process (the worker pool synth
    generate uses: ``ordered_map`` runs in-process once torch is imported, as it is here by the peer)."""
    command = [sys.executable, __file__, "--floor-only", str(n), str(out), *map(str, normals)]
    result = subprocess.run(command, check=True, cwd=REPO, capture_output=True, text=True)
    return float(result.stdout.strip().splitlines()[-1])


def measure_floor(normals: list[Path], n: int, out: Path) -> float:
    """The floor itself (run by :func:`rate_floor` in a process without torch)."""
    assert "torch" not in sys.modules, "the floor must run where ordered_map forks its workers"
    shape = read_image(normals[0]).shape[:2]
    mask = np.zeros(shape, bool)
    mask[shape[0] // 3: shape[0] // 2, shape[1] // 3: shape[1] // 2] = True

    def copy(index: int) -> int:
        image = read_image(normals[index % len(normals)])
        write_image(out / f"{index:05d}.png", image[..., 0] if np.array_equal(image[..., 0], image[..., 2])
                    else image)  # what synth generate writes: grayscale stays one channel
        write_image(out / f"{index:05d}_mask.png", mask)
        return index

    start = time.perf_counter()
    for _ in ordered_map(copy, range(n), default_workers()):
        pass
    return n / (time.perf_counter() - start)


def rate_end_to_end(method: str, normal_dir: Path, n: int, out: Path) -> float:
    """Images/s of the whole ``synth generate`` command (process start-up, writes, report included)."""
    command = [sys.executable, "-m", "synth.cli", "generate", "-q", "--normal", str(normal_dir), "--method", method,
               "--n", str(n), "--out", str(out), "--no-copy-normals"]
    for key, value in paste_settings(method).items():
        command += [f"--{key}", str(value)]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return n / (time.perf_counter() - start)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def repeat(measure: Callable[[], float], repeats: int) -> dict[str, float]:
    return summary([measure() for _ in range(repeats)])


def fmt(stat: dict[str, float]) -> str:
    return f"{stat['median']:.1f} ({stat['min']:.1f}-{stat['max']:.1f})"


def bench_kind(kind: str, n: int, args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Floor, then in memory and end to end for every method, on one image kind."""
    normal_dir = tmp / "normal"
    normals = write_normals(kind, normal_dir)
    image = read_image(normals[0])
    runs = iter(range(10**6))  # a fresh output folder per measurement
    floor = repeat(lambda: rate_floor(normals, n, tmp / f"floor{next(runs)}"), args.repeats)
    print(f"{kind}: I/O floor {fmt(floor)} img/s on {default_workers()} cores", flush=True)
    rows = []
    for method in args.methods:
        memory = repeat(lambda: rate_in_memory(in_memory_generator(method), image, args.n_memory),  # noqa: B023
                        args.repeats)
        end_to_end = repeat(lambda: rate_end_to_end(method, normal_dir, n, tmp / f"{method}{next(runs)}"),  # noqa: B023
                            args.repeats)
        ratio = end_to_end["median"] / floor["median"]
        rows.append({"kind": kind, "method": method, "n": n, "memory_img_s": memory, "end_to_end_img_s": end_to_end,
                     "floor_img_s": floor, "end_to_end_over_floor": ratio})
        print(f"{kind}: {method:9s} memory {fmt(memory)}  end to end {fmt(end_to_end)}  floor {floor['median']:.1f}"
              f"  ratio {ratio:.2f}", flush=True)
    return rows


def bench_vs_anomalib(peer: Callable | None, repeats: int, tmp: Path) -> list[dict]:
    """Our perlin and Anomalib's (when importable), 256 px RGB, one process each, in memory and with PNG."""
    image = base_image("rgb256")
    arms = {"perlin": in_memory_generator("perlin"), **({"anomalib PerlinAnomalyGenerator": peer} if peer else {})}
    runs = iter(range(10**6))
    rows = []
    for name, generate in arms.items():
        memory = repeat(lambda: rate_in_memory(generate, image, 60), repeats)  # noqa: B023
        png = repeat(lambda: rate_in_memory(generate, image, 60, tmp / f"png{next(runs)}"), repeats)  # noqa: B023
        rows.append({"generator": name, "memory_img_s": memory, "png_img_s": png})
        print(f"rgb256: {name} memory {fmt(memory)}  with PNG (one process) {fmt(png)}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-rgb256", type=int, default=1500, help="samples per end-to-end run at 256 px RGB")
    parser.add_argument("--n-gray", type=int, default=300, help="samples per end-to-end run at 500x1250 gray")
    parser.add_argument("--n-memory", type=int, default=100)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, default=REPO / "scripts" / "results" / "bench_synth")
    parser.add_argument("--floor-only", nargs="+", help=argparse.SUPPRESS)  # N OUT NORMAL...: one floor, printed
    args = parser.parse_args()
    if args.floor_only:
        n, out, *normals = args.floor_only
        print(measure_floor([Path(p) for p in normals], int(n), Path(out)))
        return

    rows, peer_rows = [], []
    peer, peer_name = anomalib_perlin()
    with LoadWatch(cores=default_workers()) as watch, tempfile.TemporaryDirectory() as tmp_dir:
        for kind, n in (("rgb256", args.n_rgb256), ("gray500x1250", args.n_gray)):
            rows += bench_kind(kind, n, args, Path(tmp_dir) / kind)
        peer_rows = bench_vs_anomalib(peer, args.repeats, Path(tmp_dir) / "peer")
    ratios = {}
    if len(peer_rows) == 2:
        ratios = {key: peer_rows[0][key]["median"] / peer_rows[1][key]["median"]
                  for key in ("memory_img_s", "png_img_s")}
    meta = {**watch.record(), "repeats": args.repeats, "peer": peer_name, "python": platform.python_version(),
            "command": " ".join([Path(sys.executable).name, *sys.argv])}
    write_json(args.out.with_suffix(".json"), {"meta": meta, "results": rows, "vs_anomalib": peer_rows,
                                              "perlin_over_anomalib": ratios})
    lines = [watch.status_line() + f" Median of {args.repeats} (min-max); peer: {peer_name}.", "",
             "| image | method | in memory img/s (1 process) | end to end img/s (synth generate, all cores) | "
             "I/O floor img/s | end to end / floor |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['method']} | {fmt(r['memory_img_s'])} | {fmt(r['end_to_end_img_s'])} | "
              f"{fmt(r['floor_img_s'])} | {r['end_to_end_over_floor']:.2f} |" for r in rows]
    if peer_rows:
        lines += ["", "256 px RGB, one process each, same PNG writer:", "",
                  "| generator | in memory img/s | with PNG img/s |", "|---|---|---|"]
        lines += [f"| {r['generator']} | {fmt(r['memory_img_s'])} | {fmt(r['png_img_s'])} |" for r in peer_rows]
    if ratios:
        lines += ["", f"perlin / Anomalib: {ratios['memory_img_s']:.1f}x in memory, {ratios['png_img_s']:.1f}x with "
                  f"PNG writing."]
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')} ({'quiet' if watch.quiet else 'LOADED'})")


if __name__ == "__main__":
    main()
