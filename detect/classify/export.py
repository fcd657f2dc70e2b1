"""ONNX export of a saved defect-class classifier, verified against PyTorch with onnxruntime.

The graph is the classifier's whole inference (``ClassifierModel`` + softmax): input ``image`` (N, 3, S, S) RGB in
[0, 1], output ``probabilities`` (N, C) over the classes listed in the metadata (``classifier_export.json`` beside
the file and the ONNX ``metadata_props`` entry ``pixelvision``). As for ``detect export``, the file is written to a
temporary name, checked on deterministic images at two batch sizes (max |onnx - torch| <= ``rtol``; probabilities
are in [0, 1], so the tolerance is absolute), and only then renamed into place.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from detect.classify.classifier import DefectClassifier
from detect.export import DEFAULT_OPSET, ExportCheckError, _quiet_export, _session, check_inputs, require_runtime
from synth.core.errors import ConfigError, InputError
from synth.core.io import write_json

__all__ = ["METADATA_FILE", "export_classifier_onnx"]

METADATA_FILE = "classifier_export.json"
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
DEFAULT_RTOL = 1e-4


class _WithSoftmax(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(images), dim=1)


def _check(module: nn.Module, path: Path, image_size: int, rtol: float) -> dict[str, Any]:
    session = _session(path)
    runs = []
    for i, batch in enumerate((3, 1)):
        images = check_inputs(image_size, batch, seed=i)
        with torch.no_grad():
            expected = module(images).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy().astype(np.float32)})[0]
        if got.shape != expected.shape:
            raise ExportCheckError(f"{path}: onnxruntime output shape {got.shape} differs from PyTorch's "
                                   f"{expected.shape} (batch {batch}).")
        runs.append({"batch": batch, "max_abs_diff": float(np.abs(got.astype(np.float64) - expected).max())})
    worst = max(r["max_abs_diff"] for r in runs)
    if not worst <= rtol:
        raise ExportCheckError(f"the classifier's ONNX graph does not reproduce PyTorch: max |diff| of the "
                               f"probabilities {worst:.3g} > tolerance {rtol:g}.")
    return {"rtol": rtol, "runs": runs, "max_abs_diff": worst}


def export_classifier_onnx(model_dir: str | Path, out_path: str | Path | None = None, *,
                           opset: int = DEFAULT_OPSET, check: bool = True, rtol: float = DEFAULT_RTOL) -> Path:
    """Export the classifier saved in ``model_dir`` to ONNX (default ``MODEL_DIR/model.onnx``); returns the path."""
    if not 7 <= int(opset) <= 23:
        raise ConfigError(f"opset {opset}: choose an ONNX opset between 7 and 23 (default {DEFAULT_OPSET}).")
    out = Path(out_path) if out_path is not None else Path(model_dir) / "model.onnx"
    if out.suffix.lower() != ".onnx":
        raise InputError(f"{out}: the output file name must end in .onnx.")
    require_runtime()
    classifier = DefectClassifier.load(model_dir)
    assert classifier.model is not None
    module = _WithSoftmax(classifier.model).eval()
    size = classifier.config.image_size
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        with torch.no_grad(), _quiet_export():
            torch.onnx.export(module, (check_inputs(size, 2, seed=12345),), str(tmp), input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], opset_version=int(opset), dynamo=False,
                              do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        report = _check(module, tmp, size, rtol) if check else None
        import onnx

        metadata = {"kind": "defect-classifier", "onnx_file": out.name, "classes": classifier.classes,
                    "image_size": size, "inputs": [{"name": INPUT_NAME, "shape": ["N", 3, size, size],
                                                    "layout": "NCHW, RGB", "range": [0.0, 1.0]}],
                    "outputs": [{"name": OUTPUT_NAME, "shape": ["N", len(classifier.classes)],
                                 "meaning": "class probabilities, in the order of 'classes'"}],
                    "preprocessing": f"resize to {size}x{size}, RGB, uint8 / 255; normalisation is inside the graph",
                    "config": classifier.config.model_dump(mode="json"), "opset": int(opset), "check": report,
                    "versions": {"torch": torch.__version__, "onnx": onnx.__version__}}
        model = onnx.load(str(tmp))
        entry = model.metadata_props.add()
        entry.key, entry.value = "pixelvision", json.dumps(metadata, sort_keys=True)
        onnx.save(model, str(tmp))
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    write_json(out.parent / METADATA_FILE, metadata)
    return out
