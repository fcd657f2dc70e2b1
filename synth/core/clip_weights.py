"""What every open_clip load in PixelVision shares (WinCLIP's CLIP, CSM guidance's encoder): the model name, the
pretrained tag's local file, and quiet random initialisation, without ever touching the network.

- :func:`resolve_clip_model_name`: an open_clip model name, or a model-config JSON file registered with open_clip
  under its stem (tiny architectures for tests); optionally open_clip's ``hf-hub:`` / ``local-dir:`` schemas.
- :func:`cached_clip_checkpoint`: the local file of a pretrained tag when it is already in the Hugging Face or
  open_clip cache (an explicit ``file`` entry, the hub file or its ``.safetensors`` twin, the ``~/.cache/clip``
  download of a URL tag).
- :func:`tag_weights`: what to hand open_clip for a pretrained tag: its cached file, else the tag itself when
  :func:`synth.core.hub.hub_unavailable_reason` allows a download now, else the caller's clear error (offline).
- :func:`build_open_clip`: the one ``open_clip.create_model`` call (seeded random weights that leave the global RNG
  alone, the random-init warning dropped, a failed download told apart from a bad checkpoint).
- :func:`is_random_clip_weights`: "random" / "none" / "" / None ask for random initialisation.
- :func:`quiet_random_init`: open_clip warns on the root logger when it builds random weights; expected for
  tests and for saved models whose weights file replaces every tensor.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from synth.core.errors import InputError
from synth.core.hub import hub_unavailable_reason

CLIP_CACHE_DIR = Path("~/.cache/clip")
RANDOM_CLIP_WEIGHTS = ("random", "none", "")


def is_random_clip_weights(pretrained: str | None) -> bool:
    """True when ``pretrained`` asks for random initialisation (tests; saved models whose file has every tensor)."""
    return pretrained is None or str(pretrained).strip().lower() in RANDOM_CLIP_WEIGHTS


def resolve_clip_model_name(clip_model: str, *, prefix: str = "", example: str = "ViT-B-16",
                            allow_schema: bool = False) -> str:
    """The open_clip model name of ``clip_model``; ``prefix`` starts every error message (e.g. "winclip: ")."""
    import open_clip

    if clip_model.lower().endswith(".json"):
        path = Path(clip_model).expanduser()
        if not path.is_file():
            raise InputError(f"{prefix}clip_model {clip_model!r} is not an existing open_clip model-config JSON file "
                             f"(file not found).")
        open_clip.add_model_config(path)
        return path.stem
    if allow_schema and ":" in clip_model:  # "hf-hub:org/repo", "local-dir:/path": open_clip resolves them
        return clip_model
    if open_clip.get_model_config(clip_model) is None:
        close = difflib.get_close_matches(clip_model, open_clip.list_models(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise InputError(f"{prefix}unknown open_clip model {clip_model!r}: it is not an open_clip model name nor a "
                         f"model-config JSON file.{hint} Pass a name from open_clip.list_models() (e.g. {example}) "
                         f"or the path of a model-config JSON file.")
    return clip_model


def _weight_file_names(filename: str) -> list[str]:
    """open_clip tries a .safetensors twin of a hub weights file before the file itself."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if filename == HF_WEIGHTS_NAME:
        return [HF_SAFE_WEIGHTS_NAME, filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def hub_route(tag_cfg: dict[str, Any]) -> tuple[str, str] | None:
    """(repo id, file name) when open_clip would download the tag from the Hugging Face hub ("org/repo/" means the
    default weights file)."""
    from open_clip.constants import HF_WEIGHTS_NAME
    from open_clip.pretrained import has_hf_hub

    if tag_cfg.get("hf_hub") and has_hf_hub():
        repo, filename = os.path.split(tag_cfg["hf_hub"])
        return repo, filename or HF_WEIGHTS_NAME
    return None


def cached_clip_checkpoint(tag_cfg: dict[str, Any]) -> str | None:
    """The local file of a pretrained tag (open_clip's table entry) when it is already cached; never downloads."""
    if tag_cfg.get("file") and os.path.isfile(tag_cfg["file"]):
        return str(tag_cfg["file"])
    route = hub_route(tag_cfg)
    if route is not None:
        from huggingface_hub import try_to_load_from_cache

        repo, filename = route
        for candidate in _weight_file_names(filename):
            found = try_to_load_from_cache(repo, candidate)
            if isinstance(found, str) and os.path.isfile(found):
                return found
        return None
    if tag_cfg.get("url"):
        target = CLIP_CACHE_DIR.expanduser() / os.path.basename(tag_cfg["url"])
        if target.is_file():
            return str(target)
    return None


def tag_weights(tag_cfg: dict[str, Any], tag: str, unavailable: Callable[[str], Exception]) -> str:
    """What to hand open_clip as ``pretrained`` for tag ``tag`` (its table entry ``tag_cfg``): the cached local file,
    else the tag itself when a download can start now; else raises ``unavailable(reason)`` at once (no retries).
    """
    cached = cached_clip_checkpoint(tag_cfg)
    if cached is not None:
        return cached
    route = hub_route(tag_cfg)
    blocker = hub_unavailable_reason(None if route is not None else str(tag_cfg.get("url", "")))
    if blocker is not None:
        raise unavailable(f"they are not in the local cache and cannot be downloaded ({blocker})")
    return tag


def build_open_clip(name: str, weights: str | None, *, seed: int, quick_gelu: bool, load_weights: bool = True,
                    preprocess: dict[str, Any] | None = None, download_failed: Callable[[str], Exception],
                    build_failed: Callable[[str], Exception]) -> Any:
    """``open_clip.create_model`` as WinCLIP and CSM guidance both need it.

    ``weights``: a local checkpoint file, a pretrained tag open_clip may download now (:func:`tag_weights`), or
    None for random weights drawn from ``seed`` (the global torch RNG is left as it was). ``quick_gelu``: the
    tag's activation (from its table entry, so the architecture is the same however the weights arrive).
    ``preprocess``: normalisation to record on the model (``mean`` / ``std``). A failed download raises
    ``download_failed(reason)``; any other build error (a checkpoint of another model) ``build_failed(reason)``.
    """
    import open_clip
    import torch

    try:
        with torch.random.fork_rng(devices=[]), quiet_random_init():
            torch.manual_seed(seed)
            return open_clip.create_model(name, pretrained=weights, load_weights=load_weights,
                                          force_quick_gelu=quick_gelu, force_preprocess_cfg=preprocess or None)
    except InputError:
        raise
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        if weights is not None and not Path(weights).is_file():  # a tag whose download failed
            raise download_failed(f"the download failed ({exc})") from None
        raise build_failed(str(exc)) from None


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextmanager
def quiet_random_init() -> Iterator[None]:
    """Drop open_clip's "initialized randomly" warning while building a model here."""
    root = logging.getLogger()
    quiet = _DropRandomInitWarning()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)
