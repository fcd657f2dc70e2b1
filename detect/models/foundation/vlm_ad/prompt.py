"""Prompt for the VLM: a system message fixing the JSON schema, then normal examples and the query image.

Messages are backend-neutral: ``{"role": ..., "content": [{"type": "text", "text": ...} |
{"type": "image", "image": uint8 HxWx3}]}``; each backend converts image parts to its own form (a base64 PNG
data URL for OpenAI-compatible servers, a PIL image for transformers processors).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

Message = dict[str, Any]

SYSTEM_PROMPT = """\
You are an industrial visual inspection system. You inspect one image of a product or surface and decide \
whether it shows a defect (an anomaly: scratch, crack, dent, stain, contamination, missing or extra part, \
deformation, wrong colour, ...). Natural variation in texture, lighting and position is not a defect.

Reply with ONE JSON object and nothing else (no prose, no Markdown), with exactly these fields:
{"is_anomaly": <true|false>,
 "confidence": <number from 0 to 1: how sure you are of is_anomaly>,
 "defects": [{"type": "<short defect name>",
              "location": [x0, y0, x1, y1],
              "severity": "low" | "medium" | "high"}]}
"location" is the defect's bounding box as fractions of the image width (x) and height (y), 0 to 1, \
origin at the top-left corner. "defects" is an empty list when the image is normal."""

CORRECTION_PROMPT = (
    "Your previous reply could not be used ({reason}). Reply again with only the JSON object of the required "
    "schema: is_anomaly (true/false), confidence (0 to 1) and defects (a list, possibly empty)."
)


def build_messages(image: np.ndarray, references: Sequence[np.ndarray], *, object_description: str = "",
                   defect_types: Sequence[str] = ()) -> list[Message]:
    """System + user message for one query image, with ``references`` shown first as normal examples."""
    intro = []
    if object_description:
        intro.append(f"The images show: {object_description}.")
    if defect_types:
        intro.append(f"Defect types to look for include: {', '.join(defect_types)} (others may occur).")
    content: list[dict[str, Any]] = []
    if len(references) > 0:
        if len(references) == 1:
            intro.append("The first image is a normal, defect-free example of this object; differences from it "
                         "that a normal part could also show are not defects.")
        else:
            intro.append(f"The first {len(references)} images are normal, defect-free examples of this object; "
                         "differences from them that a normal part could also show are not defects.")
        content.append({"type": "text", "text": " ".join(intro)})
        for index, reference in enumerate(references):
            content.append({"type": "text", "text": f"Normal example {index + 1}:"})
            content.append({"type": "image", "image": reference})
        content.append({"type": "text", "text": "Image to inspect:"})
    else:
        content.append({"type": "text", "text": " ".join([*intro, "Image to inspect:"])})
    content.append({"type": "image", "image": image})
    content.append({"type": "text", "text": "Answer with the JSON object only."})
    return [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {"role": "user", "content": content}]


def with_correction(messages: list[Message], reply: str, reason: str, *, max_chars: int = 2000) -> list[Message]:
    """``messages`` plus the unusable reply and a request to answer again in the schema (for a retry)."""
    return [*messages,
            {"role": "assistant", "content": [{"type": "text", "text": reply[:max_chars] or "(empty)"}]},
            {"role": "user", "content": [{"type": "text", "text": CORRECTION_PROMPT.format(reason=reason)}]}]
