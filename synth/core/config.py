"""Typed YAML configuration for every package: pydantic models, ``yaml.safe_load`` files, one clear error.

A bad value gives one :class:`~synth.core.errors.ConfigError` that names the file, the key and what is allowed,
e.g. ``configs/x.yaml: key 'n': Input should be greater than 0 (got -3)``. Unknown keys are refused so a
typo never silently falls back to a default. YAML is parsed with ``yaml.safe_load`` only.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from synth.core.errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for config models: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _unknown_key_hint(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> str:
    """``unknown key; did you mean 'x'? valid keys: ...`` for a key the model does not have."""
    if model is None or len(loc) != 1:
        return "unknown key; remove it or fix its spelling"
    valid = sorted(model.model_fields)
    close = difflib.get_close_matches(str(loc[0]), valid, n=1)
    guess = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown key; {guess}valid keys: {', '.join(valid)}"


def format_validation_error(source: str, exc: ValidationError, *, model: type[BaseModel] | None = None,
                            prefix: tuple[str, ...] = ()) -> str:
    """One line per bad key: ``SOURCE: key 'a.b': what is wrong (got VALUE)``; unknown keys list the valid ones.

    ``prefix`` is prepended to every key (a section name); ``model`` gives the valid keys for unknown-key errors.
    """
    lines = []
    for err in exc.errors():
        key = ".".join([*prefix, *(str(part) for part in err["loc"])]) or "(root)"
        got = err.get("input")
        got_text = "" if err["type"] == "missing" or isinstance(got, dict) else f" (got {got!r})"
        # pydantic prefixes messages of our own validators with "Value error, "; the key already says where.
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = _unknown_key_hint(model, tuple(err["loc"]))
        lines.append(f"{source}: key '{key}': {message}{got_text}")
    return "\n".join(lines)


def validate_config(model: type[ModelT], data: dict[str, Any], *, source: str = "config") -> ModelT:
    """Validate a mapping into ``model``; raises ConfigError naming every bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc, model=model)) from None


def describe_yaml_error(exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line error as one line to append to "invalid YAML": where, what, and how to fix it."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    started = (f" ({context} started at line {context_mark.line + 1})"
               if context and context_mark is not None else "")
    return (f"{where}: {problem}{started}; fix the syntax (close brackets and quotes, indent with spaces, "
            f"quote values that contain ': ' or '#'); only plain YAML tags are accepted.")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """``yaml.safe_load`` a file into a dict with clear errors (missing file, syntax error, not a mapping)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: expected a YAML config file, got a folder; pass the .yaml file itself.")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; check the path.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML{describe_yaml_error(exc)}") from None
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
