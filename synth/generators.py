"""The one generator contract: what a defect generator is, what it returns, and the registry that names them.

A generator is a callable ``(normal uint8 HxWx3, np.random.Generator) -> GeneratedDefect``. Each one registers
itself beside its code with :func:`register_generator` (as detectors do with ``detect.register``) and gives up
to two builders:

- ``from_config(cfg, skipped)``: the generator ``synth generate`` runs for a validated
  :class:`synth.config.GenerateConfig` (``method_params``, masks / defects folders, blend, ...);
- ``from_kwargs(**kwargs)``: the generator the albumentations / torchvision transforms, the detectors'
  synthetic validation and the pipelines build by name (:func:`make_generator`); None where a generator only
  runs inside ``synth generate`` (the diffusion generators need a trained model folder).

``synth generate --method``, the config's ``method`` validation, :func:`synth.transforms.make_augmenter` and the
pipelines all read :func:`generator_names`, so a generator registered in a new module is usable everywhere once
its module is listed in ``GENERATOR_MODULES``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from synth.core.errors import InputError

if TYPE_CHECKING:
    from synth.config import GenerateConfig

logger = logging.getLogger(__name__)

# Modules whose import registers generators, in the order ``generator_names`` lists them. Their top-level
# imports are light (diffusers and open_clip load only when a diffusion generator is built).
GENERATOR_MODULES = ("synth.augment", "synth.paste", "synth.diffusion.pipeline_controlnet_inpaint",
                     "synth.diffusion.pipeline_csm")


@dataclass
class GeneratedDefect:
    """What every generator returns for one image: the new image, its defect mask, the class and the draws.

    image: uint8 HxWx3 (a new array, never the input); mask: bool HxW, all False when nothing was added;
    defect_class: the class label ("normal" / "good" when nothing was added); params: JSON-serialisable
    sampling parameters (augmenters always record ``augmenter``, ``label`` and ``has_anomaly``).
    """

    image: np.ndarray
    mask: np.ndarray
    defect_class: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def has_anomaly(self) -> bool:
        """True when a defect was added (the mask is non-empty)."""
        return bool(self.params.get("has_anomaly", self.mask.any()))

    @property
    def label(self) -> str:
        """The class label (the same as ``defect_class``)."""
        return self.defect_class


class DefectGenerator(Protocol):
    """``generator(image, rng) -> GeneratedDefect``; the same rng state gives the same defect."""

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> GeneratedDefect: ...


ConfigBuilder = Callable[["GenerateConfig", list[str]], DefectGenerator]


@dataclass(frozen=True)
class GeneratorSpec:
    """One registered generator: its name, its builders and whether it needs real defect masks."""

    name: str
    from_config: ConfigBuilder
    from_kwargs: Callable[..., DefectGenerator] | None = None
    needs_masks: bool = False
    # True for generators that hold a model (and maybe a GPU): synth generate runs them in one process each
    # (spread them over machines with accelerate launch) instead of forking workers.
    single_process: bool = False
    summary: str = ""


_REGISTRY: dict[str, GeneratorSpec] = {}
_IMPORT_ERRORS: dict[str, str] = {}
_discovered = False


def register_generator(name: str, *, from_config: ConfigBuilder, from_kwargs: Callable[..., DefectGenerator] | None
                       = None, needs_masks: bool = False, single_process: bool = False, summary: str = ""
                       ) -> GeneratorSpec:
    """Add a generator under ``name`` (re-registering the same builders is a no-op, another one an error)."""
    spec = GeneratorSpec(name, from_config, from_kwargs, needs_masks, single_process, summary)
    known = _REGISTRY.get(name)
    if known is not None:
        if (known.from_config, known.from_kwargs) != (from_config, from_kwargs):
            raise TypeError(f"generator name {name!r} registered twice")
        return known
    _REGISTRY[name] = spec
    return spec


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for module in GENERATOR_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as exc:  # an optional dependency is missing: the other generators stay usable
            _IMPORT_ERRORS[module] = f"{type(exc).__name__}: {exc}"
            logger.warning("generator module %s could not be imported (%s)", module, exc)


def _listing_order(spec: GeneratorSpec) -> int:
    module = spec.from_config.__module__
    return GENERATOR_MODULES.index(module) if module in GENERATOR_MODULES else len(GENERATOR_MODULES)


def generator_names() -> tuple[str, ...]:
    """Names of every registered generator, in ``GENERATOR_MODULES`` order (whatever was imported first)."""
    _discover()
    return tuple(sorted(_REGISTRY, key=lambda name: _listing_order(_REGISTRY[name])))


def check_generator_name(name: str) -> str:
    """``name`` if a generator is registered under it, else ValueError (for pydantic validators of ``method``)."""
    names = generator_names()
    if name not in names:
        raise ValueError(f"unknown generate method; choose one of {list(names)}")
    return name


def get_generator(name: str) -> GeneratorSpec:
    """The registered generator ``name``; an unknown name lists the known ones."""
    _discover()
    if name not in _REGISTRY:
        broken = f" (modules that failed to import: {_IMPORT_ERRORS})" if _IMPORT_ERRORS else ""
        raise InputError(f"unknown generator {name!r}; choose one of {sorted(_REGISTRY)}{broken}.")
    return _REGISTRY[name]


def transform_generator_names() -> list[str]:
    """The generators buildable by name outside ``synth generate`` (:func:`make_generator`)."""
    return sorted(name for name in generator_names() if _REGISTRY[name].from_kwargs is not None)


def make_generator(name: str, **kwargs: Any) -> DefectGenerator:
    """A generator built by name with keyword arguments (transforms, detectors' synthetic validation, pipelines)."""
    _discover()
    spec = _REGISTRY.get(name)
    if spec is None:
        raise InputError(f"unknown generator {name!r}; choose one of {transform_generator_names()}.")
    if spec.from_kwargs is None:
        raise InputError(f"generator {name!r} runs only in `synth generate` (it needs a trained model folder in "
                         f"method_params); in a transform choose one of {transform_generator_names()}.")
    return spec.from_kwargs(**kwargs)


def build_generator(cfg: GenerateConfig, skipped: list[str] | None = None) -> DefectGenerator:
    """The per-image generator ``synth generate`` runs for ``cfg.method`` (see ``GenerateConfig``)."""
    return get_generator(cfg.method).from_config(cfg, [] if skipped is None else skipped)


def method_params_error(method: str, target: Callable[..., Any], exc: Exception) -> InputError:
    """One message for a method_params entry the generator refuses: an unknown key (TypeError) or a bad value."""
    skip = {"exemplars", "blend_mode", "foreground"}  # set by synth generate itself, not method_params
    valid = ", ".join(p for p in inspect.signature(target).parameters if p not in skip)
    hint = f"; valid keys: {valid}" if isinstance(exc, TypeError) else ""
    return InputError(f"method_params for {method!r}: {exc}{hint} (--set KEY=VALUE or method_params: in the config).")
