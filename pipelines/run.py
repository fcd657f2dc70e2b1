"""``pipelines run CONFIG``: generate -> filter -> fewshot -> classification -> decision -> realism -> report, cached.

A pipeline config (:class:`PipelineConfig`, e.g. ``configs/pipeline_toy.yaml``) names the data (an MVTec-layout
folder), the output folder, a top-level seed and one optional section per stage:

- ``generate``: a ``synth generate`` config without ``normal``/``out`` (the data's ``train/good`` and the stage
  folder). It makes the shared synthetic set that few-shot detection trains and calibrates with. Default method
  ``draem``: few-shot detection is evaluated on the data's real test defects, so the shared set must not be made
  from them; model-free methods (perlin, draem, cutpaste, ...) need none. Method ``paste`` therefore needs
  explicit ``masks``/``defects`` folders (a warning is logged when they lie inside the data folder).
- ``filter``: a ``synth filter`` config without ``generated``/``out``; ``real_defects`` defaults to the data.
- ``fewshot`` / ``classification``: a ``FewShotConfig`` / ``ClassificationConfig`` without ``data``.
- ``decision``: a ``pipelines.decision.DecisionConfig`` without ``data``: the k-shot decision table (every arm,
  k and repeat; it generates, filters and measures its own synthetic sets from the known defects only).
- ``realism``: ``true`` or options (:class:`RealismOptions`): KID and IC-LPIPS of every synthetic set.
- ``report``: options of the HTML report (:class:`ReportOptions`).

Caching: every stage runs in ``OUT/stages/<stage>-<hash12>``, where the hash covers the stage's own settings,
a fingerprint of its input folders (file names and sizes), its seed and the hashes of the stages it depends on,
so a changed ``generate`` section invalidates ``filter``, ``fewshot`` and ``realism`` but not ``classification``.
A stage's ``done.json`` (its result) is written atomically last; a rerun reuses every stage whose folder holds
one (the progress line says ``reused``), and a stage killed midway resumes inside the same folder (the
generators and pipelines cache their finished units). A new few-shot or classification folder starts from a copy
of the previous folder's ``work/`` (finished cells / classifiers under their own keys), so a changed model option
refits only that model. ``report.html`` and ``results.json`` are rewritten every run (cheap).

Stages: each is defined beside the module that does its work (``PIPELINE_STAGES`` in
``pipelines.synthetic_stages``, ``fewshot``, ``classification``, ``decision``, ``realism``; the types in
:mod:`pipelines.stage`); :data:`STAGE_DEFINITIONS` names them in run order and imports a stage's module when the
config enables it. This module is the engine: config loading, hashing, caching, resume and ``results.json``.

Seeds: each stage gets ``derive_seed(seed, stage)`` unless its section sets ``seed`` itself; both are recorded.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
import sys
import time
import zlib
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
from pydantic import BaseModel, Field, ValidationError, field_validator

from pipelines.stage import (
    LoadedConfig,
    Stage,
    StageContext,
    StagePlan,
    fewshot_uses_shared_set,
    fewshot_wants_shared,
    run_synthetic_sets,
    synthetic_set_of,
)
from synth.core.config import StrictModel, format_validation_error, read_yaml, validate_config
from synth.core.errors import ConfigError, InputError
from synth.core.io import read_json_if_exists, stable_hash, write_json

if TYPE_CHECKING:  # the stage modules are imported when their stage runs
    from pipelines.classification import ClassificationResult
    from pipelines.decision import DecisionResult
    from pipelines.fewshot import FewShotResult
    from pipelines.realism import RealismResult
    from pipelines.synthetic_stages import FilterResult, GenerateResult

logger = logging.getLogger(__name__)

__all__ = [
    "STAGES",
    "STAGE_DEFINITIONS",
    "PipelineConfig",
    "RealismOptions",
    "ReportOptions",
    "Stage",
    "StageContext",
    "StagePlan",
    "derive_seed",
    "load_pipeline_config",
    "plan_stages",
    "run_pipeline",
]

FORMAT = "pixelvision-pipeline/1"
DONE_FILE = "done.json"
DEFAULT_GENERATE_METHOD = "draem"


class RealismOptions(StrictModel):
    """Settings of the realism stage (``pipelines.realism.realism_metrics``)."""

    max_images: int = Field(200, ge=2, description="most images per side (seeded subsample); bounds CPU time")
    image_size: int = Field(224, ge=32, le=1024)
    backbone: str = "tf_efficientnet_lite0"
    crop_to_mask: bool = Field(True, description="compare defect crops instead of whole images")
    kid_subsets: int = Field(100, gt=0)
    kid_subset_size: int = Field(1000, gt=1)
    ic_lpips_max_pairs: int = Field(1000, gt=0)
    seed: int | None = Field(None, ge=0, description="default: derived from the top-level seed")


class ReportOptions(StrictModel):
    """Settings of ``report.html``."""

    samples: int = Field(8, ge=0, le=64, description="generated defects shown per synthetic set")
    title: str | None = None


class PipelineConfig(StrictModel):
    """One pipeline run (see the module docstring); sections left out (or null) are not run."""

    name: str = Field("pipeline", min_length=1)
    seed: int = Field(0, ge=0)
    data: Path = Field(description="MVTec-layout folder: train/good, test/<class>, ground_truth/<class>")
    out: Path = Field(description="output folder: stages/, report.html, results.json")
    generate: dict[str, Any] | None = None
    filter: dict[str, Any] | None = None
    fewshot: dict[str, Any] | None = None
    classification: dict[str, Any] | None = None
    decision: dict[str, Any] | None = None
    realism: RealismOptions | None = Field(None, description="true or options: measure every synthetic set")
    report: ReportOptions = Field(default_factory=ReportOptions)

    @field_validator("realism", mode="before")
    @classmethod
    def _realism_switch(cls, value: Any) -> Any:
        # ``realism: true`` means the default options; ``false`` switches the stage off.
        if value is True:
            return {}
        if value is False:
            return None
        return value


# --------------------------------------------------------------------------------------------------
# config loading and per-section validation
# --------------------------------------------------------------------------------------------------

def derive_seed(seed: int, stage: str) -> int:
    """A stage's seed from the top-level seed: independent per stage name, stable when stages are added."""
    state = np.random.SeedSequence([int(seed), zlib.crc32(stage.encode())]).generate_state(1, dtype=np.uint32)
    return int(state[0]) % 2**31


def _validate_section(model: type[BaseModel], data: dict[str, Any], *, source: str, section: str) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc, model=model, prefix=(section,))) from None


PLACEHOLDER = Path("__pipeline_stage__")


def _section_input(cfg: PipelineConfig, stage: str, seed: int) -> dict[str, Any]:
    """The section dict completed with what the runner owns (paths are placeholders until the stage runs)."""
    data = dict(getattr(cfg, stage) or {})
    if stage == "generate":
        data.setdefault("method", DEFAULT_GENERATE_METHOD)
        data.update(normal=cfg.data / "train" / "good", out=PLACEHOLDER)
    elif stage == "filter":
        data.setdefault("real_defects", cfg.data)
        data.update(generated=PLACEHOLDER, out=PLACEHOLDER)
    else:
        data["data"] = cfg.data
        if stage == "fewshot" and fewshot_wants_shared(cfg):
            data["synthetic_set"] = PLACEHOLDER  # validated as given, so rules about a given set apply
    data.setdefault("seed", seed)
    return data


def _check_sections(cfg: PipelineConfig, source: str) -> tuple[dict[str, BaseModel], dict[str, dict[str, Any]]]:
    sections: dict[str, BaseModel] = {}
    seeds: dict[str, dict[str, Any]] = {}
    for stage in STAGE_DEFINITIONS:
        raw = getattr(cfg, stage)
        # A section is a raw dict in PipelineConfig; realism is configured by the top-level config (already typed)
        # and its module, which imports torch and timm, is not needed to validate a config.
        if not isinstance(raw, dict):
            continue
        definition = STAGE_DEFINITIONS[stage]
        owned = [k for k in definition.runner_keys if k in raw]
        if owned:
            where = "the top-level 'data'" if owned == ["data"] else "the stage folder"
            raise ConfigError(f"{source}: key '{stage}.{owned[0]}': set by the pipeline ({where}); remove it.")
        seed = raw.get("seed", derive_seed(cfg.seed, stage))
        seeds[stage] = {"seed": seed, "from": "config" if "seed" in raw else "derived"}
        model = definition.section
        if "seed" not in model.model_fields:
            seeds[stage]["from"] = "unused"
        data = _section_input(cfg, stage, seed)
        if "seed" not in model.model_fields:
            data.pop("seed")
        sections[stage] = _validate_section(model, data, source=source, section=stage)
    if "filter" in sections and "generate" not in sections:
        raise ConfigError(f"{source}: key 'filter': filters the generated set; add a 'generate' section.")
    gen = sections.get("generate")
    if gen is not None and getattr(gen, "method", None) == "paste":
        if gen.masks is None:
            raise ConfigError(
                f"{source}: key 'generate.masks': method 'paste' needs real defect masks (<class>/<name>.png) and "
                f"their images ('generate.defects'). The pipeline does not take them from the data's test split, "
                f"which few-shot detection is evaluated on; give masks of other images, or use a model-free "
                f"method (perlin, draem, cutpaste).")
        if _inside(gen.masks, cfg.data) and "fewshot" in sections:
            logger.warning("generate.masks lies inside the data folder: few-shot numbers with synthetic anomalies "
                           "pasted from the evaluation defects are optimistic")
    if cfg.realism is not None:
        options = cfg.realism
        seed = options.seed if options.seed is not None else derive_seed(cfg.seed, "realism")
        seeds["realism"] = {"seed": seed, "from": "config" if options.seed is not None else "derived"}
    return sections, seeds


def _inside(path: Path, folder: Path) -> bool:
    a, b = Path(path).resolve(), Path(folder).resolve()
    return a == b or b in a.parents


def load_pipeline_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None, *,
                         data: dict[str, Any] | None = None) -> LoadedConfig:
    """Read a pipeline YAML (or take ``data``), apply non-None ``overrides`` and validate every section.

    Raises:
        ConfigError: naming the file and the key, e.g. ``key 'classification.n_per_class'``.
    """
    source = str(path) if path is not None else "arguments"
    raw = dict(data or {})
    text = None
    if path is not None:
        raw = read_yaml(path)
        text = Path(path).read_text(encoding="utf-8")
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    for key, what in (("data", "the MVTec-layout data folder"), ("out", "the output folder")):
        if raw.get(key) is None:
            raise ConfigError(f"{source}: key '{key}': required ({what}; or pass --{key}).")
    cfg = validate_config(PipelineConfig, raw, source=source)
    sections, seeds = _check_sections(cfg, source)
    return LoadedConfig(cfg, sections, seeds, source, text)


# --------------------------------------------------------------------------------------------------
# stage plan and hashing
# --------------------------------------------------------------------------------------------------

def folder_fingerprint(path: Path | None) -> str | None:
    """Hash of the file names and sizes under ``path``: changed input data changes the stage hashes.

    Sizes, not contents or times: cheap for thousands of files, and a copied dataset keeps its hashes.
    """
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        return f"file:{path.stat().st_size}"
    if not path.is_dir():
        return "missing"
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    for item in files:
        digest.update(f"{item.relative_to(path).as_posix()}\0{item.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def _stage_config(stage: str, loaded: LoadedConfig) -> dict[str, Any]:
    cfg = loaded.config
    section = loaded.sections.get(stage)
    if section is not None:
        settings = section.model_dump(mode="json")
        for key in (*STAGE_DEFINITIONS[stage].runner_keys, "generated"):
            settings.pop(key, None)
        if settings.get("synthetic_set") == str(PLACEHOLDER):
            settings["synthetic_set"] = None  # the shared set: covered by the dependency's hash
    elif stage == "realism" and cfg.realism is not None:
        settings = cfg.realism.model_dump(mode="json")
    else:
        settings = {}
    inputs = STAGE_DEFINITIONS[stage].inputs(section, cfg)
    return {"settings": settings,
            "inputs": {k: None if v is None else {"path": str(Path(v).resolve()), "files": folder_fingerprint(v)}
                       for k, v in inputs.items()}}


def enabled_stages(loaded: LoadedConfig) -> list[str]:
    """The stages this config runs, in order (``report`` always): those whose config key is set (not null)."""
    return [*(name for name in STAGE_DEFINITIONS if getattr(loaded.config, name) is not None), "report"]


def plan_stages(loaded: LoadedConfig) -> list[StagePlan]:
    """Hash and folder of every enabled stage but ``report`` (computed from configs alone, nothing runs)."""
    names = enabled_stages(loaded)
    enabled = set(names)
    plans: dict[str, StagePlan] = {}
    for index, stage in enumerate(names, start=1):
        if stage == "report":
            continue
        deps = {d: plans[d].hash for d in STAGE_DEFINITIONS[stage].depends(loaded, enabled)}
        seed = loaded.seeds.get(stage, {}).get("seed")
        config = _stage_config(stage, loaded)
        digest = stable_hash({"format": FORMAT, "stage": stage, "config": config, "seed": seed, "deps": deps})
        plans[stage] = StagePlan(stage, index, config, deps, seed, digest,
                                 loaded.config.out / "stages" / f"{stage}-{digest[:12]}")
    return list(plans.values())


class StageTable(MutableMapping[str, Stage]):
    """The stages in run order, by name; each defined beside its module (``PIPELINE_STAGES`` there) and imported
    when first looked up, so a config imports only the stages it enables. A set item replaces a stage (tests and
    extensions swap one); deleting it restores the module's definition."""

    def __init__(self, modules: Mapping[str, str]) -> None:
        self._modules = dict(modules)
        self._stages: dict[str, Stage] = {}

    def __getitem__(self, name: str) -> Stage:
        if name not in self._stages:
            module = importlib.import_module(self._modules[name])  # KeyError: not a stage
            self._stages[name] = module.PIPELINE_STAGES[name]
        return self._stages[name]

    def __setitem__(self, name: str, stage: Stage) -> None:
        if name not in self._modules:
            raise KeyError(f"{name!r} is not a pipeline stage; stages: {', '.join(self._modules)}")
        self._stages[name] = stage

    def __delitem__(self, name: str) -> None:
        self._stages.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


STAGE_DEFINITIONS = StageTable({
    "generate": "pipelines.synthetic_stages",
    "filter": "pipelines.synthetic_stages",
    "fewshot": "pipelines.fewshot",
    "classification": "pipelines.classification",
    "decision": "pipelines.decision",
    "realism": "pipelines.realism",
})
"""The stages in run order. Looked up at run time, so tests (and extensions) can swap a stage."""
STAGES = (*STAGE_DEFINITIONS, "report")


# --------------------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------------------

@dataclass
class StageOutcome:
    status: str  # "ran" | "reused"
    elapsed_s: float
    result: dict[str, Any] = field(default_factory=dict)


def _read_done(plan: StagePlan) -> dict[str, Any] | None:
    try:
        done = read_json_if_exists(plan.dir / DONE_FILE)
    except InputError:
        logger.warning("%s: unreadable; rerunning the stage", plan.dir / DONE_FILE)
        return None
    if isinstance(done, dict) and done.get("hash") == plan.hash and done.get("stage") == plan.name:
        return done
    return None


def warm_start(plan: StagePlan) -> Path | None:
    """Copy ``work/`` of the most recently changed other folder of this stage into a fresh stage folder."""
    work = plan.dir / "work"
    if not STAGE_DEFINITIONS[plan.name].warm or work.exists():
        return None
    siblings = [p for p in plan.dir.parent.glob(f"{plan.name}-*") if p != plan.dir and (p / "work").is_dir()]
    if not siblings:
        return None
    source = max(siblings, key=lambda p: ((p / DONE_FILE).exists(), (p / "work").stat().st_mtime_ns))
    staging = plan.dir / ".work.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(source / "work", staging, ignore=shutil.ignore_patterns(".*.tmp"))
        staging.rename(work)
    except OSError as exc:  # a warm start is an optimisation: fall back to a cold one
        logger.warning("could not copy %s (%s); starting %s from scratch", source / "work", exc, plan.name)
        shutil.rmtree(staging, ignore_errors=True)
        return None
    return source


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def run_stage(plan: StagePlan, loaded: LoadedConfig, deps: dict[str, dict[str, Any]], *, total: int,
              progress: bool = True) -> StageOutcome:
    """Reuse the stage's ``done.json`` when present, else run it and write ``done.json`` last."""
    where = os.path.relpath(plan.dir, loaded.config.out)
    prefix = f"[{plan.index}/{total}] {plan.name}"
    done = _read_done(plan)
    if done is not None:
        _say(f"{prefix}: reused ({where})", not progress)
        return StageOutcome("reused", float(done.get("elapsed_s", 0.0)), done["result"])
    _say(f"{prefix}: running ({where})", not progress)
    plan.dir.mkdir(parents=True, exist_ok=True)
    seeded = warm_start(plan)
    if seeded is not None:
        _say(f"{prefix}: finished units of {os.path.relpath(seeded, loaded.config.out)} copied in; the pipeline "
             f"reuses those whose keys still match", not progress)
    started = time.perf_counter()
    result = STAGE_DEFINITIONS[plan.name].run(StageContext(plan, loaded, deps, progress))
    elapsed = round(time.perf_counter() - started, 3)
    write_json(plan.dir / DONE_FILE, {"format": FORMAT, "stage": plan.name, "hash": plan.hash, "deps": plan.deps,
                                      "seed": plan.seed, "config": plan.config, "elapsed_s": elapsed,
                                      "result": result})
    _say(f"{prefix}: done in {elapsed:.1f} s", not progress)
    return StageOutcome("ran", elapsed, result)


def _effective_sections(loaded: LoadedConfig, plans: dict[str, StagePlan],
                        results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each section's settings as its stage ran them: defaults filled in, the runner's paths in place."""
    out = {}
    for stage, section in loaded.sections.items():
        settings = section.model_dump(mode="json")
        if stage in ("generate", "filter"):
            settings["out"] = str(plans[stage].dir / "set")
        if stage == "filter":
            settings["generated"] = (results.get("generate") or {}).get("set")
        shared = synthetic_set_of(results)
        if stage == "fewshot" and shared is not None and fewshot_uses_shared_set(loaded):
            settings["synthetic_set"] = str(shared[1])
        out[stage] = settings
    return out


class RunResult(TypedDict, total=False):
    """``results.json``: the run's settings, each stage's status and typed result (None when it did not run),
    and ``report`` (the path of ``report.html``, in the returned dict only)."""

    format: str  # FORMAT
    name: str
    data: str
    out: str
    config_source: str
    config_text: str | None
    config: dict[str, Any]
    sections: dict[str, Any]  # each stage's effective settings
    seeds: dict[str, Any]
    stages: dict[str, dict[str, Any]]  # status, hash, folder, elapsed_s, seed, deps
    synthetic_sets: dict[str, str]  # label -> folder of every synthetic set of the run
    report_options: dict[str, Any]
    generate: GenerateResult | None
    filter: FilterResult | None
    fewshot: FewShotResult | None
    classification: ClassificationResult | None
    decision: DecisionResult | None
    realism: RealismResult | None
    report: str


def run_pipeline(loaded: LoadedConfig, *, progress: bool = True) -> RunResult:
    """Run (or reuse) every enabled stage, write ``report.html`` and ``results.json``; returns the result dict.

    The returned dict is what ``results.json`` holds, plus ``report`` (the path of ``report.html``).
    """
    from pipelines.report import write_report

    cfg = loaded.config
    if not cfg.data.is_dir():
        what = "is a file, not a folder" if cfg.data.exists() else "data folder not found"
        raise InputError(f"{cfg.data}: {what}; set 'data' (or --data) to an MVTec-layout folder "
                         f"(train/good, test/<class>, ground_truth/<class>).")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise InputError(f"{cfg.out}: 'out' exists and is a file; set 'out' (or --out) to a folder.")
    cfg.out.mkdir(parents=True, exist_ok=True)
    names = enabled_stages(loaded)
    plans = plan_stages(loaded)
    results: dict[str, dict[str, Any]] = {}
    stages: dict[str, dict[str, Any]] = {}
    for plan in plans:
        deps = {d: results[d] for d in plan.deps}
        outcome = run_stage(plan, loaded, deps, total=len(names), progress=progress)
        results[plan.name] = outcome.result
        stages[plan.name] = {"status": outcome.status, "hash": plan.hash[:12], "dir": str(plan.dir),
                             "elapsed_s": outcome.elapsed_s, "seed": plan.seed, "deps": sorted(plan.deps)}
    for stage in STAGES[:-1]:
        stages.setdefault(stage, {"status": "not run"})

    sets = {label: str(path) for label, path in run_synthetic_sets(results).items()}
    result: RunResult = {
        "format": FORMAT,
        "name": cfg.name,
        "data": str(cfg.data),
        "out": str(cfg.out),
        "config_source": loaded.source,
        "config_text": loaded.text,
        "config": cfg.model_dump(mode="json"),
        "sections": _effective_sections(loaded, {p.name: p for p in plans}, results),
        "seeds": {"seed": cfg.seed, "stages": loaded.seeds},
        "stages": stages,
        "synthetic_sets": sets,
        "report_options": cfg.report.model_dump(mode="json"),
        **{stage: results.get(stage) for stage in STAGES[:-1]},
    }
    _say(f"[{len(names)}/{len(names)}] report: writing", not progress)
    path = write_report(result, cfg.out)
    result["report"] = str(path)
    return result
