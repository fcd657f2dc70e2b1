"""Fit and evaluate every registered detector on one dataset; one table of metrics, fit time, images/s, memory.

    python scripts/bench_detectors.py                          # ../shared/data/magnetic-tile, 100 train images
    python scripts/bench_detectors.py --data DIR --models patchcore,padim --image-size 256 --max-train 200

Each model runs in its own process (peak RSS is per model). Results: scripts/results/bench_detectors.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

from detect.registry import list_models
from detect.runner import benchmark

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "magnetic-tile")
    parser.add_argument("--models", default=None, help="comma-separated names (default: every registered model)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--max-train", type=int, default=100)
    parser.add_argument("--out", type=Path, default=REPO / "scripts" / "results" / "bench_detectors")
    args = parser.parse_args()
    names = [n for n in args.models.split(",")] if args.models else list_models()
    table = benchmark(names, args.data, args.out, options={"image_size": args.image_size},
                      max_train=args.max_train)
    header = (f"Data: {args.data.name}, {args.max_train} train images, image_size {args.image_size}; "
              f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}\n\n")
    (args.out / "bench_detectors.md").write_text(header + table + "\n")
    print(header + table)


if __name__ == "__main__":
    main()
