"""What a ``pipelines run`` stage is: :class:`Stage` (its definition), :class:`StagePlan`, :class:`StageContext`.

Every stage is defined beside the module that does its work, as ``PIPELINE_STAGES = {name: Stage(...)}``
(``pipelines.synthetic_stages``: generate, filter; ``pipelines.fewshot``, ``pipelines.classification``,
``pipelines.decision``, ``pipelines.realism``). The engine in :mod:`pipelines.run` plans, hashes, caches and
resumes them all alike and imports a stage's module only when the config enables the stage (the stage modules
pull in torch and timm). This module is light on purpose: the stage modules and the engine both import it, so
it imports neither.

The shared synthetic set: a ``generate`` section (and its ``filter``) makes one set that the runner hands to the
few-shot stage and the realism stage measures; the helpers at the end decide from the config alone who reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:  # the engine's config model; imported for annotations only (pipelines.run imports this module)
    from pipelines.run import PipelineConfig

__all__ = [
    "LoadedConfig",
    "Stage",
    "StageContext",
    "StagePlan",
    "fewshot_makes_own_set",
    "fewshot_uses_shared_set",
    "fewshot_wants_shared",
    "run_synthetic_sets",
    "shared_set_stage",
    "synthetic_set_of",
]


@dataclass
class LoadedConfig:
    """A validated pipeline config, the typed config of each enabled section and the file it came from."""

    config: PipelineConfig
    sections: dict[str, BaseModel]
    seeds: dict[str, dict[str, Any]]
    source: str
    text: str | None = None


@dataclass
class StagePlan:
    """One enabled stage: what its hash covers, the stages it depends on, and where it runs."""

    name: str
    index: int
    config: dict[str, Any]
    deps: dict[str, str]
    seed: int | None
    hash: str
    dir: Path


@dataclass
class StageContext:
    """What a stage function gets: its plan, the loaded config, the results of the stages it depends on."""

    plan: StagePlan
    loaded: LoadedConfig
    deps: dict[str, dict[str, Any]]
    progress: bool = True

    @property
    def cfg(self) -> PipelineConfig:
        return self.loaded.config

    @property
    def section(self) -> Any:
        return self.loaded.sections.get(self.plan.name)


def data_input(section: BaseModel | None, cfg: PipelineConfig) -> dict[str, Path | None]:
    """The default input of a stage: the pipeline's data folder."""
    return {"data": cfg.data}


def no_dependencies(loaded: LoadedConfig, enabled: set[str]) -> list[str]:
    return []


@dataclass(frozen=True)
class Stage:
    """One stage of ``pipelines run``: its config section, its inputs, the stages it reads, and its function.

    The engine (:func:`pipelines.run.plan_stages`, :func:`pipelines.run.run_stage`) treats every stage alike: the
    hash covers the section's settings, the fingerprints of ``inputs``, the seed and the hashes of ``depends``;
    the result is cached in ``done.json``.

    run: the stage function, ``StageContext -> result dict`` (stored in ``done.json`` and results.json).
    section: the pydantic model of the stage's config section; None for a stage configured by the top-level
        config (``realism``).
    runner_keys: section keys the runner fills in itself (a user value would silently fight the runner's layout).
    inputs: the folders whose file fingerprints enter the hash (``section, config -> {name: path}``).
    depends: the stages whose results the stage reads (``loaded config, enabled stages -> names``).
    warm: the stage's pipeline caches finished units under ``work/`` by their own keys (few-shot cells,
        classifiers): a new stage folder starts from a copy of the latest sibling's ``work/``, so a changed
        section recomputes only the units it affects. A copy, not links: the pipelines append to manifests.
    """

    run: Callable[[StageContext], Mapping[str, Any]]
    section: type[BaseModel] | None = None
    runner_keys: tuple[str, ...] = ()
    inputs: Callable[[Any, PipelineConfig], dict[str, Path | None]] = data_input
    depends: Callable[[LoadedConfig, set[str]], list[str]] = no_dependencies
    warm: bool = False


# --------------------------------------------------------------------------------------------------
# the shared synthetic set
# --------------------------------------------------------------------------------------------------

def synthetic_set_of(deps: Mapping[str, Mapping[str, Any]]) -> tuple[str, Path] | None:
    """(label, folder) of the shared synthetic set: the filtered one when the filter ran, else the generated."""
    for stage in ("filter", "generate"):
        if stage in deps and deps[stage].get("set"):
            return f"{stage}:{deps[stage].get('method', '')}".rstrip(":"), Path(deps[stage]["set"])
    return None


def shared_set_stage(enabled: set[str]) -> str:
    """The stage whose result is the shared set."""
    return "filter" if "filter" in enabled else "generate"


def fewshot_wants_shared(cfg: PipelineConfig) -> bool:
    """From the raw config: a shared set exists and the few-shot section neither names nor makes its own."""
    raw = cfg.fewshot or {}
    modes = raw.get("synthetic", ["threshold"])
    return (cfg.generate is not None and "synthetic_set" not in raw and raw.get("synthetic_from") != "shots"
            and isinstance(modes, list) and any(mode != "none" for mode in modes))


def fewshot_uses_shared_set(loaded: LoadedConfig) -> bool:
    """Whether the runner hands the shared (generated or filtered) set to the few-shot stage.

    Not when the few-shot section names its own ``synthetic_set`` (even null), makes one set per shot subset
    (``synthetic_from: shots``) or compares no synthetic mode.
    """
    return "fewshot" in loaded.sections and "generate" in loaded.sections and fewshot_wants_shared(loaded.config)


def fewshot_makes_own_set(loaded: LoadedConfig) -> bool:
    """Whether the few-shot stage generates one synthetic set of its own (shown in the report, measured)."""
    section = loaded.sections.get("fewshot")
    if section is None or fewshot_uses_shared_set(loaded):
        return False
    return (getattr(section, "synthetic_set", None) is None and getattr(section, "synthetic_from", "pool") == "pool"
            and any(mode != "none" for mode in getattr(section, "synthetic", [])))


def run_synthetic_sets(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Path]:
    """Every synthetic set of a run, by label: the shared (filtered) set, the few-shot stage's own set (when it
    made one) and the classification sets. The realism stage measures them; ``results.json`` lists them."""
    sets: dict[str, Path] = {}
    shared = synthetic_set_of(results)
    if shared is not None:
        sets[shared[0]] = shared[1]
    fewshot = results.get("fewshot") or {}
    own = fewshot.get("synthetic_set")
    if own and (Path(own) / "manifest.jsonl").is_file() and Path(own) not in sets.values():
        method = (fewshot.get("config") or {}).get("synthetic_method", "")
        sets[f"fewshot:{method}".rstrip(":")] = Path(own)
    for name, path in ((results.get("classification") or {}).get("generated_sets") or {}).items():
        sets[f"classification:{name}"] = Path(path)
    return sets
