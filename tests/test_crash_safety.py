"""Crash safety: SIGKILL ``synth generate``, ``detect fit``, ``detect predict`` and ``pipelines run`` mid-run.

After each kill the same command is rerun; the final output must equal an uninterrupted run's byte for byte
(results: value for value, timings aside), nothing may be duplicated and no temporary file may be left behind.
The kill points are drawn from a seeded generator, so a failure reproduces. The file takes about 100 s on a
quiet 2-core machine (each test starts a dozen Python processes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import tree_digest

from detect.base import Detector
from detect.persistence import CONFIG_FILE, WEIGHTS_FILE
from detect.runner import fit_model, predict_to_folder
from synth.toyset import load_texture, plant_defect, random_crop

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
FIT_OPTIONS = ["--image-size", "64", "--set", "blur_sigma=1"]


def leftovers(root: Path) -> list[str]:
    """Temporary / staging files an interrupted run could leave: must all be gone after the rerun."""
    return sorted(p.name for p in root.rglob("*") if p.name.endswith((".tmp", ".partial")) or ".stage-" in p.name)


def kill_when(command: list[str], ready: Callable[[], bool], *, timeout: float = 120.0) -> bool:
    """Start ``command``, SIGKILL it as soon as ``ready()``; False when it finished before that."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=REPO)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if ready():
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.01)
    process.kill()
    process.wait()
    raise AssertionError(f"{command[:4]} neither finished nor reached the kill point in {timeout} s")


def run_ok(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


# --------------------------------------------------------------------------------------------------
# synth generate
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def generate_inputs(tmp_path_factory) -> Path:
    from synth.core.io import write_image

    root = tmp_path_factory.mktemp("gen_inputs")
    rng = np.random.default_rng(1)
    brick, gravel = load_texture("brick"), load_texture("gravel")
    for i in range(6):
        write_image(root / "normal" / f"n{i}.png", random_crop(brick, 80, rng))
    for i in range(2):
        image, mask = plant_defect(random_crop(gravel, 64, rng), "spot", rng)
        write_image(root / "defects" / "spot" / f"s{i}.png", image)
        write_image(root / "masks" / "spot" / f"s{i}_mask.png", mask)
    return root


def test_synth_generate_killed_repeatedly_equals_an_uninterrupted_run(generate_inputs, tmp_path):
    n = 90
    args = ["generate", "-q", "--normal", str(generate_inputs / "normal"), "--masks", str(generate_inputs / "masks"),
            "--defects", str(generate_inputs / "defects"), "--method", "paste", "--n", str(n), "--seed", "3"]
    command = [sys.executable, "-m", "synth.cli", *args]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run_ok([*command, "--out", str(reference)])

    manifest = killed / "manifest.jsonl"

    def rows() -> int:
        try:
            return manifest.read_text().count("\n")
        except FileNotFoundError:
            return 0

    # Kill points: right at start-up, then at seeded random row counts (each later than the last).
    rng = np.random.default_rng(0)
    targets = [0, *sorted(rng.integers(5, n - 10, size=3).tolist())]
    kills = 0
    for target in targets:
        if target == 0:
            kills += kill_when([*command, "--out", str(killed)], lambda: True)
        else:
            kills += kill_when([*command, "--out", str(killed)], lambda t=target: rows() >= t)
    assert kills == len(targets), "every kill must land before the run finished"
    assert rows() < n + 1
    run_ok([*command, "--out", str(killed)])

    skip = lambda p: p.name == "report.html"  # noqa: E731 - report carries the run's timing
    assert tree_digest(killed, skip=skip) == tree_digest(reference, skip=skip)
    names = [json.loads(line)["image"] for line in manifest.read_text().splitlines()]
    assert len(names) == len(set(names)), "no sample may be listed twice"
    assert not leftovers(killed)


# --------------------------------------------------------------------------------------------------
# detect fit
# --------------------------------------------------------------------------------------------------

def fit_command(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "detect.cli", "fit", "-q", "--model", "padim", "--data", str(data),
            "--out", str(out), *FIT_OPTIONS, *extra]


def test_detect_fit_killed_at_random_points_writes_the_same_model(brick_set, tmp_path):
    reference = tmp_path / "reference"
    started = time.monotonic()
    run_ok(fit_command(brick_set.root, reference))
    duration = time.monotonic() - started
    expected = tree_digest(reference)
    assert sorted(expected) == [CONFIG_FILE, WEIGHTS_FILE]

    # A fresh --out killed at random times: nothing half-written is ever visible at --out.
    out = tmp_path / "models" / "padim"
    rng = np.random.default_rng(1)
    for delay in rng.uniform(0.2, 0.9 * duration, size=3):
        start = time.monotonic()
        kill_when(fit_command(brick_set.root, out), lambda d=delay, s=start: time.monotonic() - s >= d)
        assert not out.exists() or tree_digest(out) == expected
    if not out.exists():  # the same command again (a kill after the model was complete leaves nothing to do)
        run_ok(fit_command(brick_set.root, out))
    assert tree_digest(out) == expected
    assert not leftovers(out.parent)

    # --force over an existing model, killed mid-fit: the existing model is untouched until the new one is whole.
    (tmp_path / "other").mkdir()
    previous = tmp_path / "other" / "padim"
    # The model to overwrite is fitted in process (what the CLI runs; the contract test shows both write the same).
    fit_model("padim", brick_set.root, previous, options={"image_size": 64, "blur_sigma": 1, "seed": 7},
              progress=False)
    before = tree_digest(previous)
    start = time.monotonic()
    kill_when(fit_command(brick_set.root, previous, "--force"), lambda: time.monotonic() - start >= duration / 2)
    assert tree_digest(previous) in (before, expected)


def test_fit_interrupted_inside_save_or_swap_recovers(brick_set, tmp_path, monkeypatch):
    """The two windows a timed kill rarely hits: mid-save (staging half written) and mid-swap (model moved aside)."""
    out = tmp_path / "padim"
    options = {"image_size": 64, "blur_sigma": 1}
    fit_model("padim", brick_set.root, out, options=options, progress=False)
    expected = tree_digest(out)

    # 1. Killed while writing the staging folder: --out keeps the old model, the rerun cleans the staging folder.
    real_save = Detector.save

    def dies_mid_save(self: Detector, path: str | Path) -> Path:
        (Path(path) / f".{WEIGHTS_FILE}.tmp").write_bytes(b"half a file")
        raise KeyboardInterrupt  # stands for SIGKILL: nothing after this line runs

    monkeypatch.setattr(Detector, "save", dies_mid_save)
    with pytest.raises(KeyboardInterrupt):
        fit_model("padim", brick_set.root, out, options={**options, "seed": 9}, progress=False, force=True)
    assert tree_digest(out) == expected
    assert [p.name for p in tmp_path.iterdir() if ".stage-" in p.name], "the simulated kill left a staging folder"
    monkeypatch.setattr(Detector, "save", real_save)

    # 2. Killed between moving the old model aside and moving the new one in: --out is momentarily absent.
    old = tmp_path / ".padim.old"
    out.rename(old)
    fit_model("padim", brick_set.root, tmp_path / "unrelated", options=options, progress=False)  # other --out: no-op
    assert old.is_dir() and not out.exists()
    with pytest.raises(Exception, match="already holds a saved model"):
        fit_model("padim", brick_set.root, out, options=options, progress=False)  # restores first, then refuses
    assert tree_digest(out) == expected and not old.exists()
    assert not [p for p in tmp_path.iterdir() if ".stage-" in p.name]


def test_detect_predict_killed_resumes_where_it_stopped(brick_set, tmp_path, one_torch_thread):
    from shutil import copy

    model_dir = tmp_path / "padim"
    fit_model("padim", brick_set.root, model_dir, options={"image_size": 64, "blur_sigma": 1}, progress=False)
    sources = sorted((brick_set.root / "test").rglob("*.png"))
    images = tmp_path / "images"
    images.mkdir()
    for i in range(120):
        copy(sources[i % len(sources)], images / f"img_{i:03d}.png")
    (images / "img_050.png").write_bytes(b"not a png")  # an unreadable image's error row must survive resuming
    command = [sys.executable, "-m", "detect.cli", "predict", "-q", "--model-dir", str(model_dir), str(images),
               "--batch-size", "8", "--out"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    # The uninterrupted run in process (what `detect predict` calls), on one torch thread (one_torch_thread) like
    # the CLI's processes (OMP_NUM_THREADS=1), so float reductions match byte for byte.
    predict_to_folder(model_dir, [images], reference, batch_size=8, progress=False)

    partial = killed / ".scores.partial.csv"

    def scored() -> int:
        try:
            return partial.read_text().count("\n") - 2
        except FileNotFoundError:
            return 0

    rng = np.random.default_rng(3)
    targets = sorted(rng.integers(10, 100, size=2).tolist())
    for target in targets:
        assert kill_when([*command, str(killed)], lambda t=target: scored() >= t), "kill must land mid-run"
    assert 10 <= scored() < 120
    before = scored()
    first_overlay = next((killed / "overlays").glob("00000_*.png"))
    written_at = first_overlay.stat().st_mtime_ns
    # What a kill inside an overlay write leaves (the writer writes beside, then renames): the resume removes it.
    (killed / "overlays" / ".00007_img_007.png.k1ll3d.tmp").write_bytes(b"half an overlay")
    done = subprocess.run([*command, str(killed)], capture_output=True, text=True, env={**ENV}, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (killed / "scores.csv").read_bytes() == (reference / "scores.csv").read_bytes()
    assert tree_digest(killed / "overlays") == tree_digest(reference / "overlays")
    assert not partial.exists() and before > 0
    assert first_overlay.stat().st_mtime_ns == written_at, "images scored before the kill are not scored again"


# --------------------------------------------------------------------------------------------------
# pipelines run
# --------------------------------------------------------------------------------------------------

def _stable(results: dict) -> dict:
    """results.json without what legitimately differs between runs (timings, ran/reused status)."""
    # generated / resumed_from: how many samples a (killed) generate stage wrote in its last run, not what it made;
    # cells_reused: how many few-shot cells a resumed stage took from its cache.
    drop = {"elapsed_s", "fit_s", "status", "seconds", "wall_s", "started", "finished", "report", "generated",
            "resumed_from", "cells_reused"}

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in drop}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return clean(results)


def test_pipelines_run_killed_at_random_points_gives_the_same_results(brick_set, tmp_path):
    def config(out: Path) -> Path:
        data = {"name": "crash", "seed": 0, "data": str(brick_set.root), "out": str(out),
                "generate": {"method": "draem", "n": 8},
                "fewshot": {"models": ["patchcore"], "shots": [1, "all"], "synthetic": ["none", "threshold"],
                            "image_size": 64, "model_options": {"patchcore": {"coreset_ratio": 0.5}}},
                "report": {"samples": 2}}
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        return path

    command = [sys.executable, "-m", "pipelines.cli", "run", "--quiet"]
    reference = tmp_path / "reference"
    started = time.monotonic()
    run_ok([*command, str(config(reference))])
    duration = time.monotonic() - started
    expected = _stable(json.loads((reference / "results.json").read_text()))

    killed = tmp_path / "killed"
    path = config(killed)
    rng = np.random.default_rng(2)
    for delay in sorted(rng.uniform(0.3 * duration, 0.9 * duration, size=2)):
        start = time.monotonic()
        kill_when([*command, str(path)], lambda d=delay, s=start: time.monotonic() - s >= d)
    run_ok([*command, str(path)])
    got = _stable(json.loads((killed / "results.json").read_text()))
    # Paths differ by the out folder only.
    assert json.dumps(got).replace(str(killed), "OUT") == json.dumps(expected).replace(str(reference), "OUT")
    assert not leftovers(killed)
    # Each stage ran to completion exactly once per hash: one folder per stage, each with its done.json.
    stages = sorted(p.name.split("-")[0] for p in (killed / "stages").iterdir())
    assert stages == sorted({"generate", "fewshot"}) and all(
        (p / "done.json").is_file() for p in (killed / "stages").iterdir())
