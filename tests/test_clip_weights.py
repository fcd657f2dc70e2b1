"""The open_clip helpers WinCLIP and CSM guidance share (synth/clip_weights.py): names, cached tag files."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("open_clip")

from synth.clip_weights import cached_clip_checkpoint, resolve_clip_model_name  # noqa: E402
from synth.errors import InputError  # noqa: E402


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
