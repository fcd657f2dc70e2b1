"""ONNX export of fitted detectors, verified against PyTorch with onnxruntime.

Every detector's torch module maps images in [0, 1], (N, 3, S, S) RGB, to ``(scores (N,), anomaly_maps
(N, S, S))`` with all preprocessing (ImageNet normalisation, feature extraction, scoring, upsampling, blur)
inside, so the exported graph is the whole in-framework inference and there is no preprocessing to get wrong on
the deployment side beyond resizing to S x S and dividing uint8 pixels by 255. Graph names: input ``image``,
outputs ``score`` and ``anomaly_map``; the batch dimension is dynamic by default.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)`` by default. On the six detectors this
was written for (PatchCore, PaDiM, STFPM, FastFlow, EfficientAD, Reverse Distillation) it exports each in about
1 s at 64 px, against 5-30 s for the ``torch.export``-based exporter (``exporter="dynamo"``, also supported and
giving the same results); the legacy exporter is deprecated upstream, so when it is missing or fails, the dynamo
exporter is tried before giving up. Tracing fixes Python-side control flow for the traced shapes, which is why
every export is checked (``check=True``) on batch sizes other than the traced one.

The check runs onnxruntime and the PyTorch module on the same deterministic images and fails with the measured
numbers when ``max |onnx - torch|`` of the scores or the maps exceeds ``rtol`` times the score scale
(the largest ``|torch|`` value of scores and maps). Nothing is written unless the check passes: the file is
exported to a temporary name beside the target, verified, then renamed.

Coverage (64 px, 1-epoch fits, torch 2.14 / onnxruntime 1.32): 21 of the 22 registered models export and pass the
check; csflow and winclip through the dynamo fallback (the legacy exporter has no adaptive pooling with a
traced output size, nor PyTorch's fused multi-head attention). vlm_ad is refused (``NOT_EXPORTABLE``). DSR
checks at a looser tolerance (``MODEL_RTOL``).

Beside the model, ``export.json`` (one export per folder) records the model, input size and names, the
normalisation note, the detector's calibration (thresholds, so a deployment applies the same decision rule), the
opset, the exporter, library versions and the check's numbers; the same JSON is stored in the ONNX file's
``metadata_props`` under ``pixelvision``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from detect.base import Detector
from synth.core.errors import ConfigError, InputError
from synth.core.io import write_json

logger = logging.getLogger(__name__)

FORMATS = ("onnx",)
EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = 18
DEFAULT_RTOL = 1e-4
INPUT_NAME = "image"
OUTPUT_NAMES = ("score", "anomaly_map")
METADATA_FILE = "export.json"
EXPORT_FORMAT_VERSION = 1
INSTALL_HINT = 'pip install "pixelvision[export]"'

NOT_EXPORTABLE: dict[str, str] = {
    "vlm_ad": "its scores come from a vision-language model behind an HTTP API (prompts, JSON replies), not from "
              "a tensor graph",
}
"""Models whose inference is not a tensor graph, refused up front with the reason (the others are attempted and
must pass the onnxruntime check; see ``export_onnx``)."""

MODEL_RTOL: dict[str, float] = {
    # Vector quantisation picks the nearest codebook entry; near ties flip under float32 rounding, which moves a
    # few map cells. Measured at 64 px (1 epoch): PyTorch float32 itself differs from float64 PyTorch by 4.2e-4 of
    # the map scale, onnxruntime by 2.2e-4 (closer), and the two float32 runs differ by 7.2e-4 of it.
    "dsr": 5e-3,
}
"""Check tolerances (relative to the score scale) of models whose float32 result is itself this sensitive."""


class ExportCheckError(InputError):
    """The exported graph's outputs differ from PyTorch's by more than the tolerance."""


def require_runtime(exporter: str = "torchscript") -> None:
    """Raise an InputError with the install command when onnx / onnxruntime (/ onnxscript) are missing."""
    modules = ["onnx", "onnxruntime"] + (["onnxscript"] if exporter == "dynamo" else [])
    missing = []
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise InputError(f"ONNX export needs {', '.join(missing)} (not installed); install with: {INSTALL_HINT}")


def _resolve_detector(detector_or_model_dir: Detector | str | Path) -> Detector:
    if isinstance(detector_or_model_dir, Detector):
        detector = detector_or_model_dir
    else:
        from detect.registry import load

        path = Path(detector_or_model_dir)
        if not path.is_dir():
            raise InputError(f"{path}: no such model folder; give a folder written by `detect fit --out`.")
        detector = load(path)
    if detector.name in NOT_EXPORTABLE:
        exportable = ", ".join(n for n in _registered() if n not in NOT_EXPORTABLE)
        raise InputError(f"{detector.name} cannot be exported to ONNX: {NOT_EXPORTABLE[detector.name]}. "
                         f"Exportable models: {exportable}.")
    if not detector.fitted:
        raise InputError(f"{detector.name}: the model is not fitted; fit it (or load a saved model) before exporting.")
    return detector


def _registered() -> list[str]:
    from detect.registry import list_models

    return list_models()


def check_inputs(image_size: int, batch: int, seed: int = 0) -> torch.Tensor:
    """Deterministic [0, 1] test images (batch, 3, S, S): uniform noise, smooth random fields (upsampled low-res
    noise, closer to real textures) and a flat grey image, in turn."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for i in range(batch):
        kind = i % 3
        if kind == 0:
            image = torch.rand(3, image_size, image_size, generator=generator)
        elif kind == 1:
            low = torch.rand(1, 3, 8, 8, generator=generator)
            image = F.interpolate(low, size=(image_size, image_size), mode="bilinear", align_corners=False)[0]
        else:
            image = torch.full((3, image_size, image_size), 0.5)
        images.append(image)
    return torch.stack(images).clamp(0, 1)


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the exporters' tracer / deprecation chatter (the check below is what guards correctness)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = {name: logging.getLogger(name).level for name in ("torch.onnx", "torch.export", "onnxscript")}
        for name in previous:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for name, level in previous.items():
                logging.getLogger(name).setLevel(level)


def _export_graph(model: torch.nn.Module, example: torch.Tensor, path: Path, *, opset: int, dynamic_batch: bool,
                  exporter: str) -> None:
    with torch.no_grad(), _quiet_export():
        if exporter == "torchscript":
            axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAMES[0]: {0: "batch"}, OUTPUT_NAMES[1]: {0: "batch"}}
            torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                              opset_version=opset, dynamo=False, do_constant_folding=True,
                              dynamic_axes=axes if dynamic_batch else None)
        else:
            shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
            program = torch.onnx.export(model, (example,), input_names=[INPUT_NAME],
                                        output_names=list(OUTPUT_NAMES), opset_version=opset, dynamo=True,
                                        dynamic_shapes=shapes, external_data=False, optimize=True)
            if program is None:  # pragma: no cover - torch returns the program when no file is given
                raise RuntimeError("torch.onnx.export returned no program")
            program.save(str(path), external_data=False)


def _device(model: torch.nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (CPU when it has neither)."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # As many threads as torch uses: the comparison and the timing then use the same CPU budget.
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def compare_outputs(model: torch.nn.Module, onnx_path: str | Path, images: torch.Tensor, *,
                    session: Any = None) -> dict[str, float]:
    """Run PyTorch and onnxruntime on ``images`` (N, 3, S, S) in [0, 1].

    Returns ``score_max_abs_diff``, ``map_max_abs_diff``, ``scale`` (the largest |torch| output value) and
    ``relative_diff`` (the larger difference over ``scale``). NaN/inf where PyTorch has finite values counts as
    an infinite difference.
    """
    session = session or _session(Path(onnx_path))
    model.eval()
    with torch.no_grad():
        ref_scores, ref_maps = (t.float().cpu().numpy() for t in model(images.to(_device(model))))
    try:
        got_scores, got_maps = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.numpy().astype(np.float32)})
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ExportCheckError(f"{onnx_path}: onnxruntime cannot run the exported graph on a batch of {len(images)} "
                               f"({type(exc).__name__}: {str(exc).strip()[:400]}).") from None
    if got_scores.shape != ref_scores.shape or got_maps.shape != ref_maps.shape:
        raise ExportCheckError(f"{onnx_path}: onnxruntime output shapes {got_scores.shape}, {got_maps.shape} differ "
                               f"from PyTorch's {ref_scores.shape}, {ref_maps.shape} (batch {len(images)}).")

    def max_diff(a: np.ndarray, b: np.ndarray) -> float:
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        return float("inf") if not np.isfinite(diff[np.isfinite(b)]).all() else float(np.nanmax(diff, initial=0.0))

    score_diff, map_diff = max_diff(got_scores, ref_scores), max_diff(got_maps, ref_maps)
    finite = np.r_[np.abs(ref_scores[np.isfinite(ref_scores)]), np.abs(ref_maps[np.isfinite(ref_maps)])]
    scale = float(finite.max(initial=0.0)) or 1.0
    return {"score_max_abs_diff": score_diff, "map_max_abs_diff": map_diff, "scale": scale,
            "relative_diff": max(score_diff, map_diff) / scale}


def verify_onnx(detector: Detector, onnx_path: str | Path, *, batches: tuple[int, ...] = (3, 1),
                rtol: float = DEFAULT_RTOL) -> dict[str, Any]:
    """Compare the ONNX file with ``detector.model`` on deterministic images, one run per batch size; raise
    :class:`ExportCheckError` with the numbers when the relative difference exceeds ``rtol``."""
    session = _session(Path(onnx_path))
    size = detector.config.image_size
    runs = []
    for i, batch in enumerate(batches):
        result = compare_outputs(detector.model, onnx_path, check_inputs(size, batch, seed=i), session=session)
        runs.append({"batch": batch, **result})
    worst = max(runs, key=lambda r: r["relative_diff"])
    if not worst["relative_diff"] <= rtol:
        raise ExportCheckError(
            f"{detector.name}: the ONNX graph does not reproduce PyTorch (batch {worst['batch']}: max |diff| score "
            f"{worst['score_max_abs_diff']:.3g}, map {worst['map_max_abs_diff']:.3g}, score scale "
            f"{worst['scale']:.3g}, relative {worst['relative_diff']:.3g} > tolerance {rtol:g}). The model's forward "
            f"probably has data-dependent control flow the exporter fixed at export time; report it, or try "
            f"exporter='dynamo'.")
    return {"rtol": rtol, "runs": runs, "max_relative_diff": worst["relative_diff"]}


def _metadata(detector: Detector, *, opset: int, exporter: str, dynamic_batch: bool, onnx_file: str
              ) -> dict[str, Any]:
    import onnx
    import onnxruntime

    size = detector.config.image_size
    batch: int | str = "N" if dynamic_batch else 1
    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "onnx_file": onnx_file,
        "model": detector.name,
        "image_size": size,
        "inputs": [{"name": INPUT_NAME, "shape": [batch, 3, size, size], "dtype": "float32",
                    "layout": "NCHW, RGB", "range": [0.0, 1.0]}],
        "outputs": [{"name": OUTPUT_NAMES[0], "shape": [batch], "dtype": "float32",
                     "meaning": "raw image anomaly score, higher = more anomalous"},
                    {"name": OUTPUT_NAMES[1], "shape": [batch, size, size], "dtype": "float32",
                     "meaning": "raw pixel anomaly scores at the input size"}],
        "preprocessing": (f"resize to {size}x{size} (PixelVision uses OpenCV INTER_AREA), RGB channel order, "
                          "uint8 / 255 -> [0, 1]; any normalisation (e.g. ImageNet mean/std) is inside the graph"),
        "calibration": detector.calibration.to_dict() if detector.calibration else None,
        "decision_rule": ("anomalous when score >= calibration.image_threshold; a pixel is anomalous when "
                          "anomaly_map >= calibration.pixel_threshold; normalised score = clip(0.5 + (score - "
                          "image_threshold) / (score_max - score_min), 0, 1)"),
        "config": asdict(detector.config),
        "opset": opset,
        "exporter": exporter,
        "dynamic_batch": dynamic_batch,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }


def _embed_metadata(path: Path, metadata: dict[str, Any]) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = "pixelvision", json.dumps(metadata, sort_keys=True)
    onnx.save(model, str(path))


def export_onnx(detector_or_model_dir: Detector | str | Path, out_path: str | Path | None = None, *,
                opset: int = DEFAULT_OPSET, dynamic_batch: bool = True, check: bool = True,
                exporter: str = "torchscript", rtol: float | None = None) -> Path:
    """Export a fitted detector (or a saved model folder) to ONNX and return the file's path.

    ``out_path``: the ``.onnx`` file (default: ``model.onnx`` in the model folder; required when a Detector
    object is given). ``dynamic_batch``: any batch size (else batch 1). ``check``: verify with onnxruntime
    against PyTorch (see module docstring) before the file appears; ``rtol``: its tolerance relative to the
    score scale (default ``DEFAULT_RTOL``, or the model's entry in ``MODEL_RTOL``). ``exporter``: "torchscript"
    (default; falls back to "dynamo" if it fails or its check fails) or "dynamo". Writes ``export.json`` beside
    the file.
    """
    if exporter not in EXPORTERS:
        raise ConfigError(f"exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}.")
    if not 7 <= int(opset) <= 23:
        raise ConfigError(f"opset {opset}: choose an ONNX opset between 7 and 23 (default {DEFAULT_OPSET}).")
    if rtol is not None and not rtol > 0:
        raise ConfigError(f"rtol {rtol}: the check tolerance must be > 0.")
    if out_path is None:
        if isinstance(detector_or_model_dir, Detector):
            raise InputError("export_onnx: give out_path when exporting a Detector object (no model folder).")
        out_path = Path(detector_or_model_dir) / "model.onnx"
    out = Path(out_path)
    if out.suffix.lower() != ".onnx":
        raise InputError(f"{out}: the output file name must end in .onnx.")
    if out.is_dir():
        raise InputError(f"{out}: is a folder; give the .onnx file to write.")
    require_runtime(exporter)
    detector = _resolve_detector(detector_or_model_dir)
    rtol = MODEL_RTOL.get(detector.name, DEFAULT_RTOL) if rtol is None else float(rtol)
    out.parent.mkdir(parents=True, exist_ok=True)

    model = detector.model.eval()
    example = check_inputs(detector.config.image_size, 2 if dynamic_batch else 1, seed=12345).to(_device(model))
    handle, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        start = time.perf_counter()
        attempts = [exporter] + (["dynamo"] if exporter == "torchscript" else [])
        errors: list[str] = []
        used = None
        report: dict[str, Any] | None = None
        for attempt in attempts:
            try:
                if attempt == "dynamo":
                    require_runtime("dynamo")
                _export_graph(model, example, tmp, opset=opset, dynamic_batch=dynamic_batch, exporter=attempt)
                if check:
                    report = verify_onnx(detector, tmp, batches=(3, 1) if dynamic_batch else (1,), rtol=rtol)
                used = attempt
                break
            except InputError as exc:
                errors.append(f"{attempt}: {exc}")
            except Exception as exc:  # noqa: BLE001 - any exporter failure becomes one clear message below
                errors.append(f"{attempt} exporter failed: {type(exc).__name__}: {str(exc).strip()[:500]}")
            logger.info("%s: %s", detector.name, errors[-1])
        if used is None:
            raise InputError(f"{detector.name} could not be exported to ONNX: " + " | ".join(errors))
        metadata = _metadata(detector, opset=opset, exporter=used, dynamic_batch=dynamic_batch, onnx_file=out.name)
        metadata["check"] = report
        metadata["export_seconds"] = round(time.perf_counter() - start, 2)
        _embed_metadata(tmp, metadata)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    write_json(out.parent / METADATA_FILE, metadata)
    if report is not None:
        logger.info("%s: exported to %s (%s exporter); onnxruntime matches PyTorch to %.2g of the score scale",
                    detector.name, out, used, report["max_relative_diff"])
    return out


def benchmark_latency(detector: Detector, onnx_path: str | Path, *, batch: int = 1, repeats: int = 20
                      ) -> dict[str, float]:
    """Median seconds per image of PyTorch and onnxruntime on the same input (informational)."""
    images = check_inputs(detector.config.image_size, batch, seed=7)
    session = _session(Path(onnx_path))
    feed = {INPUT_NAME: images.numpy()}
    model = detector.model.eval()
    images = images.to(_device(model))
    timings: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
    with torch.no_grad():
        model(images)
        session.run(None, feed)
        for _ in range(repeats):
            start = time.perf_counter()
            model(images)
            timings["torch"].append(time.perf_counter() - start)
            start = time.perf_counter()
            session.run(None, feed)
            timings["onnxruntime"].append(time.perf_counter() - start)
    return {k: float(np.median(v)) / batch for k, v in timings.items()}
