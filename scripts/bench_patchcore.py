"""Benchmark PixelVision's PatchCore against Anomalib's on the same data, backbone, weights and settings.

Not run in CI. Anomalib is not a project dependency; install it into a separate environment that sees the
system packages, so the project's own environment stays untouched, and run this script with that interpreter:

    python -m venv --system-site-packages /tmp/anomalib-venv && /tmp/anomalib-venv/bin/pip install anomalib
    /tmp/anomalib-venv/bin/python scripts/bench_patchcore.py

With an interpreter where anomalib cannot be imported, only our model is measured (and the report says why).

What is measured, in one run:

1. End to end on real data (default: ../shared/data/magnetic-tile, the first 50 train/good images in sorted
   order; test on the first 50 test/good + 50 defect images, taken round-robin over the sorted defect classes).
   Both models get the same preloaded tensors (image decoding and resizing are timed once, apart), the same
   tf_efficientnet_lite0 weights (our resolved state dict is loaded into Anomalib's TimmFeatureExtractor and its
   outputs are checked against ours), the same layers, image size and coreset ratio, and Anomalib's model gets
   the same normalisation as ours (lite0 expects mean/std 0.5). Anomalib is driven like its Lightning module
   does (train-mode forward to collect embeddings, then ``subsample_embedding``), without Lightning itself.
   Reported: fit time (features + coreset), predict images/s, end-to-end time (fit + predict), image and pixel
   AUROC, memory-bank size.
2. Coreset micro-benchmark: 10% of 100_000 random 384-d patches, our ``k_center_greedy`` against Anomalib's
   ``KCenterGreedy``. Anomalib's loop costs the same for every center (one full distance pass), so by default it
   runs ``--anomalib-coreset-iters`` centers and the full time is extrapolated (marked as such);
   ``--anomalib-coreset-iters 0`` runs it completely.

Every time is the median of ``--repeats`` (default 3) runs with min and max (the metrics are the same every run:
same seed); the quiet-machine rule of ``scripts/quiet_run.py`` marks the run. Results go to ``<out>.json`` and
``<out>.md`` (default scripts/results/bench_patchcore) and are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from detect.data import load_rgb, resize_mask, to_tensor  # noqa: E402
from detect.metrics import auroc  # noqa: E402
from detect.models.memory.patchcore import Patchcore, k_center_greedy  # noqa: E402
from detect.models.memory.patchcore.detector import coreset_size  # noqa: E402
from synth.core.defect_set import read_defect_set  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
from quiet_run import LoadWatch  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "magnetic-tile"
DEFAULT_OUT = REPO / "scripts" / "results" / "bench_patchcore"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MVTec-layout folder")
    parser.add_argument("--train", type=int, default=50, help="train/good images (first, sorted)")
    parser.add_argument("--good", type=int, default=50, help="test/good images")
    parser.add_argument("--defect", type=int, default=50, help="defect images (round-robin over classes)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of each side (medians reported, with min-max)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--coreset-n", type=int, default=100_000, help="micro-benchmark: number of patches")
    parser.add_argument("--coreset-dim", type=int, default=384, help="micro-benchmark: patch dimension")
    parser.add_argument("--anomalib-coreset-iters", type=int, default=1000,
                        help="micro-benchmark: Anomalib centers actually run (0: all), the rest extrapolated")
    parser.add_argument("--skip-anomalib", action="store_true", help="measure our model only")
    parser.add_argument("--skip-micro", action="store_true", help="skip the coreset micro-benchmark")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output path without extension")
    return parser.parse_args(argv)


# ----- data ---------------------------------------------------------------------------------------------------

def select_samples(root: Path, n_train: int, n_good: int, n_defect: int) -> tuple[Any, list, list]:
    data = read_defect_set(root)
    train = sorted(data.select(split="train", anomalous=False), key=lambda s: s.image)[:n_train]
    good = sorted(data.select(split="test", anomalous=False), key=lambda s: s.image)[:n_good]
    by_class: dict[str, list] = {}
    for sample in sorted(data.select(split="test", anomalous=True), key=lambda s: s.image):
        by_class.setdefault(sample.defect_class, []).append(sample)
    defects: list = []
    depth = 0
    while len(defects) < n_defect and any(depth < len(v) for v in by_class.values()):
        defects += [by_class[c][depth] for c in sorted(by_class) if depth < len(by_class[c])]
        depth += 1
    return data, train, good + defects[:n_defect]


def load_images(data: Any, samples: list, size: int) -> torch.Tensor:
    return to_tensor([load_rgb(data.image_path(s)) for s in samples], size)


def as_uint8_arrays(images: torch.Tensor) -> list[np.ndarray]:
    """Preloaded [0, 1] tensors back to the uint8 HxWx3 arrays they came from (exact: they are k/255)."""
    return list((images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))


def batches(images: torch.Tensor, batch_size: int):
    return images.split(batch_size)


# ----- our model ----------------------------------------------------------------------------------------------

def bench_ours(args: argparse.Namespace, train: torch.Tensor, test: torch.Tensor) -> tuple[dict, Patchcore, dict]:
    detector = Patchcore(image_size=args.image_size, layers=list(args.layers), coreset_ratio=args.coreset_ratio,
                         batch_size=args.batch_size, seed=args.seed)
    arrays = as_uint8_arrays(train)
    start = time.perf_counter()
    patches = detector.extract_patches(arrays)
    features_s = time.perf_counter() - start
    k = coreset_size(patches.shape[0], args.coreset_ratio)
    start = time.perf_counter()
    index = k_center_greedy(patches, k, projection_dim=detector.config.projection_dim, seed=args.seed)
    coreset_s = time.perf_counter() - start
    detector.model.memory_bank = patches[index].contiguous()
    detector.model.eval()
    detector.fitted = True
    outputs = {}
    result: dict[str, Any] = {
        "fit_s": features_s + coreset_s, "fit_features_s": features_s, "fit_coreset_s": coreset_s,
        "memory_bank": list(detector.model.memory_bank.shape), "train_patches": int(patches.shape[0]),
    }
    for backend in ("torch", "faiss"):
        detector.model.nn_backend = backend
        run(detector.model, test[: args.batch_size])  # warm-up (oneDNN primitives, faiss index)
        start = time.perf_counter()
        scores, maps = run(detector.model, test, args.batch_size)
        seconds = time.perf_counter() - start
        outputs[backend] = (scores, maps)
        result[f"predict_s_{backend}"] = seconds
        result[f"predict_ips_{backend}"] = len(test) / seconds
    detector.model.nn_backend = "torch"
    result["predict_s"] = result["predict_s_torch"]
    result["predict_ips"] = result["predict_ips_torch"]
    result["end_to_end_s"] = result["fit_s"] + result["predict_s"]
    faiss_scores = outputs["faiss"][0]
    torch_scores = outputs["torch"][0]
    result["faiss_vs_torch_max_rel_score_diff"] = float(
        (np.abs(faiss_scores - torch_scores) / np.abs(torch_scores).clip(1e-12)).max())
    return result, detector, {"scores": torch_scores, "maps": outputs["torch"][1]}


@torch.no_grad()
def run(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    scores, maps = [], []
    for batch in batches(images, batch_size):
        s, m = model(batch)
        scores.append(s.numpy())
        maps.append(m.numpy())
    return np.concatenate(scores), np.concatenate(maps)


# ----- Anomalib -----------------------------------------------------------------------------------------------

def import_anomalib() -> tuple[Any, str | None]:
    try:
        import anomalib
        from anomalib.models.components import KCenterGreedy  # noqa: F401
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: benchmark ours only
        return None, f"{type(exc).__name__}: {exc}"
    return anomalib, None


def build_anomalib(args: argparse.Namespace, ours: Patchcore) -> torch.nn.Module:
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    model = PatchcoreModel(layers=list(args.layers), backbone=ours.config.backbone, pre_trained=False,
                           num_neighbors=ours.config.num_neighbors)
    body = model.feature_extractor.feature_extractor
    # Same weights as ours (our offline-resolved ImageNet weights; the layout of ours is channels-last, so copy
    # through contiguous tensors).
    body.load_state_dict({k: v.contiguous() for k, v in ours.model.extractor.body.state_dict().items()}, strict=True)
    check = torch.rand(2, 3, args.image_size, args.image_size)
    with torch.no_grad():
        ours_features = ours.model.extractor(check)
        theirs = model.feature_extractor((check - ours.model.extractor.mean) / ours.model.extractor.std)
    for a, b in zip(ours_features, theirs.values(), strict=True):
        torch.testing.assert_close(a.contiguous(), b.contiguous(), rtol=1e-3, atol=1e-4)
    return model


def bench_anomalib(args: argparse.Namespace, ours: Patchcore, train: torch.Tensor, test: torch.Tensor
                   ) -> tuple[dict, dict]:
    model = build_anomalib(args, ours)
    mean, std = ours.model.extractor.mean, ours.model.extractor.std
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model.train()
    with torch.no_grad():
        for batch in batches(train, args.batch_size):
            model((batch - mean) / std)
    features_s = time.perf_counter() - start
    start = time.perf_counter()
    model.subsample_embedding(args.coreset_ratio)
    coreset_s = time.perf_counter() - start
    model.eval()

    @torch.no_grad()
    def predict(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = [], []
        for batch in batches(images, args.batch_size):
            out = model((batch - mean) / std)
            scores.append(out.pred_score.reshape(-1).numpy())
            maps.append(out.anomaly_map.reshape(len(batch), *batch.shape[-2:]).numpy())
        return np.concatenate(scores), np.concatenate(maps)

    predict(test[: args.batch_size])  # warm-up
    start = time.perf_counter()
    scores, maps = predict(test)
    predict_s = time.perf_counter() - start
    result = {
        "fit_s": features_s + coreset_s, "fit_features_s": features_s, "fit_coreset_s": coreset_s,
        "memory_bank": list(model.memory_bank.shape), "predict_s": predict_s, "predict_ips": len(test) / predict_s,
        "end_to_end_s": features_s + coreset_s + predict_s,
    }
    return result, {"scores": scores, "maps": maps}


# ----- coreset micro-benchmark --------------------------------------------------------------------------------

def bench_coreset(args: argparse.Namespace, with_anomalib: bool) -> dict:
    features = torch.randn(args.coreset_n, args.coreset_dim, generator=torch.Generator().manual_seed(args.seed))
    k = coreset_size(args.coreset_n, args.coreset_ratio)
    start = time.perf_counter()
    selected = k_center_greedy(features, k, seed=args.seed)
    ours_s = time.perf_counter() - start
    result: dict[str, Any] = {"n": args.coreset_n, "dim": args.coreset_dim, "ratio": args.coreset_ratio,
                              "centers": int(selected.numel()), "ours_s": ours_s, "ours_projection_dim": 128}
    if not with_anomalib:
        return result
    from anomalib.models.components import KCenterGreedy

    torch.manual_seed(args.seed)
    full = int(args.coreset_n * args.coreset_ratio)  # Anomalib's own count: int(n * ratio)
    iters = full if args.anomalib_coreset_iters <= 0 else min(full, args.anomalib_coreset_iters)
    sampler = KCenterGreedy(features, sampling_ratio=iters / args.coreset_n)
    start = time.perf_counter()
    sampler.model.fit(features)
    sampler.features = sampler.model.transform(features)
    projection_s = time.perf_counter() - start
    start = time.perf_counter()
    # select_coreset_idxs() re-fits the projection; time the loop alone, then add the projection once.
    sampler.model.fit = lambda embedding: sampler.model  # type: ignore[method-assign]
    sampler.model.transform = lambda embedding: sampler.features  # type: ignore[method-assign]
    picked = sampler.select_coreset_idxs()
    loop_s = time.perf_counter() - start
    measured = len(picked)
    result.update({
        "anomalib_projection_dim": int(sampler.features.shape[1]),
        "anomalib_centers_run": measured,
        "anomalib_centers_full": full,
        "anomalib_extrapolated": measured < full,
        "anomalib_s": projection_s + loop_s * full / measured,
    })
    result["speedup"] = result["anomalib_s"] / ours_s
    return result


# ----- repeats ------------------------------------------------------------------------------------------------

def repeated(measure: Any, repeats: int) -> tuple:
    """Run ``measure()`` (returns a tuple whose first item is a dict of results) ``repeats`` times; the first item
    becomes the medians of its timing fields (``*_s``, ``*_ips*``, ``speedup``) with ``<field>_min`` / ``_max``;
    the other items (model, outputs) are the last run's (deterministic: the same seed every run)."""
    runs = [measure() for _ in range(max(repeats, 1))]
    merged = dict(runs[-1][0])
    for key, value in runs[-1][0].items():
        if isinstance(value, float) and (key.endswith("_s") or "_ips" in key or key == "speedup"):
            values = [run[0][key] for run in runs]
            merged.update({key: statistics.median(values), f"{key}_min": min(values), f"{key}_max": max(values)})
    return (merged, *runs[-1][1:])


# ----- report -------------------------------------------------------------------------------------------------

def metrics(outputs: dict, labels: np.ndarray, masks: np.ndarray) -> dict:
    return {"image_auroc": auroc(outputs["scores"], labels), "pixel_auroc": auroc(outputs["maps"], masks)}


def markdown(report: dict) -> str:
    lines = [f"# PatchCore benchmark: ours vs Anomalib {report['anomalib_version'] or '(not available)'}", ""]
    setup = report["setup"]
    lines += [f"Data: {setup['data']} — {setup['train']} train/good, {setup['test_good']} good + "
              f"{setup['test_defect']} defect test images; image size {setup['image_size']}, layers {setup['layers']}, "
              f"coreset ratio {setup['coreset_ratio']}, backbone {setup['backbone']} (same weights). "
              f"Machine: {report['machine']['cpus']} CPUs, torch {report['machine']['torch']} with "
              f"{report['machine']['torch_threads']} threads. Image loading (shared, not in the times): "
              f"{report['load_images_s']:.1f} s. Times: median of {report['machine']['repeats']} runs (min-max).", "",
              report["machine"]["status"], ""]
    if report.get("anomalib_error"):
        lines += [f"Anomalib not measured: {report['anomalib_error']}", ""]
    lines += ["| | fit s (features + coreset) [min-max] | predict img/s [min-max] | end-to-end s | image AUROC "
              "| pixel AUROC | memory bank |", "|---|---|---|---|---|---|---|"]
    for name in ("ours", "anomalib"):
        r = report.get(name)
        if not r:
            continue
        lines.append(f"| {name} | {r['fit_s']:.1f} ({r['fit_features_s']:.1f} + {r['fit_coreset_s']:.1f}) "
                     f"[{r['fit_s_min']:.1f}-{r['fit_s_max']:.1f}] | {r['predict_ips']:.1f} "
                     f"[{r['predict_ips_min']:.1f}-{r['predict_ips_max']:.1f}] | {r['end_to_end_s']:.1f} | "
                     f"{r['image_auroc']:.4f} | "
                     f"{r['pixel_auroc']:.4f} | {r['memory_bank'][0]} x {r['memory_bank'][1]} |")
    ours = report["ours"]
    lines += ["", f"Ours with the faiss search: {ours['predict_ips_faiss']:.1f} img/s (torch search "
              f"{ours['predict_ips_torch']:.1f}); max relative score difference "
              f"{ours['faiss_vs_torch_max_rel_score_diff']:.1e}."]
    if report.get("ratios"):
        r = report["ratios"]
        lines += ["", f"Ratios (Anomalib / ours): end to end {r['end_to_end_speedup']:.1f}x, "
                  f"fit {r['fit_speedup']:.1f}x, coreset {r['coreset_speedup']:.1f}x, "
                  f"predict {r['predict_speedup']:.2f}x; image AUROC ours - Anomalib "
                  f"{r['image_auroc_diff_points']:+.2f} points, "
                  f"pixel AUROC {r['pixel_auroc_diff_points']:+.2f} points."]
    micro = report.get("coreset_micro")
    if micro:
        lines += ["", f"Coreset micro-benchmark: {micro['centers']} centers from {micro['n']} x {micro['dim']} random "
                  f"patches: ours {micro['ours_s']:.1f} s [{micro['ours_s_min']:.1f}-{micro['ours_s_max']:.1f}] "
                  f"(projection to {micro['ours_projection_dim']})"]
        if "anomalib_s" in micro:
            how = (f"extrapolated from {micro['anomalib_centers_run']} of {micro['anomalib_centers_full']} centers"
                   if micro["anomalib_extrapolated"] else "full run")
            lines[-1] += (f", Anomalib KCenterGreedy {micro['anomalib_s']:.1f} s "
                          f"[{micro['anomalib_s_min']:.1f}-{micro['anomalib_s_max']:.1f}] ({how}, projection to "
                          f"{micro['anomalib_projection_dim']}): {micro['speedup']:.1f}x.")
        else:
            lines[-1] += "."
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    anomalib, anomalib_error = (None, "skipped (--skip-anomalib)") if args.skip_anomalib else import_anomalib()
    report: dict[str, Any] = {
        "anomalib_version": getattr(anomalib, "__version__", None), "anomalib_error": anomalib_error,
        "setup": {"data": str(args.data), "train": args.train, "test_good": args.good, "test_defect": args.defect,
                  "image_size": args.image_size, "layers": args.layers, "coreset_ratio": args.coreset_ratio,
                  "batch_size": args.batch_size, "backbone": "tf_efficientnet_lite0", "seed": args.seed},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "python": sys.executable,
                    "repeats": args.repeats},
    }
    data, train_samples, test_samples = select_samples(args.data, args.train, args.good, args.defect)
    start = time.perf_counter()
    train = load_images(data, train_samples, args.image_size)
    test = load_images(data, test_samples, args.image_size)
    report["load_images_s"] = time.perf_counter() - start
    report["setup"].update(test_good=sum(not s.is_anomalous for s in test_samples),
                           test_defect=sum(s.is_anomalous for s in test_samples), train=len(train_samples))
    labels = np.array([s.is_anomalous for s in test_samples])
    masks = np.stack([resize_mask(data.load_mask(s), args.image_size) for s in test_samples])

    with LoadWatch() as watch:
        ours, detector, ours_out = repeated(lambda: bench_ours(args, train, test), args.repeats)
        ours.update(metrics(ours_out, labels, masks))
        report["ours"] = ours
        print(f"ours: {json.dumps(ours)}", flush=True)
        if anomalib is not None:
            theirs, theirs_out = repeated(lambda: bench_anomalib(args, detector, train, test), args.repeats)
            theirs.update(metrics(theirs_out, labels, masks))
            report["anomalib"] = theirs
            print(f"anomalib: {json.dumps(theirs)}", flush=True)
            report["ratios"] = {
                "end_to_end_speedup": theirs["end_to_end_s"] / ours["end_to_end_s"],
                "fit_speedup": theirs["fit_s"] / ours["fit_s"],
                "coreset_speedup": theirs["fit_coreset_s"] / ours["fit_coreset_s"],
                "predict_speedup": ours["predict_ips"] / theirs["predict_ips"],
                "image_auroc_diff_points": 100 * (ours["image_auroc"] - theirs["image_auroc"]),
                "pixel_auroc_diff_points": 100 * (ours["pixel_auroc"] - theirs["pixel_auroc"]),
            }
        if not args.skip_micro:
            report["coreset_micro"] = repeated(lambda: (bench_coreset(args, anomalib is not None),), args.repeats)[0]
            print(f"coreset micro: {json.dumps(report['coreset_micro'])}", flush=True)
    report["machine"].update(watch.record())
    report["machine"]["status"] = watch.status_line()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    json_path.write_text(json.dumps(report, indent=2, default=float) + "\n", encoding="utf-8")
    text = markdown(report)
    md_path.write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {json_path} and {md_path}")
    return report


if __name__ == "__main__":
    main()
