"""timm-style registry: ``create("patchcore", **config)``, ``list_models()``, ``load(path)``.

Models register themselves with ``@register``; every ``detect/models/<paradigm>/<model>/`` package is
imported on first use, so adding a model needs no central list.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import pkgutil
from pathlib import Path
from typing import Any

from detect.base import Detector, set_model_lister
from detect.persistence import WEIGHTS_FILE, read_detector_record, read_weights
from synth.core.errors import InputError

logger = logging.getLogger(__name__)

_REGISTRY: dict[str, type[Detector]] = {}
# Model packages that failed to import (e.g. an optional dependency such as open_clip is not installed):
# package name -> error. The other models stay usable; asking for a broken one re-raises its error.
_IMPORT_ERRORS: dict[str, str] = {}
_discovered = False


def register(cls: type[Detector]) -> type[Detector]:
    """Class decorator adding a Detector subclass under its ``name``."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} needs a non-empty 'name'")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"detector name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    import detect.models as models

    for info in pkgutil.walk_packages(models.__path__, prefix="detect.models."):
        if info.name.count(".") == 3 and info.ispkg:  # detect.models.<paradigm>.<model>
            try:
                importlib.import_module(info.name)
            except Exception as exc:  # noqa: BLE001 - reported per model; tests assert there are none
                _IMPORT_ERRORS[info.name.rsplit(".", 1)[1]] = f"{type(exc).__name__}: {exc}"
                logger.warning("detector package %s could not be imported (%s); the other models are usable",
                               info.name, exc)
    _discovered = True


def list_models(paradigm: str | None = None) -> list[str]:
    """Registered model names, optionally of one paradigm (memory, flow, distillation, ...)."""
    _discover()
    return sorted(n for n, c in _REGISTRY.items() if paradigm is None or c.paradigm == paradigm)


def get_model_class(name: str) -> type[Detector]:
    _discover()
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY and key in _IMPORT_ERRORS:
        raise InputError(f"model {name!r} could not be imported: {_IMPORT_ERRORS[key]}. Install its optional "
                         f"dependencies (e.g. pip install 'pixelvision[clip]' for winclip).")
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise InputError(f"unknown model {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[key]


def create(name: str, **config: Any) -> Detector:
    """A new, unfitted detector: ``create("patchcore", image_size=224, coreset_ratio=0.1)``."""
    return get_model_class(name)(**config)


def load(path: str | Path) -> Detector:
    """Load a detector saved with ``Detector.save`` (safetensors + JSON; nothing is unpickled)."""
    path = Path(path)
    meta = read_detector_record(path)
    detector = get_model_class(meta["model"])(_loading=True, **meta["config"])
    detector.load_tensors(read_weights(path / WEIGHTS_FILE))
    if meta.get("calibration"):
        from detect.threshold import Calibration

        detector.calibration = Calibration.from_dict(meta["calibration"])
    detector.fitted = True
    return detector


def _models_with_anomalies() -> list[str]:
    return [name for name in list_models() if get_model_class(name).supports_anomalies]


set_model_lister(_models_with_anomalies)
