"""WinCLIP's compositional prompt ensemble (Jeong et al., CVPR 2023, Sec. 4.1 and the appendix lists).

A prompt is a *template* filled with a *state* of the object: "a close-up photo of a flawless object.".
Every state of a class (normal or anomalous) is combined with every template; the CLIP text embeddings of all
prompts of a class are averaged into one class prototype (see ``WinClipDetector``).

Defect types (``defect_types`` option) are extra anomalous states "<object> with <defect>", written like the
paper's own anomalous states ("<object> with flaw"), e.g. ``["scratch", "crack"]`` -> "object with scratch".
"""

from __future__ import annotations

from collections.abc import Sequence

# State words of the paper ("{}" is the object name).
NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
# Template of one defect type given by the user: "{object} with {defect}".
DEFECT_STATE = "{} with {}"

# The paper's 22 templates ("{}" is the state).
TEMPLATES: tuple[str, ...] = (
    "a cropped photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)


def normal_states(object_name: str) -> list[str]:
    """The normal state phrases of ``object_name``."""
    return [state.format(object_name) for state in NORMAL_STATES]


def anomalous_states(object_name: str, defect_types: Sequence[str] = ()) -> list[str]:
    """The anomalous state phrases of ``object_name``: the paper's four, then one per defect type."""
    return ([state.format(object_name) for state in ANOMALOUS_STATES]
            + [DEFECT_STATE.format(object_name, defect) for defect in defect_types])


def prompt_ensemble(object_name: str = "object", defect_types: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """(normal prompts, anomalous prompts): every state of the class in every template.

    Counts: ``len(NORMAL_STATES) * len(TEMPLATES)`` normal prompts (7 x 22 = 154) and
    ``(len(ANOMALOUS_STATES) + len(defect_types)) * len(TEMPLATES)`` anomalous prompts (4 x 22 = 88 without
    defect types).
    """
    normal = [template.format(state) for state in normal_states(object_name) for template in TEMPLATES]
    anomalous = [template.format(state) for state in anomalous_states(object_name, defect_types)
                 for template in TEMPLATES]
    return normal, anomalous
