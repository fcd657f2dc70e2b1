"""``synth generate``: every method writes a consistent labeled set; same seed -> same bytes; kill -> resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from synth.cli import main as synth_main
from synth.core.defect_set import read_defect_set
from synth.core.io import read_image, write_image
from synth.toyset import write_generation_inputs

METHODS = ["perlin", "draem", "cutpaste", "scar", "cutpaste3way"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """8 real brick crops as normals; 2 spot + 2 scratch exemplars (image + mask) on gravel."""
    return write_generation_inputs(tmp_path_factory.mktemp("inputs"), seed=0)


def run(*args: str | Path) -> int:
    return synth_main(["generate", "-q", *map(str, args)])


def changed_outside_mask(dataset, sample, margin: int) -> int:
    image = dataset.load_image(sample)
    source = read_image(sample.source_image)
    mask = dataset.load_mask(sample, image.shape[:2])
    if margin:
        mask = cv2.dilate(mask.astype(np.uint8), np.ones((2 * margin + 1,) * 2, np.uint8)) > 0
    return int((np.abs(image.astype(int) - source.astype(int)).max(axis=2)[~mask] > 0).sum())


@pytest.mark.parametrize("method", METHODS)
def test_model_free_methods_write_consistent_sets(inputs, tmp_path, method):
    out = tmp_path / method
    assert run("--normal", inputs / "normal", "--method", method, "--n", 6, "--out", out, "--seed", 3) == 0
    dataset = read_defect_set(out)
    assert len(dataset.select(split="train")) == 8  # normals copied to train/good
    generated = dataset.select(split="test")
    assert len(generated) == 6
    assert all(s.generator == method and s.seed is not None for s in generated)
    for sample in dataset.select(anomalous=True):
        assert changed_outside_mask(dataset, sample, margin=0) == 0
        image = dataset.load_image(sample)
        assert (image != read_image(sample.source_image)).any()
    assert (out / "preview.png").exists() and (out / "report.html").exists()
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert all("augmenter" in r["params"] for r in rows if r["split"] == "test")


@pytest.mark.parametrize("blend", ["alpha", "poisson", "texture"])
def test_paste_from_a_few_masks(inputs, tmp_path, blend):
    out = tmp_path / blend
    assert run("--normal", inputs / "normal", "--masks", inputs / "masks", "--defects", inputs / "defects",
               "--method", "paste", "--blend", blend, "--n", 8, "--out", out) == 0
    dataset = read_defect_set(out)
    assert dataset.defect_classes == ["scratch", "spot"]  # class labels come from the mask folders
    for sample in dataset.select(anomalous=True):
        # Blending feathers 3 px beyond the mask; nothing changes further out.
        assert changed_outside_mask(dataset, sample, margin=3) == 0
        assert sample.params["source"].startswith(str(inputs / "masks"))


def test_same_seed_same_bytes(inputs, tmp_path):
    for name in ("a", "b"):
        run("--normal", inputs / "normal", "--masks", inputs / "masks", "--defects", inputs / "defects",
            "--method", "paste", "--n", 10, "--out", tmp_path / name, "--seed", 11)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        if rel.name == "report.html":  # names its own output folder
            continue
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    run("--normal", inputs / "normal", "--method", "draem", "--n", 3, "--out", tmp_path / "c", "--seed", 1)
    run("--normal", inputs / "normal", "--method", "draem", "--n", 3, "--out", tmp_path / "d", "--seed", 2)
    a = (tmp_path / "c" / "test").rglob("*.png")
    assert any((p.read_bytes() != (tmp_path / "d" / p.relative_to(tmp_path / "c")).read_bytes())
               for p in a if (tmp_path / "d" / p.relative_to(tmp_path / "c")).exists())


def test_killed_run_resumes_to_identical_output(inputs, tmp_path):
    args = ["--normal", inputs / "normal", "--masks", inputs / "masks", "--defects", inputs / "defects",
            "--method", "paste", "--blend", "poisson", "--n", 150, "--seed", 5]
    reference = tmp_path / "reference"
    assert run(*args, "--out", reference) == 0

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "synth.cli", "generate", "-q", *map(str, args), "--out", str(killed)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = killed / "manifest.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline:
        if manifest.exists() and manifest.read_text().count('"split": "test"') >= 20:
            break
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    rows_at_kill = manifest.read_text().count('"split": "test"')
    assert 20 <= rows_at_kill < 150, "the kill must land mid-run for this test to mean anything"

    assert run(*args, "--out", killed) == 0
    for path in reference.rglob("*"):
        if path.is_file() and path.name != "report.html":
            twin = killed / path.relative_to(reference)
            assert twin.read_bytes() == path.read_bytes(), path.relative_to(reference)
    leftovers = [p for p in killed.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers


def test_bad_inputs_give_one_clear_error(inputs, tmp_path, capsys):
    empty = tmp_path / "empty_masks"
    empty.mkdir()
    assert run("--normal", inputs / "normal", "--masks", empty, "--method", "paste", "--out", tmp_path / "o1") == 2
    assert "no mask images found" in capsys.readouterr().err

    zeros = tmp_path / "zero_masks" / "crack"
    write_image(zeros / "a.png", np.zeros((32, 32), bool))
    assert run("--normal", inputs / "normal", "--masks", zeros.parent, "--method", "paste",
               "--out", tmp_path / "o2") == 2
    assert "every mask is empty" in capsys.readouterr().err

    wrong = tmp_path / "wrong"
    write_image(wrong / "masks" / "crack" / "a.png", np.ones((10, 10), bool))
    write_image(wrong / "defects" / "crack" / "a.png", np.zeros((20, 20, 3), np.uint8))
    assert run("--normal", inputs / "normal", "--masks", wrong / "masks", "--defects", wrong / "defects",
               "--method", "paste", "--out", tmp_path / "o3") == 2
    err = capsys.readouterr().err
    assert "a.png" in err and "re-export the mask" in err

    assert run("--normal", tmp_path / "missing", "--out", tmp_path / "o4") == 2
    assert "folder not found" in capsys.readouterr().err

    assert run("--normal", inputs / "normal", "--method", "paste", "--blend", "poisson", "--masks",
               inputs / "masks", "--out", tmp_path / "o5") == 2
    assert "--defects" in capsys.readouterr().err


def test_unreadable_normals_are_skipped_and_reported_or_fatal_with_strict(inputs, tmp_path, capsys):
    import shutil

    normals = tmp_path / "normals"
    shutil.copytree(inputs / "normal", normals)
    (normals / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    assert run("--normal", normals, "--method", "cutpaste", "--n", 4, "--out", out) == 0
    info = json.loads((out / "dataset_info.json").read_text())
    assert len(info["skipped_files"]) == 1 and "broken.png" in info["skipped_files"][0]
    assert run("--normal", normals, "--method", "cutpaste", "--n", 4, "--out", tmp_path / "strict",
               "--strict") == 2
    assert "broken.png" in capsys.readouterr().err


def test_rerun_with_other_settings_is_refused_and_nothing_is_lost(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("--normal", inputs / "normal", "--method", "cutpaste", "--n", 4, "--out", out) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert run("--normal", inputs / "normal", "--method", "scar", "--n", 4, "--out", out) == 2
    assert "other settings (method)" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_fewer_normals_than_samples_warns(inputs, tmp_path, caplog):
    assert run("--normal", inputs / "normal", "--method", "cutpaste", "--n", 12, "--out", tmp_path / "o") == 0
    assert "reused" in caplog.text
    sources = {s.source_image for s in read_defect_set(tmp_path / "o").select(split="test")}
    assert len(sources) == 8  # a seeded permutation cycles through every normal image


def test_config_file_and_flag_override(inputs, tmp_path):
    config = tmp_path / "gen.yaml"
    config.write_text(f"normal: {inputs / 'normal'}\nout: {tmp_path / 'from_config'}\nmethod: scar\nn: 3\n")
    assert synth_main(["generate", "-q", "--config", str(config), "--n", "2"]) == 0
    assert len(read_defect_set(tmp_path / "from_config").select(split="test")) == 2
