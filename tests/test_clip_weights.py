"""The open_clip helpers WinCLIP and CSM guidance share (synth/core/clip_weights.py): names, cached tag files."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("open_clip")

import synth.core.hub  # noqa: E402
from synth.core.clip_weights import (  # noqa: E402
    cached_clip_checkpoint,
    is_random_clip_weights,
    resolve_clip_model_name,
    tag_weights,
)
from synth.core.errors import InputError  # noqa: E402


def test_model_names_json_configs_and_schemas(tmp_path: Path) -> None:
    assert resolve_clip_model_name("ViT-B-16") == "ViT-B-16"
    with pytest.raises(InputError, match=r"^csm: unknown open_clip model 'ViT-Q-99'.*not an open_clip model"):
        resolve_clip_model_name("ViT-Q-99", prefix="csm: ")
    with pytest.raises(InputError, match="not an existing open_clip model-config JSON file"):
        resolve_clip_model_name(str(tmp_path / "missing.json"))
    # open_clip's schemas pass through untouched (no hub lookup here) where the caller accepts them
    assert resolve_clip_model_name("hf-hub:org/repo", allow_schema=True) == "hf-hub:org/repo"


def test_cached_checkpoint_from_a_file_entry_or_the_clip_cache(tmp_path: Path, monkeypatch) -> None:
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"x")
    assert cached_clip_checkpoint({"file": str(weights)}) == str(weights)
    monkeypatch.setenv("HOME", str(tmp_path))
    url = {"url": "https://example.invalid/clip/ViT-B-16.pt"}
    assert cached_clip_checkpoint(url) is None
    cached = tmp_path / ".cache" / "clip" / "ViT-B-16.pt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert cached_clip_checkpoint(url) == str(cached)


def test_tag_weights_cached_file_then_download_then_the_callers_error(tmp_path: Path, monkeypatch) -> None:
    """One resolver for WinCLIP and CSM: the cached file wins; else the tag when a download can start now; else the
    caller's error with the reason, after one probe at most."""
    import huggingface_hub

    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"x")
    never = lambda reason: AssertionError(reason)  # noqa: E731
    assert tag_weights({"file": str(weights)}, "tag", never) == str(weights)
    monkeypatch.setenv("HOME", str(tmp_path))  # an empty ~/.cache/clip
    url = {"url": "https://example.invalid/clip/ViT-B-16.pt"}
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    probed = []
    monkeypatch.setattr(synth.core.hub, "network_reachable", lambda u, timeout=3.0: probed.append(u) or (True, ""))
    assert tag_weights(url, "tag", never) == "tag" and probed == [url["url"]]
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(InputError, match=r"not in the local cache and cannot be downloaded \(TRANSFORMERS_OFFLINE"):
        tag_weights(url, "tag", InputError)
    assert len(probed) == 1  # offline mode does not probe
    assert is_random_clip_weights(None) and is_random_clip_weights(" Random ") and is_random_clip_weights("")
    assert not is_random_clip_weights("laion400m_e31")
