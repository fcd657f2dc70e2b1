"""Saved models: one folder holding a JSON record (name, config, calibration, ...) and ``model.safetensors`` (every
tensor of the module, memory banks and statistics included). Writes are atomic file by file; reads never unpickle
anything and turn every unreadable or mismatched file into one InputError naming it and the fix.

Detectors (``Detector.save`` / ``detect.load``) and the defect classifier use these functions; the registry adds
only the model-class lookup, so this module imports neither of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from synth.core.errors import InputError
from synth.core.io import write_json

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_module_weights(module: nn.Module, path: Path) -> None:
    """Every tensor of ``module`` (parameters and buffers) as safetensors, written atomically to ``path``."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def write_model_folder(path: Path, module: nn.Module, record: dict[str, Any], *, record_file: str = CONFIG_FILE,
                       weights_file: str = WEIGHTS_FILE) -> Path:
    """The weights first, then the record: a folder with a record always has its weights."""
    save_module_weights(module, path / weights_file)
    write_json(path / record_file, record)
    return path


def read_weights(path: Path, *, fix: str = "re-save the model") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing or corrupt one is an InputError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: corrupted weights file ({exc}); {fix}.") from None


def load_state_with_buffers(model: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Load a state dict whose data-dependent buffers (memory banks, statistics) may differ in shape from the
    freshly built ``model``; parameters must match. ``what`` names the model in errors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise InputError(f"{what}: saved weights do not match the model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}); was it saved by another model or version?")
    for key, value in tensors.items():
        if own[key].shape != value.shape:
            module_name, _, leaf = key.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            if leaf not in module._buffers:
                raise InputError(f"{what}: parameter {key} has shape {tuple(value.shape)} in the file "
                                 f"but {tuple(own[key].shape)} in the model built from config.json.")
            module._buffers[leaf] = torch.empty_like(value)
    model.load_state_dict(tensors, strict=True)
    model.eval()


def read_detector_record(path: Path) -> dict[str, Any]:
    """``config.json`` of a saved detector folder (model name, config, calibration), checked."""
    import json

    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for required in (config_path, weights_path):
        if not required.is_file():
            raise InputError(f"{required}: missing; {path} is not a saved model folder (detect fit --out ...).")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
        meta["model"], meta["config"]  # noqa: B018 - both keys are required
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{config_path}: corrupted model config ({exc}); re-save the model.") from None
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise InputError(f"{config_path}: saved by a newer PixelVision (format {meta['format_version']}).")
    return meta
