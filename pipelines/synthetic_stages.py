"""The ``generate`` and ``filter`` stages of ``pipelines run``: ``synth generate`` / ``synth filter`` in a stage folder.

They make the run's shared synthetic set (see :mod:`pipelines.stage`). Defined here, not in ``synth``: synth is
a floor below pipelines and does not know about stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from pipelines.stage import Stage, StageContext
from synth.config import GenerateConfig
from synth.filter import FilterConfig, filter_defect_set
from synth.generate import generate

if TYPE_CHECKING:
    from pipelines.run import PipelineConfig

__all__ = ["PIPELINE_STAGES", "FilterResult", "GenerateResult"]


class GenerateResult(TypedDict):
    """What the generate stage records (``done.json``, ``results.json["generate"]``)."""

    set: str  # the labeled defect set's folder
    method: str
    n: int
    seed: int
    defect_samples: int
    defect_classes: list[str]
    generated: int  # samples written by the last run (a resumed run writes fewer)
    resumed_from: int
    skipped_files: list[Any]


class FilterResult(TypedDict):
    """What the filter stage records."""

    set: str  # the kept defects' folder
    method: str | None  # the generate stage's method
    candidates: int
    stage1_kept: int
    kept: int
    embedder: str
    real_defects: str
    skipped_files: list[Any]


def stage_generate(ctx: StageContext) -> GenerateResult:
    section = ctx.section.model_copy(update={"out": ctx.plan.dir / "set"})
    report = generate(section, progress=ctx.progress)
    dataset = report.dataset
    anomalous = dataset.select(anomalous=True)
    return {"set": str((ctx.plan.dir / "set").resolve()), "method": section.method, "n": section.n,
            "seed": section.seed, "defect_samples": len(anomalous), "defect_classes": dataset.defect_classes,
            "generated": report.generated, "resumed_from": report.resumed_from,
            "skipped_files": report.skipped_files}


def stage_filter(ctx: StageContext) -> FilterResult:
    generated = ctx.deps["generate"]
    section = ctx.section.model_copy(update={"generated": Path(generated["set"]), "out": ctx.plan.dir / "set"})
    report = filter_defect_set(section, progress=ctx.progress)
    return {"set": str((ctx.plan.dir / "set").resolve()), "method": generated.get("method"),
            "candidates": report.candidates, "stage1_kept": report.stage1_kept, "kept": report.kept,
            "embedder": report.embedder, "real_defects": str(section.real_defects),
            "skipped_files": report.skipped_files}


def _generate_inputs(section: Any, cfg: PipelineConfig) -> dict[str, Path | None]:
    return {"normal": section.normal, "masks": section.masks, "defects": section.defects,
            "anomaly_source": section.anomaly_source}


def _filter_inputs(section: Any, cfg: PipelineConfig) -> dict[str, Path | None]:
    return {"real_defects": section.real_defects, "normals": section.normals}


PIPELINE_STAGES: dict[str, Stage] = {
    "generate": Stage(stage_generate, GenerateConfig, ("normal", "out"), _generate_inputs),
    "filter": Stage(stage_filter, FilterConfig, ("generated", "out"), _filter_inputs,
                    lambda loaded, enabled: ["generate"]),
}
