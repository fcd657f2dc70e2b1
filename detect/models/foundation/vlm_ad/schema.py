"""The structured verdict a VLM returns, and the tolerant-but-strict parser that turns a reply into it.

The model is asked for one JSON object::

    {"is_anomaly": bool, "confidence": float 0..1,
     "defects": [{"type": str, "location": [x0, y0, x1, y1] (0..1), "severity": "low"|"medium"|"high"}]}

Chat models wrap JSON in prose or Markdown fences, write percentages, pixel or per-mille boxes and swap corners;
:func:`parse_reply` extracts the first JSON object that validates, normalises what has one obvious meaning and
raises :class:`MalformedReply` (never a ``json``/``KeyError`` traceback) for anything else, so the caller can
ask again.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

SEVERITIES = ("low", "medium", "high")
# Map intensity of a box relative to the image score: a "high" defect paints the full score.
SEVERITY_WEIGHTS = {"low": 1 / 3, "medium": 2 / 3, "high": 1.0}
_TRUE = {"true", "yes", "anomalous", "anomaly", "defective"}
_FALSE = {"false", "no", "normal", "good", "ok"}
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


class MalformedReply(ValueError):
    """A reply that holds no JSON object of the required schema; ``reason`` says what was wrong."""

    def __init__(self, reason: str, reply: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


@dataclass
class Defect:
    """One defect reported by the VLM; ``location`` is (x0, y0, x1, y1) in [0, 1], None when not localised."""

    type: str
    location: tuple[float, float, float, float] | None
    severity: str = "medium"


@dataclass
class Verdict:
    """Parsed answer for one image.

    is_anomaly / confidence / defects: the model's answer (confidence is in its verdict, 0..1).
    score: anomaly score = confidence if is_anomaly else 1 - confidence (the detector's image score).
    raw_reply: the text the model returned (last attempt); attempts: requests it took.
    error: None for a valid answer; the reason when ``fallback_score`` replaced an unusable answer.
    """

    is_anomaly: bool
    confidence: float
    defects: list[Defect] = field(default_factory=list)
    score: float = 0.0
    raw_reply: str = ""
    attempts: int = 1
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (locations as lists)."""
        data = asdict(self)
        for defect in data["defects"]:
            if defect["location"] is not None:
                defect["location"] = list(defect["location"])
        return data


def anomaly_score(is_anomaly: bool, confidence: float) -> float:
    """Probability-like anomaly score from a verdict and the model's confidence in it."""
    return float(confidence) if is_anomaly else 1.0 - float(confidence)


def _json_objects(text: str) -> Iterator[dict[str, Any]]:
    """Every JSON object in ``text``: the whole text, ```json fences, then each ``{...}`` that decodes."""
    for candidate in (text.strip(), *(m.strip() for m in _FENCE.findall(text))):
        try:
            value = json.loads(candidate)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(value, dict):
            yield value
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(value, dict):
            yield value


def extract_json_object(text: str) -> dict[str, Any]:
    """The verdict object in ``text`` (wrapped in prose or fences, or nested): the first JSON object with an
    ``is_anomaly`` field, else the first JSON object at all (which then fails validation with a clear reason)."""
    if not isinstance(text, str) or not text.strip():
        raise MalformedReply("empty reply", str(text or ""))
    first = None
    for value in _json_objects(text):
        if "is_anomaly" in value:
            return value
        first = value if first is None else first
    if first is None:
        raise MalformedReply("no JSON object in the reply", text)
    return first


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    return None


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip().rstrip("%")
        try:
            number = float(text) / (100.0 if value.strip().endswith("%") else 1.0)
        except ValueError:
            return None
    elif isinstance(value, (int, float)):
        number = float(value)
    else:
        return None
    return number if math.isfinite(number) else None


def normalise_box(location: Any, image_size: int) -> tuple[float, float, float, float] | None:
    """(x0, y0, x1, y1) in [0, 1] from a 4-number list, or None when it is not one.

    Values above 1 are pixels of the image the model saw (``image_size``) when they fit in it, else per-mille
    (Qwen2-VL's 0..1000 grid); corners are sorted and clamped to the image.
    """
    if not isinstance(location, (list, tuple)) or len(location) != 4:
        return None
    numbers = [_as_number(v) for v in location]
    if any(n is None for n in numbers):
        return None
    values: list[float] = [float(n) for n in numbers if n is not None]
    if min(values) < -0.05:  # slightly negative is rounding; clearly negative is no box
        return None
    peak = max(values)
    if peak > 1.0:
        scale = float(image_size) if peak <= image_size else 1000.0
        if peak > scale:
            return None
        values = [v / scale for v in values]
    x0, y0, x1, y1 = (min(max(v, 0.0), 1.0) for v in values)
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    return (x0, y0, x1, y1)


def parse_verdict(data: dict[str, Any], image_size: int) -> Verdict:
    """Validate a decoded JSON object against the schema; raise MalformedReply naming the bad field."""
    if "is_anomaly" not in data:
        raise MalformedReply("field 'is_anomaly' is missing")
    is_anomaly = _as_bool(data["is_anomaly"])
    if is_anomaly is None:
        raise MalformedReply(f"field 'is_anomaly' must be true or false, got {data['is_anomaly']!r:.40}")
    if "confidence" not in data:
        raise MalformedReply("field 'confidence' is missing")
    confidence = _as_number(data["confidence"])
    if confidence is None or not 0.0 <= confidence <= 100.0:
        raise MalformedReply(f"field 'confidence' must be a number in [0, 1], got {data['confidence']!r:.40}")
    if confidence > 1.0:  # a percentage (e.g. 85 for 0.85)
        confidence /= 100.0
    raw_defects = data.get("defects", [])
    if raw_defects is None:
        raw_defects = []
    if isinstance(raw_defects, dict):
        raw_defects = [raw_defects]
    if not isinstance(raw_defects, list):
        raise MalformedReply(f"field 'defects' must be a list, got {type(raw_defects).__name__}")
    defects = []
    for item in raw_defects:
        if isinstance(item, str):  # a bare defect name
            defects.append(Defect(item.strip() or "unknown", None))
            continue
        if not isinstance(item, dict):
            raise MalformedReply(f"each defect must be an object, got {type(item).__name__}")
        kind = str(item.get("type") or "unknown").strip() or "unknown"
        severity = str(item.get("severity", "medium")).strip().lower()
        defects.append(Defect(
            kind,
            normalise_box(item.get("location", item.get("bbox", item.get("box"))), image_size),
            severity if severity in SEVERITIES else "medium",
        ))
    return Verdict(is_anomaly, confidence, defects, anomaly_score(is_anomaly, confidence))


def parse_reply(text: str, image_size: int) -> Verdict:
    """Extract and validate the verdict in a model reply (see the module docstring)."""
    data = extract_json_object(text)
    try:
        verdict = parse_verdict(data, image_size)
    except MalformedReply as exc:
        raise MalformedReply(exc.reason, text) from None
    verdict.raw_reply = text
    return verdict
