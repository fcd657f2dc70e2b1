"""Building the open_clip CLIP model of WinCLIP, without ever hanging on an unreachable model hub.

``clip_model`` is an open_clip model name ("ViT-B-16-plus-240", the paper's) or the path of an open_clip
model-config JSON (``{"embed_dim": ..., "vision_cfg": {...}, "text_cfg": {...}}``; registered with open_clip
under the file's stem), e.g. a tiny architecture for tests. ``pretrained`` is

- an open_clip pretrained tag ("laion400m_e31", the paper's weights): taken from the local Hugging Face /
  open_clip cache when there, otherwise downloaded by open_clip. When the hub cannot be reached (no network,
  or ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` set) the load fails at once with one ``InputError`` saying how
  to pass a local file, instead of huggingface_hub's retries (about a minute per file);
- a local checkpoint file (``open_clip_pytorch_model.bin``, ``.safetensors``, ``.pt``): loaded as is;
- ``None`` / "random" / "none": random initialisation drawn from the seed (tests, and models loaded by
  ``detect.load`` whose weights file supplies every tensor).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from synth.core.clip_weights import (
    build_open_clip,
    is_random_clip_weights,
    resolve_clip_model_name,
    tag_weights,
)
from synth.core.errors import InputError
from synth.core.hub import hub_unavailable_reason

logger = logging.getLogger(__name__)

# OpenAI CLIP normalisation, open_clip's default (used by the paper's laion400m weights too).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class LoadedClip:
    """An open_clip CLIP with what WinCLIP needs around it."""

    name: str
    model: nn.Module
    tokenizer: Any
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def resolve_model_name(clip_model: str) -> str:
    """The open_clip model name of ``clip_model`` (a JSON config file is registered under its stem; open_clip
    schemas such as "hf-hub:org/repo" resolve themselves)."""
    return resolve_clip_model_name(clip_model, prefix="winclip: ", example="ViT-B-16-plus-240", allow_schema=True)


def tag_config(name: str, pretrained: str | None) -> dict[str, Any] | None:
    """open_clip's table entry of a pretrained tag (offline; None for random weights, files and unknown tags)."""
    from open_clip.pretrained import get_pretrained_cfg

    if is_random_clip_weights(pretrained) or ":" in name or Path(str(pretrained)).expanduser().is_file():
        return None
    return get_pretrained_cfg(name, str(pretrained)) or None


def _offline_error(name: str, pretrained: str, reason: str) -> InputError:
    return InputError(
        f"winclip: cannot load the CLIP weights of model {name!r} with pretrained tag {pretrained!r}: {reason}. "
        f"Download them once where there is internet (open_clip.create_model({name!r}, pretrained={pretrained!r}) "
        f"puts them in the Hugging Face cache), or pass a local open_clip checkpoint file: "
        f"`--set pretrained=/path/open_clip_pytorch_model.bin` (Python: pretrained='/path/...').")


def resolve_checkpoint(name: str, pretrained: str) -> str:
    """What to hand open_clip as ``pretrained``: a local file whenever possible, the tag only when downloadable."""
    import open_clip

    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path)
    cfg = tag_config(name, pretrained)
    if cfg is None:
        if os.sep in pretrained or path.suffix in (".bin", ".pt", ".pth", ".safetensors", ".npz"):
            raise InputError(f"winclip: pretrained checkpoint file {pretrained!r} does not exist.")
        tags = open_clip.list_pretrained_tags_by_model(name) if ":" not in name else []
        raise InputError(f"winclip: {pretrained!r} is neither a pretrained tag of {name!r} (known tags: "
                         f"{', '.join(tags) or 'none'}) nor an existing checkpoint file; pass one of the tags, a "
                         f"file path, or pretrained=random.")
    return tag_weights(cfg, pretrained, lambda reason: _offline_error(name, pretrained, reason))


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(name: str, config_key: str) -> Any:
    """open_clip tokenizer (reading the BPE vocabulary takes a second); ``config_key`` keeps a re-registered
    JSON config with other text settings from reusing a stale tokenizer."""
    import open_clip

    del config_key
    return open_clip.get_tokenizer(name)


def get_tokenizer(name: str) -> Any:
    """The tokenizer of open_clip model ``name`` (cached per model config)."""
    import open_clip

    config = open_clip.get_model_config(name) if ":" not in name else None
    return _cached_tokenizer(name, json.dumps(config, sort_keys=True, default=str))


def check_hub_schema(name: str) -> None:
    """An "hf-hub:org/repo" model needs its open_clip config from the hub or its cache: fail at once offline."""
    if not name.startswith("hf-hub:"):
        return
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_CONFIG_NAME

    repo = name.split(":", 1)[1]
    if isinstance(try_to_load_from_cache(repo, HF_CONFIG_NAME), str):
        return
    blocker = hub_unavailable_reason()
    if blocker is not None:
        raise InputError(f"winclip: open_clip model {name!r} is not in the local Hugging Face cache and the hub "
                         f"cannot be reached ({blocker}). Download it once where there is internet, or pass a local "
                         f"copy: `--set clip_model=local-dir:/path` (a folder with open_clip_config.json and the "
                         f"weights), or a built-in model name with "
                         f"`--set pretrained=/path/open_clip_pytorch_model.bin`.")


def create_clip(clip_model: str, pretrained: str | None, *, seed: int, loading: bool = False) -> LoadedClip:
    """Build the CLIP model: weights from ``pretrained`` (see the module docstring), random ones seeded by ``seed``.

    ``loading``: built for ``detect.load``, whose weights file replaces every tensor, so the pretrained weights
    are not looked up (a saved model loads offline); the architecture is the same.
    """
    name = resolve_model_name(clip_model)
    cfg = tag_config(name, pretrained)
    random_weights = loading or is_random_clip_weights(pretrained)
    schema = ":" in name  # "hf-hub:" / "local-dir:": open_clip takes config and weights from there
    if schema:
        check_hub_schema(name)
        checkpoint = None
    elif random_weights:
        checkpoint = None
    else:
        checkpoint = resolve_checkpoint(name, str(pretrained))
    # Tags trained with QuickGELU need that activation; taking it from the (offline) tag table makes the
    # architecture identical whether the weights come from the hub, the cache or a saved detector.
    quick_gelu = bool(cfg and cfg.get("quick_gelu", False))
    model = build_open_clip(
        name, checkpoint, seed=seed, quick_gelu=quick_gelu, load_weights=not random_weights,
        download_failed=lambda reason: _offline_error(name, str(pretrained), reason),
        build_failed=lambda reason: InputError(f"winclip: could not build open_clip model {name!r} with "
                                               f"pretrained={pretrained!r}: {reason}"))
    model.eval()
    preprocess = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = tuple((cfg or {}).get("mean") or preprocess.get("mean") or OPENAI_MEAN)
    std = tuple((cfg or {}).get("std") or preprocess.get("std") or OPENAI_STD)
    return LoadedClip(name, model, get_tokenizer(name), mean, std)  # type: ignore[arg-type]
