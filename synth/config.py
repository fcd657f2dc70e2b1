"""The settings of ``synth generate`` (``configs/generate_*.yaml``), validated like every config
(:mod:`synth.core.config`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from synth.core.config import StrictModel
from synth.core.io import DEFAULT_PNG_COMPRESSION


class GenerateConfig(StrictModel):
    """Settings of ``synth generate`` (each key is also a CLI flag; the flag wins)."""

    normal: Path = Field(description="folder of defect-free images")
    out: Path = Field(description="output folder: the labeled defect set")
    method: str = Field("perlin", description="a registered generator (synth.generators.generator_names())")
    n: int = Field(100, gt=0, description="number of defect samples to generate")
    seed: int = Field(0, ge=0)
    masks: Path | None = Field(None, description="real defect masks for method 'paste' (<class>/<name>.png)")
    defects: Path | None = Field(None, description="the defect images the masks belong to (same names)")
    anomaly_source: Path | None = Field(None, description="texture folder for DRAEM (e.g. DTD); default: self")
    blend: Literal["alpha", "poisson", "texture"] = "alpha"
    foreground: Literal["auto", "object", "texture"] = "auto"
    normal_match: Literal["any", "exemplar"] = Field(
        "any", description="method paste: 'any' cycles through the normals in a seeded order; 'exemplar' draws "
        "them in proportion to how much they resemble the defects' source images (synth.context)")
    defect_class: str | None = Field(None, description="class label for perlin/draem/cutpaste samples")
    copy_normals: bool = Field(True, description="copy the normal images into train/good")
    strict: bool = Field(False, description="fail on the first unreadable file instead of skipping it")
    preview: int = Field(16, ge=0, le=256, description="samples shown in preview.png")
    png_compression: int = Field(DEFAULT_PNG_COMPRESSION, ge=0, le=9, description="zlib level of the written "
                                 "PNGs (0-9, all lossless): 1 encodes 4-8x faster than PIL's default 6 for ~14 % "
                                 "more bytes")
    workers: int | None = Field(None, ge=1, description="processes that generate in parallel (same bytes for any "
                                "number); default: all cores (shared among processes launched on one machine)")
    method_params: dict[str, Any] = Field(default_factory=dict, description="extra generator arguments")

    @field_validator("method")
    @classmethod
    def _registered_method(cls, method: str) -> str:
        from synth.generators import check_generator_name  # the generators import this module

        return check_generator_name(method)
