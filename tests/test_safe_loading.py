"""Safe loading: nothing PixelVision reads can execute code, escape its dataset root, or leak an API key.

- Saved detectors (safetensors + JSON) and user weights files (.pth via ``torch.load(weights_only=True)``) that
  carry a pickle payload are refused with a clear error, and the payload never runs.
- A scan of the source tree: every ``torch.load`` passes ``weights_only=True``; no ``yaml.load`` / ``full_load`` /
  ``unsafe_load``, ``pickle``/``marshal``/``shelve``/``dill``/``joblib`` loading, ``eval``/``exec`` or
  ``np.load(allow_pickle=True)``.
- Manifests cannot reference files outside their dataset root (``..``, absolute paths, symlinks).
- API keys: read from the environment only (VLM-AD ``api_key_env``), never written to saved models, logs or
  pipeline reports (tests/test_model_vlm_ad.py and tests/test_pipeline_run.py hold the redaction tests).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import detect
from detect.persistence import CONFIG_FILE, WEIGHTS_FILE
from synth.core.backbones import read_weights_file
from synth.core.config import read_yaml
from synth.core.defect_set import MANIFEST_NAME, read_defect_set
from synth.core.errors import ConfigError, InputError

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("synth", "detect", "pipelines", "scripts")


class Payload:
    """Unpickling this calls ``os.system`` (here: touching a marker file) — what a malicious file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_pickle_bomb(path: Path, marker: Path, *, torch_format: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if torch_format:
        torch.save({"weight": torch.zeros(2), "evil": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))


@pytest.fixture(scope="module")
def saved_model(brick_set, tmp_path_factory) -> Path:
    model = detect.create("padim", image_size=64, blur_sigma=1).fit(brick_set.root, progress=False)
    return model.save(tmp_path_factory.mktemp("safe") / "padim")


@pytest.mark.parametrize("torch_format", [True, False], ids=["torch.save", "raw-pickle"])
def test_saved_model_with_a_pickle_payload_is_refused_and_never_executed(saved_model, tmp_path, torch_format):
    model_dir = tmp_path / "model"
    shutil.copytree(saved_model, model_dir)
    marker = tmp_path / "pwned"
    write_pickle_bomb(model_dir / WEIGHTS_FILE, marker, torch_format=torch_format)
    with pytest.raises(InputError, match=f"{WEIGHTS_FILE}: corrupted weights file"):
        detect.load(model_dir)
    assert not marker.exists(), "loading a model must never unpickle"


def test_model_config_is_data_not_code(saved_model, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(saved_model, model_dir)
    meta = json.loads((model_dir / CONFIG_FILE).read_text())
    meta["model"] = "__import__('os').system('touch x')"
    (model_dir / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(InputError, match="unknown model"):
        detect.load(model_dir)
    meta["model"], meta["config"] = "padim", {**meta["config"], "__class__": "os.system"}
    (model_dir / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="unknown option"):
        detect.load(model_dir)


def test_user_weights_file_with_a_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    bomb = tmp_path / "backbone.pth"
    write_pickle_bomb(bomb, marker, torch_format=True)
    with pytest.raises(InputError, match="cannot read weights file .*backbone.pth"):
        read_weights_file(bomb)
    assert not marker.exists()


def test_yaml_configs_cannot_construct_python_objects(tmp_path):
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f"n: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="evil.yaml"):
        read_yaml(config)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# source scan
# --------------------------------------------------------------------------------------------------

FORBIDDEN_CALLS = {
    ("yaml", "load"), ("yaml", "full_load"), ("yaml", "unsafe_load"), ("yaml", "load_all"),
    ("pickle", "load"), ("pickle", "loads"), ("marshal", "loads"), ("marshal", "load"), ("shelve", "open"),
    ("dill", "load"), ("dill", "loads"), ("joblib", "load"), ("cloudpickle", "load"), ("cloudpickle", "loads"),
}


def _dotted(node: ast.AST) -> tuple[str, ...]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    # A call or subscript at the root (``f().eval()``) is not a bare name: mark it so it never matches one.
    parts.append(node.id if isinstance(node, ast.Name) else "<expr>")
    return tuple(reversed(parts))


def unsafe_loads(path: Path) -> list[str]:
    """Calls in one source file that could execute code from data."""
    problems = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"{path.relative_to(REPO)}:{node.lineno}"
        keywords = {k.arg: k.value for k in node.keywords}
        if name[-2:] == ("torch", "load") or name == ("load",) and "weights_only" in keywords:
            value = keywords.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                problems.append(f"{where}: torch.load without weights_only=True")
        elif name[-2:] in FORBIDDEN_CALLS:
            problems.append(f"{where}: {'.'.join(name)}")
        elif name in (("eval",), ("exec",)):
            problems.append(f"{where}: {name[0]}()")
        elif name[-1:] == ("load",) and name[:1] in (("np",), ("numpy",)):
            value = keywords.get("allow_pickle")
            if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                problems.append(f"{where}: np.load with allow_pickle")
    return problems


def test_source_tree_has_no_code_executing_loads():
    files = [p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))]
    assert len(files) > 50
    problems = [problem for path in files for problem in unsafe_loads(path)]
    assert not problems, "\n".join(problems)


def test_the_scan_catches_what_it_should(tmp_path, monkeypatch):
    bad = REPO / "scripts" / "_scan_probe_tmp.py"
    bad.write_text("import torch, yaml, pickle, numpy as np\n"
                   "torch.load('a')\ntorch.load('a', weights_only=False)\nyaml.load(s)\npickle.loads(b)\n"
                   "eval('1')\nnp.load('x', allow_pickle=True)\ntorch.load('ok', weights_only=True)\n"
                   "yaml.safe_load(s)\n")
    try:
        found = unsafe_loads(bad)
    finally:
        bad.unlink()
    assert [f.split(": ", 1)[1] for f in found] == [
        "torch.load without weights_only=True", "torch.load without weights_only=True", "yaml.load",
        "pickle.loads", "eval()", "np.load with allow_pickle"]


# --------------------------------------------------------------------------------------------------
# manifests stay inside their root
# --------------------------------------------------------------------------------------------------

def _manifest_set(root: Path, image: str) -> Path:
    (root / "train" / "good").mkdir(parents=True, exist_ok=True)
    row = {"image": image, "split": "train", "defect_class": "good", "mask": None}
    (root / MANIFEST_NAME).write_text(json.dumps(row) + "\n")
    return root


@pytest.mark.parametrize("image", ["../secret.png", "/etc/passwd", "train/../../secret.png", "C:/Windows/x.png"])
def test_manifest_paths_outside_the_root_are_refused(tmp_path, image):
    root = _manifest_set(tmp_path / "set", image)
    with pytest.raises(InputError, match="outside the dataset root"):
        read_defect_set(root)


def test_manifest_symlink_out_of_the_root_is_refused(brick_set, tmp_path):
    root = _manifest_set(tmp_path / "set", "train/good/link.png")
    outside = next((brick_set.root / "train" / "good").iterdir())
    (root / "train" / "good" / "link.png").symlink_to(outside)
    with pytest.raises(InputError, match="outside the dataset root"):
        read_defect_set(root)


# --------------------------------------------------------------------------------------------------
# API keys
# --------------------------------------------------------------------------------------------------

def test_vlm_api_key_comes_from_the_environment_and_is_not_saved_or_logged(tmp_path, monkeypatch, caplog):
    key = "sk-" + "test0123456789abcdefXYZ"
    monkeypatch.setenv("PIXELVISION_TEST_KEY", key)
    with caplog.at_level(logging.DEBUG):
        model = detect.create("vlm_ad", backend="openai", base_url="http://127.0.0.1:9/v1", model="m",
                              api_key_env="PIXELVISION_TEST_KEY")
        assert key not in repr(model) and key not in json.dumps(model.config.__dict__, default=str)
    assert key not in caplog.text
