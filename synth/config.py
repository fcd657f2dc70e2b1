"""Typed YAML configuration: files in configs/ are validated into pydantic models.

A bad value gives one :class:`~synth.errors.ConfigError` that names the file, the key and what is allowed,
e.g. ``configs/x.yaml: key 'n': Input should be greater than 0 (got -3)``. Unknown keys are refused so a
typo never silently falls back to a default. YAML is parsed with ``yaml.safe_load`` only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from synth.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)

GENERATE_METHODS = ("perlin", "draem", "cutpaste", "scar", "cutpaste3way", "paste", "controlnet", "csm")


class StrictModel(BaseModel):
    """Base for config models: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GenerateConfig(StrictModel):
    """Settings of ``synth generate`` (each key is also a CLI flag; the flag wins)."""

    normal: Path = Field(description="folder of defect-free images")
    out: Path = Field(description="output folder: the labeled defect set")
    method: Literal["perlin", "draem", "cutpaste", "scar", "cutpaste3way", "paste", "controlnet", "csm"] = "perlin"
    n: int = Field(100, gt=0, description="number of defect samples to generate")
    seed: int = Field(0, ge=0)
    masks: Path | None = Field(None, description="real defect masks for method 'paste' (<class>/<name>.png)")
    defects: Path | None = Field(None, description="the defect images the masks belong to (same names)")
    anomaly_source: Path | None = Field(None, description="texture folder for DRAEM (e.g. DTD); default: self")
    blend: Literal["alpha", "poisson", "texture"] = "alpha"
    foreground: Literal["auto", "object", "texture"] = "auto"
    defect_class: str | None = Field(None, description="class label for perlin/draem/cutpaste samples")
    copy_normals: bool = Field(True, description="copy the normal images into train/good")
    strict: bool = Field(False, description="fail on the first unreadable file instead of skipping it")
    preview: int = Field(16, ge=0, le=256, description="samples shown in preview.png")
    method_params: dict[str, Any] = Field(default_factory=dict, description="extra generator arguments")


def _format_error(source: str, exc: ValidationError, data: dict[str, Any]) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(root)"
        got = err.get("input")
        got_text = "" if err["type"] == "missing" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{source}: key '{key}': {err['msg']}{got_text}")
    return "\n".join(lines)


def validate_config(model: type[ModelT], data: dict[str, Any], *, source: str = "config") -> ModelT:
    """Validate a mapping into ``model``; raises ConfigError naming every bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(source, exc, data)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """``yaml.safe_load`` a file into a dict with clear errors (missing file, syntax error, not a mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; check the path.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}.")
    return data


def load_config(
    model: type[ModelT], path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> ModelT:
    """Load ``path`` (optional), apply non-None ``overrides`` (CLI flags), validate into ``model``.

    Relative paths inside a config file are resolved against the current directory, like CLI flags.
    """
    data: dict[str, Any] = read_yaml(path) if path is not None else {}
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return validate_config(model, data, source=str(path) if path is not None else "arguments")
