"""EfficientAD inference latency on the CPU (ms/image, batch size 1), as in the paper's latency table.

Run:

    python scripts/bench_efficientad.py                     # writes scripts/results/bench_efficientad.{json,md}
    python scripts/bench_efficientad.py --sizes 256 --runs 50 --repeats 3 --compile

What is timed: the complete inference module (``EfficientAdModel.forward``: ImageNet normalisation, teacher,
student and autoencoder, both maps, quantile normalisation, padding and resizing to the input size, image
score), for one 3 x S x S image, after ``--warmup`` calls, ``--runs`` calls per measurement, median taken.
Latency does not depend on the weights (no data-dependent control flow), so a freshly initialised, seeded
model is timed; its buffers have the shapes of a trained one.

Variants, each with torch.set_num_threads(2) and (1):
- ``no_grad``: eager PyTorch under torch.no_grad
- ``inference_mode``: eager under torch.inference_mode
- ``inference_mode+channels_last``: model and input in channels_last memory format
- ``jit_trace+freeze``: torch.jit.trace, torch.jit.freeze and optimize_for_inference (oneDNN fusions)
- ``compile`` (only with --compile): torch.compile (inductor), under inference_mode

The machine is shared: every measurement is repeated ``--repeats`` times and the best median is reported,
together with the 1-minute load average seen around it. MACs are counted from the convolutions (the
paper's FLOP figures count a multiply-add as two operations).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from quiet_run import LoadWatch  # scripts/ is sys.path[0] when this script runs
from torch import nn

from detect.models.distillation.efficientad.torch_model import EfficientAdModel

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "scripts" / "results"
TARGET_MS = 30.0


def conv_macs(model: nn.Module, size: int) -> dict[str, float]:
    """Multiply-accumulates of every Conv2d for one size x size image, per submodule (teacher/student/AE)."""
    counts: dict[str, float] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            part = name.split(".")[0]

            def hook(mod: nn.Conv2d, _inp: tuple, out: torch.Tensor, part: str = part) -> None:
                per_output = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
                counts[part] = counts.get(part, 0.0) + out.numel() * per_output

            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.rand(1, 3, size, size))
    for h in hooks:
        h.remove()
    return counts


def time_median(call: Callable[[], object], warmup: int, runs: int) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def variants(model: EfficientAdModel, size: int, with_compile: bool) -> dict[str, Callable[[], object]]:
    x = torch.rand(1, 3, size, size)
    out: dict[str, Callable[[], object]] = {}

    def no_grad() -> object:
        with torch.no_grad():
            return model(x)

    def inference() -> object:
        with torch.inference_mode():
            return model(x)

    out["no_grad"] = no_grad
    out["inference_mode"] = inference

    model_cl = EfficientAdModel(model.model_size, size).eval()
    model_cl.load_state_dict(model.state_dict())
    model_cl = model_cl.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)

    def channels_last() -> object:
        with torch.inference_mode():
            return model_cl(x_cl)

    out["inference_mode+channels_last"] = channels_last

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still the fastest here
        traced = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, x).eval()))

    def jit() -> object:
        with torch.no_grad():
            return traced(x)

    out["jit_trace+freeze"] = jit
    if with_compile:
        compiled = torch.compile(model)

        def compiled_call() -> object:
            with torch.inference_mode():
                return compiled(x)

        out["compile"] = compiled_call
    return out


def report(result: dict) -> str:
    """Markdown table of ``result`` with the achieved GFLOP/s (2 x MACs) and the verdict on the target."""
    gmacs = {int(k): v["total"] for k, v in result["gmacs_per_image"].items()}
    lines = [
        f"# {result['model']} CPU latency (batch 1, median of {result['runs_per_median']} runs after "
        f"{result['warmup']} warm-up calls; best of the repeated medians listed)",
        "",
        result.get("status", "Run: quiet status not recorded (a run before scripts/quiet_run.py)."),
        "",
        f"torch {result['torch']}, {result['cpu_count']} CPU cores (the 1-minute load average around each "
        f"measurement is shown). Target: <= {result['target_ms']:.0f} ms/image on 2 cores at 256 px.",
        "",
        "GMACs per image (convolutions): " + "; ".join(
            f"{s} px: " + ", ".join(f"{k} {v}" for k, v in m.items()) for s, m in result["gmacs_per_image"].items()),
        "",
        "| size | threads | variant | best median ms | GFLOP/s | medians ms | load avg (1 min) |",
        "|---:|---:|---|---:|---:|---|---|",
    ]
    for r in result["results"]:
        gflops = 2 * gmacs[r["size"]] / (r["best_median_ms"] / 1000)
        lines.append(f"| {r['size']} | {r['threads']} | {r['variant']} | {r['best_median_ms']:.1f} | {gflops:.0f} | "
                     f"{', '.join(f'{m:.1f}' for m in r['medians_ms'])} | "
                     f"{', '.join(f'{v:.1f}' for v in r['load_avg_1min'])} |")
    best = [r for r in result["results"] if r["size"] == 256 and r["threads"] == 2]
    if best and 256 in gmacs:
        fastest = min(best, key=lambda r: r["best_median_ms"])
        needed = 2 * gmacs[256] / (result["target_ms"] / 1000)
        verdict = "meets" if fastest["best_median_ms"] <= result["target_ms"] else "misses"
        lines += ["", f"Best at 256 px on 2 threads: {fastest['best_median_ms']:.1f} ms ({fastest['variant']}), which "
                  f"{verdict} the {result['target_ms']:.0f} ms target. One image is {2 * gmacs[256]:.1f} GFLOP, so "
                  f"{result['target_ms']:.0f} ms needs {needed:.0f} GFLOP/s sustained; the paper's latencies are "
                  "GPU latencies."]
    return "\n".join(lines) + "\n"


def measure_all(args: argparse.Namespace, rows: list[dict], macs: dict) -> None:
    """Every size x threads x variant of ``args``, appended to ``rows``; MAC counts into ``macs``."""
    for size in args.sizes:
        model = EfficientAdModel(args.model_size, size).eval()
        model.reset_parameters(torch.Generator().manual_seed(0))
        counts = conv_macs(model, size)
        macs[size] = {k: round(v / 1e9, 3) for k, v in counts.items()} | {"total": round(sum(counts.values()) / 1e9, 3)}
        for threads in args.threads:
            torch.set_num_threads(threads)
            for name, call in variants(model, size, args.compile).items():
                medians, loads = [], []
                try:
                    for _ in range(args.repeats):
                        load_before = os.getloadavg()[0]
                        medians.append(time_median(call, args.warmup, args.runs))
                        loads.append(round(max(load_before, os.getloadavg()[0]), 2))
                except Exception as exc:  # torch.compile needs a working C++ toolchain
                    print(f"{size}px {threads} thr {name}: failed ({type(exc).__name__}: {exc})", flush=True)
                    continue
                best = min(medians)
                rows.append({"size": size, "threads": threads, "variant": name, "best_median_ms": round(best, 2),
                             "medians_ms": [round(m, 2) for m in medians], "load_avg_1min": loads})
                print(f"{size:4d}px {threads} thr {name:30s} best median {best:9.2f} ms  "
                      f"(medians {[round(m, 1) for m in medians]}, load {loads})", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256])
    parser.add_argument("--model-size", default="small", choices=["small", "medium"])
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--merge", action="store_true", help="add to the rows already in --out (other sizes)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    rows = []
    macs = {}
    with LoadWatch() as watch:
        measure_all(args, rows, macs)
    result_status = watch.status_line()
    result = {
        "model": f"EfficientAD-{args.model_size[0].upper()}",
        "batch_size": 1,
        "runs_per_median": args.runs,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "target_ms": TARGET_MS,
        "gmacs_per_image": {str(k): v for k, v in macs.items()},
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "results": rows,
        "load": watch.record(),
        "status": result_status,
    }
    json_path = args.out / "bench_efficientad.json"
    if args.merge and json_path.is_file():  # keep earlier rows of other sizes / threads / variants
        old = json.loads(json_path.read_text(encoding="utf-8"))
        new_keys = {(r["size"], r["threads"], r["variant"]) for r in rows}
        kept = [r for r in old["results"] if (r["size"], r["threads"], r["variant"]) not in new_keys]
        result["results"] = sorted(kept + rows, key=lambda r: (-r["size"], -r["threads"]))
        result["gmacs_per_image"] = {**old["gmacs_per_image"], **result["gmacs_per_image"]}
    args.out.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (args.out / "bench_efficientad.md").write_text(report(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
