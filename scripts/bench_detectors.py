"""Fit and evaluate every registered detector on one dataset; one table of metrics, fit time, images/s, memory.

    python scripts/bench_detectors.py                          # ../shared/data/magnetic-tile, defaults below
    python scripts/bench_detectors.py --data DIR --models patchcore,padim --image-size 256 --max-train 200 \\
        --test-good 0 --test-per-class 0                       # 0: the whole test split

Each model runs in its own process (peak RSS is per model) with its default options at ``--image-size``, except
the epoch budgets in ``CPU_BUDGETS`` for trainers sized for a GPU (``--full-epochs`` drops them).
``--test-good`` / ``--test-per-class`` evaluate on a fixed, seeded subset of the test split (copied with its
masks into OUT/data) so that a table of every model finishes in reasonable time on a 2-core CPU.
Results: OUT/bench_detectors.md and OUT/benchmark.json (written after every model; a rerun resumes).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
from pathlib import Path

import numpy as np
from quiet_run import LoadWatch  # scripts/ is sys.path[0] when this script runs

from detect.registry import list_models
from detect.runner import benchmark
from synth.core.defect_set import GOOD

REPO = Path(__file__).resolve().parent.parent


def subset_dataset(source: Path, target: Path, *, max_train: int, test_good: int, test_per_class: int,
                   seed: int = 0) -> Path:
    """Copy train/good[:max_train] and a seeded test subset (with ground_truth masks) of an MVTec folder."""
    if (target / ".complete").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    rng = np.random.default_rng(seed)
    train = sorted((source / "train" / GOOD).iterdir())[:max_train]
    (target / "train" / GOOD).mkdir(parents=True)
    for path in train:
        shutil.copy2(path, target / "train" / GOOD / path.name)
    for class_dir in sorted(p for p in (source / "test").iterdir() if p.is_dir()):
        files = sorted(class_dir.iterdir())
        n = test_good if class_dir.name == GOOD else test_per_class
        chosen = [files[i] for i in sorted(rng.permutation(len(files))[:n])] if n else files
        (target / "test" / class_dir.name).mkdir(parents=True)
        for path in chosen:
            shutil.copy2(path, target / "test" / class_dir.name / path.name)
            mask = source / "ground_truth" / class_dir.name / f"{path.stem}_mask.png"
            if class_dir.name != GOOD and mask.exists():
                (target / "ground_truth" / class_dir.name).mkdir(parents=True, exist_ok=True)
                shutil.copy2(mask, target / "ground_truth" / class_dir.name / mask.name)
    (target / ".complete").touch()
    return target


# Epoch budgets for the trainers whose defaults (100 epochs and more, sized for a GPU) would take 20-60 min each
# on 2 CPU cores at 100 images x 128 px; every other model runs with its defaults. Listed in each row.
CPU_BUDGETS: dict[str, dict[str, int]] = {
    "draem": {"epochs": 20},
    "dsr": {"vq_epochs": 20, "epochs": 15, "upsampling_epochs": 8},
    "supersimplenet": {"epochs": 30},
    "uninet": {"epochs": 30},
    "reverse_distillation": {"epochs": 30},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "magnetic-tile")
    parser.add_argument("--models", default=None, help="comma-separated names (default: every registered model)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--max-train", type=int, default=100)
    parser.add_argument("--test-good", type=int, default=40, help="normal test images (0: all)")
    parser.add_argument("--test-per-class", type=int, default=8, help="defect test images per class (0: all)")
    parser.add_argument("--full-epochs", action="store_true", help="no CPU epoch budgets: every model's defaults")
    parser.add_argument("--out", type=Path, default=REPO / "scripts" / "results" / "bench_detectors")
    args = parser.parse_args()
    names = [n for n in args.models.split(",")] if args.models else list_models()
    data = args.data
    if args.test_good or args.test_per_class:
        data = subset_dataset(args.data, Path("/tmp") / f"pixelvision_bench_{args.data.name}_{args.max_train}_"
                              f"{args.test_good}_{args.test_per_class}", max_train=args.max_train,
                              test_good=args.test_good, test_per_class=args.test_per_class)
    budgets = {} if args.full_epochs else CPU_BUDGETS
    with LoadWatch() as watch:
        table = benchmark(names, data, args.out, options={"image_size": args.image_size}, model_options=budgets,
                          max_train=args.max_train)
    n_test = sum(1 for _ in (data / "test").rglob("*.*"))
    header = (f"Data: {args.data.name} ({args.max_train} train/good images, {n_test} test images: "
              f"{args.test_good or 'all'} good + {args.test_per_class or 'all'} per defect class, seed 0), "
              f"image_size {args.image_size}, each model's default options except the CPU epoch budgets in the last "
              f"column (`--full-epochs` drops them); {os.cpu_count()} CPUs, "
              f"{platform.processor() or platform.machine()}. Fit includes threshold calibration on 20 % held-out "
              f"normals + synthetic anomalies.\n\n{watch.status_line()} Rows resumed from earlier runs carry "
              f"their own load column: a row above {watch.cores + 1} ran beside other work, and its fit s and "
              f"predict img/s are not for publication.\n\n")
    (args.out / "bench_detectors.md").write_text(header + table + "\n")
    print(header + table)


if __name__ == "__main__":
    main()
