"""Copying a built feature extractor vs building one, and what it does to a small fit (one process, one thread).

``synth.core.backbones.create_feature_extractor`` builds a pretrained extractor once per process and weights-file
version and copies it after that. Peers in the same run: the same calls with the template cache switched off
(every call builds, as before the cache). Arms alternate within each repeat; median / min / max of the repeats;
the load is watched (scripts/quiet_run.py) and the result marked quiet or LOADED. Run on a quiet machine:

    HF_HUB_OFFLINE=1 python scripts/bench_feature_extractor.py [--repeats 5]

Writes scripts/results/feature_extractor_copy.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import detect  # noqa: E402
from synth.core import backbones  # noqa: E402
from synth.toyset import make_texture_defect_set  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
from quiet_run import LoadWatch  # noqa: E402

RESULTS = REPO / "scripts" / "results"


class _NeverKeeps(dict):
    """A template cache that stores nothing: every create_feature_extractor call builds."""

    def __setitem__(self, key, value) -> None:
        pass


@contextmanager
def cache(enabled: bool):
    saved = backbones._EXTRACTOR_TEMPLATES
    backbones._EXTRACTOR_TEMPLATES = {} if enabled else _NeverKeeps()
    try:
        yield
    finally:
        backbones._EXTRACTOR_TEMPLATES = saved


def seconds(call, n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - started) / n


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20, help="extractor calls per repeat")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with LoadWatch() as watch, tempfile.TemporaryDirectory() as tmp:
        data = make_texture_defect_set(Path(tmp) / "brick", texture="brick", seed=0)
        timings: dict[str, dict[str, list[float]]] = {}

        def extractor() -> None:
            backbones.create_feature_extractor(backbones.DEFAULT_BACKBONE, out_indices=(2, 3))

        def fit(name: str):
            return lambda: detect.create(name, image_size=64, seed=0).fit(data.root, progress=False)

        work = {"extractor (s per call)": (extractor, args.calls), "patchcore fit (s)": (fit("patchcore"), 1),
                "padim fit (s)": (fit("padim"), 1)}
        for enabled in (True, False):  # warm-up: imports, the wheel read, first allocations
            with cache(enabled):
                for call, _ in work.values():
                    call()
        for _ in range(args.repeats):
            for label, (call, n) in work.items():
                for arm, enabled in (("copy", True), ("build", False)):
                    with cache(enabled):
                        call()  # the cached arm's template is built here, outside the timing
                        timings.setdefault(label, {}).setdefault(arm, []).append(seconds(call, n))
    rows = {label: {arm: summary(v) for arm, v in arms.items()} for label, arms in timings.items()}
    for arms in rows.values():
        arms["build / copy"] = arms["build"]["median"] / arms["copy"]["median"]
    result = {"command": "HF_HUB_OFFLINE=1 python scripts/bench_feature_extractor.py "
                         f"--repeats {args.repeats} --calls {args.calls}",
              "torch_threads": 1, **watch.record(), "results": rows, "raw": timings}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "feature_extractor_copy.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [watch.status_line(), "", f"# Feature extractor: copy vs build ({result['command']})", "",
             f"One thread. Median (min-max) of {args.repeats} repeats, arms alternating.", "",
             "| what | copy (cache on) | build (cache off) | build / copy |", "|---|---|---|---|"]
    for label, arms in rows.items():
        cells = [f"{arms[a]['median']:.4f} ({arms[a]['min']:.4f}-{arms[a]['max']:.4f})" for a in ("copy", "build")]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {arms['build / copy']:.2f} |")
    (RESULTS / "feature_extractor_copy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
