"""``synth generate`` on several workers and under ``accelerate launch``: the same bytes as one process, and a
killed run (or shard) resumes to them; the PNG writer's settings are lossless."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synth.cli import main as synth_main
from synth.core.io import encode_png, read_image, read_mask, smallest_lossless_mode, write_image
from synth.toyset import write_generation_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """8 brick normals (grayscale files) and 2 + 2 gravel exemplars."""
    return write_generation_inputs(tmp_path_factory.mktemp("parallel_inputs"), seed=1, gray=True)


def _args(inputs: Path, method: str, n: int) -> list[str]:
    args = ["--normal", str(inputs / "normal"), "--method", method, "--n", str(n), "--seed", "4"]
    if method == "paste":
        args += ["--masks", str(inputs / "masks"), "--defects", str(inputs / "defects"), "--blend", "poisson"]
    return args


def _files(root: Path) -> dict[str, bytes]:
    """Every file's bytes, except report.html (it names its own output folder and the run's flags)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "report.html"}


def _assert_same_set(reference: Path, other: Path) -> None:
    expected, got = _files(reference), _files(other)
    assert sorted(got) == sorted(expected)
    different = [name for name in expected if expected[name] != got[name]]
    assert not different, different[:5]


@pytest.mark.parametrize("method", ["perlin", "draem", "cutpaste", "paste"])
def test_workers_write_the_bytes_of_one_process(inputs, tmp_path, method):
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        assert synth_main(["generate", "-q", *_args(inputs, method, 12), "--out", str(out),
                           "--workers", str(workers)]) == 0
    _assert_same_set(tmp_path / "w1", tmp_path / "w2")
    # The grayscale normals stay grayscale in the generated set (colour noise and jitter included): one channel on
    # disk, three when read.
    samples = sorted((tmp_path / "w2" / "test").rglob("*.png"))
    assert len(samples) == 12 and {Image.open(p).mode for p in samples} == {"L"}
    assert read_image(samples[0]).shape[2] == 3


def _kill_when(process: subprocess.Popen, rows: int, manifests: callable, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if sum(p.read_text().count('"split": "test"') for p in manifests()) >= rows:
            break
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_killed_workers_run_resumes_to_the_same_bytes(inputs, tmp_path):
    args = _args(inputs, "paste", 150)
    reference = tmp_path / "reference"
    assert synth_main(["generate", "-q", *args, "--out", str(reference), "--workers", "1"]) == 0
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "synth.cli", "generate", "-q", *args, "--out", str(killed), "--workers", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _kill_when(process, 20, lambda: [killed / "manifest.jsonl"] if (killed / "manifest.jsonl").exists() else [])
    rows_at_kill = (killed / "manifest.jsonl").read_text().count('"split": "test"')
    assert 20 <= rows_at_kill < 150, "the kill must land mid-run for this test to mean anything"
    assert synth_main(["generate", "-q", *args, "--out", str(killed), "--workers", "2"]) == 0
    _assert_same_set(reference, killed)
    assert not [p for p in killed.rglob("*") if p.name.endswith(".tmp")]


def _accelerate(args: list[str], out: Path) -> list[str]:
    launcher = shutil.which("accelerate")
    assert launcher is not None
    # --multi_gpu on a machine without GPUs: two CPU processes joined by gloo (accelerate's MULTI_CPU).
    return [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
            "no", "--dynamo_backend", "no", "--main_process_port", "29517", "-m", "synth.cli", "generate", "-q",
            *args, "--out", str(out), "--workers", "1"]


def test_two_accelerate_processes_write_the_bytes_of_one_and_a_killed_shard_resumes(inputs, tmp_path):
    pytest.importorskip("accelerate")
    args = _args(inputs, "paste", 150)
    reference = tmp_path / "reference"
    assert synth_main(["generate", "-q", *args, "--out", str(reference), "--workers", "1"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    sharded = tmp_path / "sharded"
    done = subprocess.run(_accelerate(args, sharded), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same_set(reference, sharded)
    assert not list(sharded.glob("manifest.shard-*"))  # merged into manifest.jsonl

    killed = tmp_path / "killed"
    process = subprocess.Popen(_accelerate(args, killed), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    _kill_when(process, 20, lambda: list(killed.glob("manifest.shard-*")), timeout=240)
    shard_rows = sum(p.read_text().count('"split": "test"') for p in killed.glob("manifest.shard-*"))
    assert 20 <= shard_rows < 150, "the kill must land mid-run for this test to mean anything"
    # Resumed by one plain process: it merges what the shards finished and makes only the rest.
    assert synth_main(["generate", "-q", *args, "--out", str(killed), "--workers", "2"]) == 0
    _assert_same_set(reference, killed)


@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_png_writer_round_trips_losslessly_at_every_level(tmp_path, level):
    rng = np.random.default_rng(level)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    mask = rng.random((37, 53)) > 0.7
    write_image(tmp_path / "rgb.png", rgb, png_compression=level)
    write_image(tmp_path / "gray.png", gray, png_compression=level)
    write_image(tmp_path / "mask.png", mask, png_compression=level)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "rgb.png")), rgb)  # RGB order, not BGR
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "gray.png")), gray)
    np.testing.assert_array_equal(read_mask(tmp_path / "mask.png"), mask)
    assert encode_png(rgb, level) == encode_png(rgb, level)  # deterministic bytes


def test_grayscale_is_written_with_one_channel_and_read_back_as_rgb(tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, (20, 30), dtype=np.uint8)
    as_rgb = np.repeat(gray[..., None], 3, axis=2)
    assert smallest_lossless_mode(as_rgb).shape == (20, 30)
    colour = as_rgb.copy()
    colour[3, 4, 1] += 1
    assert smallest_lossless_mode(colour) is colour  # one differing pixel keeps it RGB
    write_image(tmp_path / "g.png", smallest_lossless_mode(as_rgb))
    assert Image.open(tmp_path / "g.png").mode == "L"
    np.testing.assert_array_equal(read_image(tmp_path / "g.png"), as_rgb)


def test_bad_png_compression_is_one_clear_error(inputs, tmp_path, capsys):
    assert synth_main(["generate", "-q", *_args(inputs, "perlin", 2), "--out", str(tmp_path / "o"),
                       "--png-compression", "12"]) == 2
    assert "png_compression" in capsys.readouterr().err


def test_generated_defects_take_the_mode_of_their_source_photo():
    from synth.core.io import in_mode_of

    rng = np.random.default_rng(0)
    gray = np.repeat(rng.integers(0, 256, (16, 16, 1), dtype=np.uint8), 3, axis=2)
    colour_noise = gray.copy()
    colour_noise[4:8, 4:8] = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    out = in_mode_of(colour_noise, gray)
    assert out.shape == (16, 16)
    outside = np.ones((16, 16), bool)
    outside[4:8, 4:8] = False
    np.testing.assert_array_equal(out[outside], gray[..., 0][outside])  # gray pixels keep their exact value
    colour = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert in_mode_of(colour_noise, colour) is colour_noise  # an RGB source keeps RGB output


# ------------------------------------------------------------------------------------ detect predict shards


def test_detect_predict_on_two_accelerate_processes_writes_the_table_of_one(brick_set, tmp_path):
    pytest.importorskip("accelerate")
    from detect.runner import PARTIAL_SCORES, fit_model, predict_run_key
    from synth.core.io import iter_paths

    model_dir = tmp_path / "padim"
    fit_model("padim", brick_set.root, model_dir, options={"image_size": 64, "blur_sigma": 1}, progress=False)
    images = tmp_path / "images"
    images.mkdir()
    for i, source in enumerate(sorted((brick_set.root / "test").rglob("*.png"))[:20]):
        shutil.copy(source, images / f"img_{i:03d}.png")
    (images / "img_007.png").write_bytes(b"not a png")  # an error row must come through the merge too
    command = ["predict", "-q", "--model-dir", str(model_dir), str(images), "--batch-size", "3", "--out"]
    reference, sharded = tmp_path / "reference", tmp_path / "sharded"
    # One torch thread in every process (accelerate's default per launched process): the same float reductions.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    plain = subprocess.run([sys.executable, "-m", "detect.cli", *command, str(reference)], capture_output=True,
                           text=True, env=env)
    assert plain.returncode == 0, plain.stderr[-2000:]

    # Resume state of a killed launch: shard 1 of 2 had scored images 1 and 3 (rows copied from the reference);
    # the launch must score only the rest (in the batches of a one-process run of the rest) and write the
    # reference table.
    rows = (reference / "scores.csv").read_text().splitlines()
    key = predict_run_key(model_dir, iter_paths([images]), True)
    sharded.mkdir()
    header = f"# {key}\nindex,{rows[0]}\n"
    (sharded / f"{PARTIAL_SCORES}.shard-001-of-002").write_text(header + f"1,{rows[2]}\n3,{rows[4]}\n")
    launcher = shutil.which("accelerate")
    done = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--main_process_port", "29518", "-m", "detect.cli", *command, str(sharded)],
        capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (sharded / "scores.csv").read_bytes() == (reference / "scores.csv").read_bytes()
    assert not list(sharded.glob(".scores.partial*"))
    overlays = sorted(p.name for p in (sharded / "overlays").glob("*.png"))
    # Images 1 and 3 were done before the launch: not scored again, so no overlay of theirs is written now.
    assert len(overlays) == 19 - 2 and not any(name.startswith(("00001_", "00003_")) for name in overlays)
