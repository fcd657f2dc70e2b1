"""Bad-input matrix for every CLI entry point (issue 9): exit status 2, one clear message, nothing already written lost.

Each case runs the real ``main([...])`` of ``synth`` / ``detect`` / ``pipelines`` in-process and asserts:

- the exit status is 2 (user error; argparse's own usage errors exit 2 as well),
- stderr holds exactly one ``error:`` line, naming the offending file / key / flag (key substrings below), and
  no traceback.

A few cases also run as subprocesses (``python -m synth.cli ...``) to check the real exit status and that stderr is
that single line. Odd but valid images (RGBA, 16-bit, grayscale, palette) must work and come out as 8-bit RGB;
documented skips (unreadable normals in ``synth generate``, unreadable images in ``detect predict``, empty masks
among good ones in ``paste``) are asserted as skips. The last tests inject bad inputs into commands whose output
folder already holds results and check those files are byte-identical afterwards.

Cost: one tiny PaDiM fit (64 px) shared by the module; everything else fails during validation.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from helpers import tree_digest
from PIL import Image

from detect.cli import main as detect_main
from pipelines.cli import main as pipelines_main
from synth.cli import main as synth_main
from synth.core.errors import ConfigError
from synth.core.io import read_image

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
MAINS: dict[str, Callable[[Sequence[str] | None], int]] = {
    "synth": synth_main, "detect": detect_main, "pipelines": pipelines_main,
}


# --------------------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------------------

def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` RGB pixels but holds no pixel data (nothing is allocated)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


BAD_FILES: dict[str, Callable[[bytes], tuple[str, bytes]]] = {
    # name -> (file name, bytes) made from the bytes of a good PNG
    "zero": lambda good: ("bad.png", b""),
    "trunc": lambda good: ("bad.png", good[: len(good) // 2]),
    "text": lambda good: ("bad.png", b"this is a text file, not an image\n"),
    "huge": lambda good: ("huge.png", png_claiming(100_000, 100_000)),
}


@pytest.fixture(scope="module")
def paths(brick_set, tmp_path_factory) -> dict[str, Path]:
    """Every bad (and odd-but-valid) input of the matrix, built from the brick set; keys are argv placeholders."""
    root = tmp_path_factory.mktemp("bad_inputs")
    brick = brick_set.root
    goods = sorted((brick / "train" / "good").glob("*.png"))
    p: dict[str, Path] = {"brick": brick, "missing": root / "missing", "empty": root / "empty",
                          "png": goods[0], "defects": brick / "test", "gt": brick / "ground_truth"}
    p["empty"].mkdir()

    for kind, make in BAD_FILES.items():  # 4 good normals + one bad file
        folder = root / f"normals_{kind}"
        folder.mkdir()
        for good in goods[:4]:
            shutil.copy(good, folder / good.name)
        name, data = make(goods[5].read_bytes())
        (folder / name).write_bytes(data)
        p[f"normals_{kind}"] = folder
    folder = p["normals_truncjpg"] = root / "normals_truncjpg"
    folder.mkdir()
    for good in goods[:4]:
        shutil.copy(good, folder / good.name)
    Image.open(goods[5]).save(folder / "x.jpg", quality=95)
    (folder / "x.jpg").write_bytes((folder / "x.jpg").read_bytes()[:600])
    folder = p["normals_allbad"] = root / "normals_allbad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "b.png").write_text("not an image")
    folder = p["bad_files"] = root / "bad_files"  # only bad files, for detect predict's documented skip
    folder.mkdir()
    for kind, make in BAD_FILES.items():
        name, data = make(goods[5].read_bytes())
        (folder / f"{kind}_{name}").write_bytes(data)

    # Odd but valid images: must be converted (synth/core/io.py) to 8-bit RGB.
    folder = p["modes"] = root / "modes"
    folder.mkdir()
    rgb = np.asarray(Image.open(goods[0]).convert("RGB"))
    Image.fromarray(rgb).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(rgb).convert("LA").save(folder / "la.png")
    Image.fromarray(rgb).convert("L").save(folder / "gray.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257).save(folder / "gray16.png")
    import cv2

    cv2.imwrite(str(folder / "rgb16.png"), rgb[:, :, ::-1].astype(np.uint16) * 257)

    # Masks for method paste / train-controlnet: <class>/<name>_mask.png like the brick set's ground_truth.
    sources = sorted((brick / "ground_truth" / "spot").glob("*.png"))[:2]
    for kind in ("wrongsize", "zero", "rgb", "16bit", "onezero"):
        folder = p[f"masks_{kind}"] = root / f"masks_{kind}"
        (folder / "spot").mkdir(parents=True)
        for index, source in enumerate(sources):
            mask = np.asarray(Image.open(source).convert("L"))
            if kind == "wrongsize":
                Image.fromarray(mask).resize((32, 32), Image.NEAREST).save(folder / "spot" / source.name)
            elif kind == "zero" or (kind == "onezero" and index == 0):
                Image.fromarray(np.zeros_like(mask)).save(folder / "spot" / source.name)
            elif kind == "rgb":
                Image.fromarray(np.repeat(mask[:, :, None], 3, axis=2)).save(folder / "spot" / source.name)
            elif kind == "16bit":
                Image.fromarray(mask.astype(np.uint16) * 257).save(folder / "spot" / source.name)
            else:
                shutil.copy(source, folder / "spot" / source.name)

    # Defect sets with one bad file each (copies of the brick set).
    p["set_badimage"] = root / "set_badimage"
    shutil.copytree(brick, p["set_badimage"])
    victim = sorted((p["set_badimage"] / "test" / "spot").glob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:200])
    p["set_badmask"] = root / "set_badmask"
    shutil.copytree(brick, p["set_badmask"])
    victim = sorted((p["set_badmask"] / "ground_truth" / "spot").glob("*.png"))[0]
    Image.open(victim).resize((32, 32), Image.NEAREST).save(victim)

    # Configs.
    def yaml_file(name: str, text: str) -> None:
        (root / name).write_text(text)
        p[name.removesuffix(".yaml").replace("-", "_")] = root / name

    normal, out = brick / "train" / "good", root / "cfg_out"
    yaml_file("syntax.yaml", "normal: [a\n  b: 1\n")
    yaml_file("list.yaml", "- a\n- b\n")
    yaml_file("gen_unknown.yaml", f"normal: {normal}\nout: {out}\nnn: 3\n")
    yaml_file("gen_range.yaml", f"normal: {normal}\nout: {out}\npreview: 1000\n")
    yaml_file("gen_type.yaml", f"normal: {normal}\nout: {out}\nn: many\n")
    yaml_file("filter_both.yaml", f"generated: {brick}\nreal_defects: {brick}\nout: {out}\n"
                                  f"stage1_keep: 2\nstage1_ratio: 0.5\n")
    yaml_file("csm_unknown.yaml", f"data: {brick}\nout: {out}\nlerning_rate: 0.1\n")
    yaml_file("det_unknown.yaml", "imagesize: 64\n")
    yaml_file("det_range.yaml", "image_size: 0\n")
    yaml_file("det_type.yaml", "image_size: abc\n")
    yaml_file("det_model.yaml", "model: nosuch\n")
    head = f"name: t\ndata: {brick}\nout: {root / 'pipeline_out'}\n"
    yaml_file("pipe_unknown_top.yaml", head + "generat: {method: perlin, n: 4}\n")
    yaml_file("pipe_unknown_key.yaml", head + "generate: {method: perlin, nn: 4}\n")
    yaml_file("pipe_range.yaml", head + "generate: {method: perlin, n: -4}\n")
    yaml_file("pipe_type.yaml", head + "generate: 5\n")
    yaml_file("pipe_method.yaml", head + "generate: {method: nosuch}\n")
    yaml_file("pipe_model.yaml", head + "fewshot: {models: [nosuch], shots: [1]}\n")
    yaml_file("pipe_shots.yaml", head + "fewshot: {models: [padim], shots: [-1]}\n")
    yaml_file("pipe_realism.yaml", head + "realism: {max_images: 1}\n")
    yaml_file("pipe_nodata.yaml", f"data: {root / 'missing'}\nout: {root / 'pipeline_out'}\n"
                                  f"generate: {{method: perlin, n: 4}}\n")
    yaml_file("pipe_filedata.yaml", f"data: {goods[0]}\nout: {root / 'pipeline_out'}\n")
    yaml_file("pipe_fileout.yaml", f"data: {brick}\nout: {goods[0]}\ngenerate: {{method: perlin, n: 4}}\n")
    yaml_file("pipe_nodatakey.yaml", f"out: {root / 'pipeline_out'}\n")

    # Saved-model folders that are not models.
    p["model_empty"] = root / "model_empty"
    p["model_empty"].mkdir()
    p["model_badjson"] = root / "model_badjson"
    p["model_badjson"].mkdir()
    (p["model_badjson"] / "config.json").write_text("{not json")
    (p["model_badjson"] / "model.safetensors").write_bytes(b"\0" * 16)
    return p


@pytest.fixture(scope="module")
def model(paths, tmp_path_factory) -> Path:
    """A fitted PaDiM at 64 px (about 2 s): what predict / eval need."""
    out = tmp_path_factory.mktemp("model") / "padim"
    assert detect_main(["fit", "-q", "--model", "padim", "--data", str(paths["brick"]), "--out", str(out),
                        "--image-size", "64", "--set", "blur_sigma=1"]) == 0
    return out


@pytest.fixture(scope="module")
def generated(paths, tmp_path_factory) -> Path:
    """A small perlin defect set (synth generate), the input of synth filter."""
    out = tmp_path_factory.mktemp("generated") / "perlin"
    assert synth_main(["generate", "-q", "--normal", str(paths["brick"] / "train" / "good"), "--method", "perlin",
                       "--n", "4", "--out", str(out)]) == 0
    return out


def run_main(argv: Sequence[str], capsys) -> tuple[int, str]:
    """Run a CLI in-process; argparse's usage errors (SystemExit) count as their exit status."""
    try:
        rc = MAINS[argv[0]](list(argv[1:]))
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    return rc, capsys.readouterr().err


def assert_one_clear_error(rc: int, err: str, needles: Sequence[str]) -> str:
    """Exit 2, exactly one ``error:`` line holding every needle, no traceback; returns the line."""
    assert "Traceback" not in err, err
    assert rc == 2, f"exit status {rc}, stderr:\n{err}"
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# --------------------------------------------------------------------------------------------------------------
# the matrix: (id, argv with {placeholders}, substrings the one error line must hold)
# --------------------------------------------------------------------------------------------------------------

GEN = ["synth", "generate", "-q", "--out", "{out}"]
GEN_BRICK = [*GEN, "--normal", "{brick}/train/good"]
FILTER = ["synth", "filter", "-q", "--out", "{out}", "--embedder", "lite0"]
TCN = ["synth", "train-controlnet", "-q", "--out", "{out}", "--pretrained", "{missing}"]
TCSM = ["synth", "train-csm", "-q", "--out", "{out}", "--pretrained", "{missing}"]
FIT = ["detect", "fit", "-q", "--out", "{out}"]
FIT_PADIM = [*FIT, "--model", "padim", "--data", "{brick}", "--image-size", "64"]
PREDICT = ["detect", "predict", "-q", "--out", "{out}"]
EVAL = ["detect", "eval", "-q", "--model-dir", "{model}"]
CALIBRATE = ["detect", "calibrate", "-q", "--model-dir", "{model}", "--out", "{out}"]
BENCH = ["detect", "benchmark", "-q", "--out", "{out}"]
RUN = ["pipelines", "run", "-q"]

MATRIX: list[tuple[str, list[str], list[str]]] = [
    # ---- pipelines demo: the one path it takes
    ("demo-out-is-file", ["pipelines", "demo", "-q", "--out", "{png}"], ["{png}", "is a file", "choose a folder"]),
    # ---- synth generate: paths and images
    ("generate-normal-missing", [*GEN, "--normal", "{missing}", "--n", "2"], ["{missing}", "not found"]),
    ("generate-normal-empty", [*GEN, "--normal", "{empty}", "--n", "2"], ["{empty}", "no images found"]),
    ("generate-normal-is-file", [*GEN, "--normal", "{png}", "--n", "2"], ["{png}", "expected a folder"]),
    ("generate-normal-all-unreadable", [*GEN, "--normal", "{normals_allbad}", "--n", "2"],
     ["{normals_allbad}", "none of the images could be read"]),
    ("generate-zero-byte-strict", [*GEN, "--normal", "{normals_zero}", "--strict"], ["bad.png", "0 bytes", "remove"]),
    ("generate-truncated-png-strict", [*GEN, "--normal", "{normals_trunc}", "--strict"],
     ["bad.png", "cannot decode", "truncated", "re-export"]),
    ("generate-truncated-jpeg-strict", [*GEN, "--normal", "{normals_truncjpg}", "--strict"],
     ["x.jpg", "cannot decode"]),
    ("generate-text-as-png-strict", [*GEN, "--normal", "{normals_text}", "--strict"], ["bad.png", "not an image"]),
    ("generate-huge-image-strict", [*GEN, "--normal", "{normals_huge}", "--strict"],
     ["huge.png", "100000x100000", "above the limit", "downscale"]),
    ("generate-out-is-file", [*GEN_BRICK[:3], "--out", "{png}", "--normal", "{brick}/train/good"],
     ["{png}", "is a file", "choose a folder"]),
    # ---- synth generate: masks
    ("generate-paste-no-masks", [*GEN_BRICK, "--method", "paste"], ["method 'paste'", "--masks"]),
    ("generate-masks-missing", [*GEN_BRICK, "--method", "paste", "--masks", "{missing}"],
     ["{missing}", "masks folder not found"]),
    ("generate-masks-is-file", [*GEN_BRICK, "--method", "paste", "--masks", "{png}"],
     ["{png}", "expected a folder of masks"]),
    ("generate-mask-wrong-size", [*GEN_BRICK, "--method", "paste", "--masks", "{masks_wrongsize}",
                                  "--defects", "{defects}"],
     ["brick_spot_000_mask.png", "32x32", "64x64", "re-export the mask"]),
    ("generate-masks-all-zero", [*GEN_BRICK, "--method", "paste", "--masks", "{masks_zero}"],
     ["{masks_zero}", "every mask is empty"]),
    ("generate-mask-zero-strict", [*GEN_BRICK, "--method", "paste", "--masks", "{masks_zero}", "--strict"],
     ["brick_spot_000_mask.png", "mask is empty"]),
    ("generate-defects-missing", [*GEN_BRICK, "--method", "paste", "--masks", "{gt}", "--defects", "{missing}"],
     ["no defect image named", "{missing}", "share names"]),
    ("generate-blend-needs-defects", [*GEN_BRICK, "--method", "paste", "--masks", "{gt}", "--blend", "texture"],
     ["--defects"]),
    # ---- synth generate: values
    ("generate-unknown-method", [*GEN_BRICK, "--method", "nosuch"], ["--method", "invalid choice", "'nosuch'"]),
    ("generate-negative-n", [*GEN_BRICK, "--n", "-2"], ["key 'n'", "greater than 0", "-2"]),
    ("generate-zero-n", [*GEN_BRICK, "--n", "0"], ["key 'n'", "greater than 0"]),
    ("generate-n-not-int", [*GEN_BRICK, "--n", "abc"], ["--n", "invalid int value"]),
    ("generate-negative-seed", [*GEN_BRICK, "--seed", "-1"], ["key 'seed'", "greater than or equal to 0"]),
    ("generate-set-without-equals", [*GEN_BRICK, "--set", "foo"], ["--set 'foo'", "KEY=VALUE"]),
    ("generate-set-invalid-yaml", [*GEN_BRICK, "--set", "x=[1"], ["--set 'x=[1'", "not valid YAML", "line 1"]),
    ("generate-unknown-method-param", [*GEN_BRICK, "--set", "foo=1"],
     ["method_params for 'perlin'", "'foo'", "valid keys", "threshold"]),
    ("generate-method-param-type", [*GEN_BRICK, "--set", "threshold=abc"],
     ["method_params for 'perlin'", "threshold must be a number", "'abc'"]),
    ("generate-method-param-range", [*GEN_BRICK, "--method", "draem", "--set", "p_anomaly=5"],
     ["method_params for 'draem'", "p_anomaly must be in [0, 1]"]),
    ("generate-paste-param-range", [*GEN_BRICK, "--method", "paste", "--masks", "{gt}", "--set", "scale=-3"],
     ["method_params for 'paste'", "scale"]),
    ("generate-paste-unknown-param", [*GEN_BRICK, "--method", "paste", "--masks", "{gt}", "--set", "sclae=2"],
     ["method_params for 'paste'", "'sclae'", "valid keys", "scale"]),
    ("generate-anomaly-source-missing", [*GEN_BRICK, "--method", "draem", "--anomaly-source", "{missing}"],
     ["{missing}", "does not exist"]),
    ("generate-controlnet-no-weights", [*GEN_BRICK, "--method", "controlnet"],
     ["method_params", "'controlnet'", "Field required"]),
    # ---- synth generate: config files
    ("generate-config-missing", ["synth", "generate", "--config", "{missing}"], ["{missing}", "config file not found"]),
    ("generate-config-is-folder", ["synth", "generate", "--config", "{empty}"],
     ["{empty}", "expected a YAML config file, got a folder"]),
    ("generate-config-syntax", ["synth", "generate", "--config", "{syntax}"],
     ["{syntax}", "invalid YAML at line 2, column 4", "fix the syntax"]),
    ("generate-config-not-mapping", ["synth", "generate", "--config", "{list}"],
     ["{list}", "expected a mapping", "got list"]),
    ("generate-config-unknown-key", ["synth", "generate", "--config", "{gen_unknown}"],
     ["{gen_unknown}", "key 'nn'", "unknown key", "did you mean 'n'"]),
    ("generate-config-out-of-range", ["synth", "generate", "--config", "{gen_range}"],
     ["{gen_range}", "key 'preview'", "less than or equal to 256", "1000"]),
    ("generate-config-wrong-type", ["synth", "generate", "--config", "{gen_type}"],
     ["{gen_type}", "key 'n'", "valid integer", "'many'"]),
    # ---- synth filter
    ("filter-generated-missing", [*FILTER, "--generated", "{missing}", "--real-defects", "{brick}"],
     ["{missing}", "not found"]),
    ("filter-generated-is-file", [*FILTER, "--generated", "{png}", "--real-defects", "{brick}"],
     ["{png}", "expected a dataset folder"]),
    ("filter-generated-not-a-set", [*FILTER, "--generated", "{empty}", "--real-defects", "{brick}"],
     ["{empty}", "not a defect set"]),
    ("filter-real-missing", [*FILTER, "--generated", "{generated}", "--real-defects", "{missing}"],
     ["{missing}", "real defects folder not found", "--real-defects"]),
    ("filter-real-empty", [*FILTER, "--generated", "{generated}", "--real-defects", "{empty}"],
     ["{empty}", "no real defect images"]),
    ("filter-ratio-above-1", [*FILTER, "--generated", "{generated}", "--real-defects", "{brick}",
                              "--stage1-ratio", "1.5"], ["key 'stage1_ratio'", "less than or equal to 1"]),
    ("filter-negative-keep", [*FILTER, "--generated", "{generated}", "--real-defects", "{brick}",
                              "--stage2-keep", "-3"], ["key 'stage2_keep'", "greater than 0"]),
    ("filter-image-size-0", [*FILTER, "--generated", "{generated}", "--real-defects", "{brick}",
                             "--image-size", "0"], ["key 'image_size'", "greater than or equal to 16"]),
    ("filter-unknown-embedder", ["synth", "filter", "--embedder", "nosuch"], ["--embedder", "invalid choice"]),
    ("filter-embedder-weights-missing", [*FILTER, "--generated", "{generated}", "--real-defects", "{brick}",
                                         "--embedder-path", "{missing}"],
     ["{missing}", "weights file not found"]),
    ("filter-config-syntax", ["synth", "filter", "--config", "{syntax}"], ["{syntax}", "invalid YAML"]),
    ("filter-config-keep-and-ratio", ["synth", "filter", "--config", "{filter_both}"],
     ["{filter_both}", "set either stage1_keep or stage1_ratio"]),
    # ---- synth train-controlnet / train-csm (fail before any model is loaded)
    ("controlnet-data-missing", [*TCN, "--data", "{missing}"], ["{missing}", "not found"]),
    ("controlnet-pretrained-missing", [*TCN, "--data", "{brick}"], ["{missing}", "--pretrained"]),
    ("controlnet-resolution-0", [*TCN, "--data", "{brick}", "--resolution", "0"],
     ["key 'resolution'", "greater than or equal to 8"]),
    ("controlnet-negative-steps", [*TCN, "--data", "{brick}", "--train-steps", "-1"], ["key 'train_steps'"]),
    ("controlnet-set-without-equals", [*TCN, "--data", "{brick}", "--set", "shots"], ["--set 'shots'", "KEY=VALUE"]),
    ("controlnet-unknown-key", [*TCN, "--data", "{brick}", "--set", "shot=2"],
     ["key 'shot'", "unknown key", "did you mean 'shots'"]),
    ("controlnet-config-syntax", ["synth", "train-controlnet", "--config", "{syntax}"], ["{syntax}", "invalid YAML"]),
    ("controlnet-masks-all-zero", [*TCN, "--masks", "{masks_zero}", "--defects", "{defects}"],
     ["{masks_zero}", "every mask is empty"]),
    ("controlnet-mask-wrong-size", [*TCN, "--masks", "{masks_wrongsize}", "--defects", "{defects}"],
     ["brick_spot_000_mask.png", "32x32"]),
    ("controlnet-mask-wrong-size-in-set", [*TCN, "--data", "{set_badmask}"], ["brick_spot_000_mask.png", "32x32"]),
    ("csm-data-missing", [*TCSM, "--data", "{missing}"], ["{missing}", "not found"]),
    ("csm-resolution-not-multiple-of-8", [*TCSM, "--data", "{brick}", "--resolution", "7"],
     ["key 'resolution'", "multiple of 8"]),
    ("csm-negative-learning-rate", [*TCSM, "--data", "{brick}", "--learning-rate", "-1"],
     ["key 'learning_rate'", "greater than 0"]),
    ("csm-config-unknown-key", ["synth", "train-csm", "--config", "{csm_unknown}"],
     ["{csm_unknown}", "key 'lerning_rate'", "did you mean 'learning_rate'"]),
    # ---- synth inspect / export-hf / toyset / demo
    ("inspect-missing", ["synth", "inspect", "{missing}"], ["{missing}", "not found"]),
    ("inspect-file", ["synth", "inspect", "{png}"], ["{png}", "expected a dataset folder"]),
    ("inspect-not-a-set", ["synth", "inspect", "{empty}"], ["{empty}", "not a defect set"]),
    ("inspect-check-truncated-image", ["synth", "inspect", "{set_badimage}", "--check"],
     ["brick_spot_000.png", "cannot decode"]),
    ("inspect-check-mask-wrong-size", ["synth", "inspect", "{set_badmask}", "--check"],
     ["brick_spot_000_mask.png", "32x32"]),
    ("export-hf-missing", ["synth", "export-hf", "{missing}", "--out", "{out}"], ["{missing}", "not found"]),
    ("toyset-size-0", ["synth", "toyset", "--out", "{out}", "--size", "0"], ["size 0", ">= 16"]),
    ("toyset-negative-count", ["synth", "toyset", "--out", "{out}", "--n-train", "-1"], ["n_train -1", ">= 0"]),
    ("demo-out-is-file", ["synth", "demo", "-q", "--out", "{png}"], ["{png}", "is a file"]),
    # ---- detect fit
    ("fit-unknown-model", [*FIT, "--model", "nosuch", "--data", "{brick}"], ["unknown model 'nosuch'", "Available"]),
    ("fit-model-typo", [*FIT, "--model", "patchcor", "--data", "{brick}"], ["Did you mean patchcore"]),
    ("fit-no-model", [*FIT, "--data", "{brick}"], ["no model given", "--model"]),
    ("fit-data-missing", [*FIT, "--model", "padim", "--data", "{missing}"], ["{missing}", "not found"]),
    ("fit-data-empty", [*FIT, "--model", "padim", "--data", "{empty}"], ["{empty}", "no images found"]),
    ("fit-zero-byte-image", [*FIT, "--model", "padim", "--data", "{normals_zero}", "--image-size", "64"],
     ["bad.png", "0 bytes"]),
    ("fit-truncated-image", [*FIT, "--model", "padim", "--data", "{normals_trunc}", "--image-size", "64"],
     ["bad.png", "truncated"]),
    ("fit-text-as-png", [*FIT, "--model", "padim", "--data", "{normals_text}", "--image-size", "64"],
     ["bad.png", "cannot decode"]),
    ("fit-huge-image", [*FIT, "--model", "padim", "--data", "{normals_huge}", "--image-size", "64"],
     ["huge.png", "above the limit"]),
    ("fit-image-size-0", [*FIT_PADIM, "--image-size", "0"], ["key 'image_size'", "multiple of 8", "(got 0)"]),
    ("fit-image-size-odd", [*FIT_PADIM, "--image-size", "65"], ["key 'image_size'", "(got 65)"]),
    ("fit-image-size-wrong-type", [*FIT, "--model", "padim", "--data", "{brick}", "--set", "image_size=abc"],
     ["key 'image_size'", "an integer"]),
    ("fit-batch-size-float", [*FIT_PADIM, "--set", "batch_size=2.5"], ["key 'batch_size'", "an integer"]),
    ("fit-negative-batch-size", [*FIT_PADIM, "--set", "batch_size=-1"], ["key 'batch_size'", ">= 1"]),
    ("fit-ratio-above-1", [*FIT_PADIM, "--set", "val_fraction=1.5"], ["key 'val_fraction'", "[0, 1)"]),
    ("fit-negative-seed", [*FIT_PADIM, "--set", "seed=-1"], ["key 'seed'", ">= 0"]),
    ("fit-bad-choice", [*FIT_PADIM, "--set", "threshold_method=nope"], ["key 'threshold_method'", "'percentile'"]),
    ("fit-layers-wrong-type", [*FIT_PADIM, "--set", "layers=5"], ["key 'layers'", "a list"]),
    ("fit-unknown-option", [*FIT_PADIM, "--set", "foo=1"], ["unknown option(s) ['foo']", "valid options"]),
    ("fit-set-without-equals", [*FIT_PADIM, "--set", "foo"], ["--set 'foo'", "key=value"]),
    ("fit-set-invalid-yaml", [*FIT_PADIM, "--set", "layers=[2"], ["--set 'layers=[2'", "not valid YAML"]),
    ("fit-unknown-backbone", [*FIT_PADIM, "--set", "backbone=nosuchnet"], ["'nosuchnet'"]),
    ("fit-config-missing", [*FIT_PADIM, "--config", "{missing}"], ["{missing}", "config file not found"]),
    ("fit-config-syntax", [*FIT_PADIM, "--config", "{syntax}"], ["{syntax}", "invalid YAML at line"]),
    ("fit-config-not-mapping", [*FIT_PADIM, "--config", "{list}"], ["{list}", "expected a mapping"]),
    ("fit-config-unknown-key", [*FIT, "--model", "padim", "--data", "{brick}", "--config", "{det_unknown}"],
     ["['imagesize']", "image_size"]),
    ("fit-config-out-of-range", [*FIT, "--model", "padim", "--data", "{brick}", "--config", "{det_range}"],
     ["key 'image_size'", "(got 0)"]),
    ("fit-config-wrong-type", [*FIT, "--model", "padim", "--data", "{brick}", "--config", "{det_type}"],
     ["key 'image_size'", "an integer", "'abc'"]),
    ("fit-config-unknown-model", [*FIT, "--data", "{brick}", "--config", "{det_model}"], ["unknown model 'nosuch'"]),
    ("fit-out-is-file", ["detect", "fit", "-q", "--out", "{png}", "--model", "padim", "--data", "{brick}"],
     ["{png}", "is a file"]),
    ("fit-out-holds-model", ["detect", "fit", "-q", "--out", "{model}", "--model", "padim", "--data", "{brick}"],
     ["{model}", "already holds a saved model", "--force"]),
    ("fit-val-missing", [*FIT_PADIM, "--val", "{missing}"], ["{missing}", "not found"]),
    ("fit-anomalies-unsupervised", [*FIT_PADIM, "--anomalies", "{brick}"],
     ["padim trains on normal images only", "supersimplenet"]),
    ("fit-anomalies-missing", [*FIT, "--model", "supersimplenet", "--data", "{brick}", "--anomalies", "{missing}"],
     ["{missing}", "not found"]),
    # ---- detect predict
    ("predict-model-missing", [*PREDICT, "--model-dir", "{missing}", "{brick}/test/good"],
     ["config.json", "not a saved model folder"]),
    ("predict-model-empty-folder", [*PREDICT, "--model-dir", "{model_empty}", "{brick}/test/good"],
     ["{model_empty}", "not a saved model folder"]),
    ("predict-model-is-file", [*PREDICT, "--model-dir", "{png}", "{brick}/test/good"],
     ["{png}", "not a saved model folder"]),
    ("predict-model-corrupt-config", [*PREDICT, "--model-dir", "{model_badjson}", "{brick}/test/good"],
     ["config.json", "corrupted model config", "re-save"]),
    ("predict-images-missing", [*PREDICT, "--model-dir", "{model}", "{missing}"], ["{missing}", "not found"]),
    ("predict-images-empty", [*PREDICT, "--model-dir", "{model}", "{empty}"], ["{empty}", "no images found"]),
    ("predict-folder-of-folders", [*PREDICT, "--model-dir", "{model}", "{brick}/test"],
     ["no images found", "subfolders are not searched", "good"]),
    ("predict-batch-size-0", [*PREDICT, "--model-dir", "{model}", "{brick}/test/good", "--batch-size", "0"],
     ["--batch-size 0", ">= 1"]),
    ("predict-out-is-file", ["detect", "predict", "-q", "--out", "{png}", "--model-dir", "{model}",
                             "{brick}/test/good"], ["{png}", "is a file"]),
    # ---- detect eval
    ("eval-data-missing", [*EVAL, "--data", "{missing}"], ["{missing}", "not found"]),
    ("eval-data-is-file", [*EVAL, "--data", "{png}"], ["{png}", "expected a dataset folder"]),
    ("eval-data-not-a-set", [*EVAL, "--data", "{normals_zero}"], ["{normals_zero}", "not a defect set"]),
    ("eval-truncated-test-image", [*EVAL, "--data", "{set_badimage}", "--out", "{out}"],
     ["brick_spot_000.png", "cannot decode"]),
    ("eval-mask-wrong-size", [*EVAL, "--data", "{set_badmask}", "--out", "{out}"],
     ["brick_spot_000_mask.png", "32x32", "re-export the mask"]),
    ("eval-out-is-file", [*EVAL, "--data", "{brick}", "--out", "{png}"], ["{png}", "is a file"]),
    ("eval-model-missing", ["detect", "eval", "--model-dir", "{missing}", "--data", "{brick}"],
     ["not a saved model folder"]),
    # ---- detect calibrate
    ("calibrate-data-missing", [*CALIBRATE, "--data", "{missing}"], ["{missing}", "not found"]),
    ("calibrate-data-empty", [*CALIBRATE, "--data", "{empty}"], ["{empty}", "no images found"]),
    ("calibrate-zero-byte-image", [*CALIBRATE, "--data", "{normals_zero}"], ["bad.png", "0 bytes"]),
    ("calibrate-bad-target-fpr", [*CALIBRATE, "--data", "{defects}", "--target-fpr", "1.5"], ["key 'target_fpr'"]),
    ("calibrate-out-is-file", [*CALIBRATE, "--data", "{brick}", "--out", "{png}"], ["{png}", "is a file"]),
    ("calibrate-model-missing", ["detect", "calibrate", "--model-dir", "{missing}", "--data", "{brick}"],
     ["not a saved model folder"]),
    # ---- detect classify / detect inspect
    ("classify-fit-data-missing", ["detect", "classify", "fit", "-q", "--data", "{missing}", "--out", "{out}"],
     ["{missing}", "not found"]),
    ("classify-fit-unknown-option", ["detect", "classify", "fit", "-q", "--data", "{brick}", "--out", "{out}",
                                     "--set", "stepz=3"], ["key 'stepz'", "did you mean 'steps'"]),
    ("classify-predict-model-missing", ["detect", "classify", "predict", "-q", "--model-dir", "{missing}",
                                        "{brick}/test/good", "--out", "{out}"], ["no saved classifier"]),
    ("classify-eval-model-missing", ["detect", "classify", "eval", "-q", "--model-dir", "{missing}", "--data",
                                     "{brick}"], ["no saved classifier"]),
    ("inspect-detector-missing", ["detect", "inspect", "-q", "--detector", "{missing}", "--classifier", "{missing}",
                                  "{brick}/test/good", "--out", "{out}"], ["not a saved model folder"]),
    # ---- detect benchmark (all checked before any model runs)
    ("benchmark-unknown-model", [*BENCH, "--models", "padim,nosuch", "--data", "{brick}"], ["unknown model 'nosuch'"]),
    ("benchmark-no-models", [*BENCH, "--models", ",", "--data", "{brick}"], ["no model names", "--models"]),
    ("benchmark-data-missing", [*BENCH, "--models", "padim", "--data", "{missing}"], ["{missing}", "not found"]),
    ("benchmark-data-without-test", [*BENCH, "--models", "padim", "--data", "{normals_zero}"],
     ["{normals_zero}", "not a defect set"]),
    ("benchmark-max-train-0", [*BENCH, "--models", "padim", "--data", "{brick}", "--max-train", "0"],
     ["--max-train 0", ">= 1"]),
    ("benchmark-unknown-option", [*BENCH, "--models", "padim,dfm", "--data", "{brick}", "--set", "foo=1"],
     ["padim: unknown option(s) ['foo']"]),
    ("benchmark-option-wrong-type", [*BENCH, "--models", "padim", "--data", "{brick}", "--set", "image_size=abc"],
     ["key 'image_size'", "an integer"]),
    ("benchmark-config-syntax", [*BENCH, "--models", "padim", "--data", "{brick}", "--config", "{syntax}"],
     ["{syntax}", "invalid YAML"]),
    # ---- detect backbone
    ("backbone-unknown", ["detect", "backbone", "nosuchnet", "--random"], ["'nosuchnet'", "timm"]),
    ("backbone-weights-missing", ["detect", "backbone", "--weights", "{missing}"], ["{missing}", "not found"]),
    ("backbone-weights-is-folder", ["detect", "backbone", "--weights", "{empty}"], ["{empty}", "not a file"]),
    ("backbone-weights-not-weights", ["detect", "backbone", "--weights", "{png}"], ["{png}", "unsupported extension"]),
    ("backbone-size-0", ["detect", "backbone", "--random", "--size", "0"], ["--size 0", ">= 32"]),
    ("backbone-bad-stage", ["detect", "backbone", "--random", "--out-indices", "9"], ["out_indices=[9]", "0..4"]),
    # ---- pipelines run
    ("pipeline-config-missing", [*RUN, "{missing}"], ["{missing}", "config file not found"]),
    ("pipeline-config-is-folder", [*RUN, "{empty}"], ["{empty}", "got a folder"]),
    ("pipeline-config-syntax", [*RUN, "{syntax}"], ["{syntax}", "invalid YAML at line 2"]),
    ("pipeline-config-not-mapping", [*RUN, "{list}"], ["{list}", "expected a mapping"]),
    ("pipeline-unknown-section", [*RUN, "{pipe_unknown_top}"], ["key 'generat'", "did you mean 'generate'"]),
    ("pipeline-unknown-key", [*RUN, "{pipe_unknown_key}"], ["key 'generate.nn'", "did you mean 'n'"]),
    ("pipeline-out-of-range", [*RUN, "{pipe_range}"], ["key 'generate.n'", "greater than 0", "-4"]),
    ("pipeline-section-wrong-type", [*RUN, "{pipe_type}"], ["key 'generate'", "dictionary"]),
    ("pipeline-unknown-method", [*RUN, "{pipe_method}"], ["key 'generate.method'", "'nosuch'"]),
    ("pipeline-unknown-model", [*RUN, "{pipe_model}"], ["key 'fewshot.models'", "unknown model 'nosuch'"]),
    ("pipeline-negative-shots", [*RUN, "{pipe_shots}"], ["key 'fewshot.shots'", "-1"]),
    ("pipeline-realism-range", [*RUN, "{pipe_realism}"], ["key 'realism.max_images'", "greater than or equal to 2"]),
    ("pipeline-data-missing", [*RUN, "{pipe_nodata}"], ["{missing}", "data folder not found"]),
    ("pipeline-data-is-file", [*RUN, "{pipe_filedata}"], ["{png}", "is a file, not a folder"]),
    ("pipeline-data-key-missing", [*RUN, "{pipe_nodatakey}"], ["key 'data'", "required", "--data"]),
    ("pipeline-out-is-file", [*RUN, "{pipe_fileout}"], ["{png}", "'out' exists and is a file"]),
    ("pipeline-negative-seed", [*RUN, "{pipe_range}", "--seed", "-1"], ["key 'seed'"]),
]


@pytest.mark.parametrize(("argv", "needles"), [pytest.param(a, n, id=i) for i, a, n in MATRIX])
def test_bad_input_gives_one_clear_error(argv, needles, paths, model, generated, tmp_path, capsys):
    values = {**{k: str(v) for k, v in paths.items()}, "model": str(model), "generated": str(generated),
              "out": str(tmp_path / "out")}
    rc, err = run_main([a.format(**values) for a in argv], capsys)
    assert_one_clear_error(rc, err, [n.format(**values) for n in needles])
    assert not (tmp_path / "out").exists(), "a refused command created its output folder"


def test_matrix_covers_every_cli_entry_point():
    from detect.cli import build_parser as detect_parser
    from pipelines.cli import build_parser as pipelines_parser
    from synth.cli import build_parser as synth_parser

    covered = {(argv[0], argv[1]) for _, argv, _ in MATRIX}
    for prog, parser in (("synth", synth_parser()), ("detect", detect_parser()), ("pipelines", pipelines_parser())):
        commands = next(a for a in parser._actions if a.dest == "command").choices
        # `detect models` takes no input; `detect export` is tested with its own module.
        missing = set(commands) - {cmd for p, cmd in covered if p == prog} - {"models", "export"}
        assert not missing, f"{prog}: no bad-input case for {sorted(missing)}"


def test_every_model_config_accepts_its_defaults_and_saved_json():
    # The type checks of DetectorConfig must not refuse what the models themselves write (config.json).
    import dataclasses

    from detect.registry import get_model_class, list_models

    for name in list_models():
        config_class = get_model_class(name).Config
        saved = json.loads(json.dumps(dataclasses.asdict(config_class())))  # tuples become lists, as on disk
        assert dataclasses.asdict(config_class(**saved)) == saved, name


@pytest.mark.parametrize(("value", "words"), [
    ({"image_size": "abc"}, "key 'image_size' must be an integer (got 'abc')"),
    ({"image_size": 64.0}, "key 'image_size' must be an integer (got 64.0)"),
    ({"image_size": True}, "key 'image_size' must be an integer (got True)"),
    ({"target_fpr": "0.1"}, "key 'target_fpr' must be a number (got '0.1')"),
    ({"synthetic_val": 1}, "key 'synthetic_val' must be true or false (got 1)"),
    ({"layers": [1.5]}, "key 'layers' must be a list (an integer each) (got [1.5])"),
    ({"backbone": 3}, "key 'backbone' must be a string (got 3)"),
])
def test_detector_config_types_are_checked_by_pydantic_with_the_key_in_words(value, words):
    from detect.models.memory.padim.detector import PadimConfig

    with pytest.raises(ConfigError) as info:
        PadimConfig(**value)
    assert str(info.value) == f"PadimConfig: {words}"


def test_detector_config_accepts_numpy_scalars_paths_and_tuples_for_lists():
    from detect.models.memory.padim.detector import PadimConfig

    config = PadimConfig(image_size=np.int64(64), target_fpr=np.float32(0.25), layers=(1, 2), weights=Path("w.pt"))
    assert (config.image_size, config.layers) == (64, (1, 2))  # checked, not converted: the values stay as given


# --------------------------------------------------------------------------------------------------------------
# real processes: exit status and a single stderr line
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("module", "argv", "needle"), [
    ("synth.cli", ["generate", "--config", "{syntax}"], "invalid YAML at line 2"),
    ("detect.cli", ["fit", "--model", "padim", "--data", "{brick}", "--out", "{out}", "--set", "image_size=abc"],
     "key 'image_size' must be an integer"),
    ("pipelines.cli", ["run", "{pipe_range}"], "key 'generate.n'"),
], ids=["synth", "detect", "pipelines"])
def test_subprocess_exit_status_and_single_stderr_line(module, argv, needle, paths, tmp_path):
    values = {**{k: str(v) for k, v in paths.items()}, "out": str(tmp_path / "out")}
    proc = subprocess.run([sys.executable, "-m", module, *[a.format(**values) for a in argv]], cwd=tmp_path,
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert proc.stdout == ""


# --------------------------------------------------------------------------------------------------------------
# odd but valid images work; documented skips are skips
# --------------------------------------------------------------------------------------------------------------

def test_rgba_16bit_grayscale_palette_images_work_and_come_out_8bit_rgb(paths, tmp_path, capsys):
    modes = paths["modes"]
    out = tmp_path / "gen"
    assert synth_main(["generate", "-q", "--normal", str(modes), "--method", "cutpaste", "--n", "6",
                       "--out", str(out)]) == 0
    generated = sorted((out / "test").rglob("*.png"))
    assert len(generated) == 6
    sources = {json.loads(line)["source_image"] for line in (out / "manifest.jsonl").read_text().splitlines()
               if json.loads(line)["split"] == "test"}
    assert len(sources) == 6  # each odd image was used once
    source_of = {json.loads(line)["image"]: json.loads(line)["source_image"]
                 for line in (out / "manifest.jsonl").read_text().splitlines()}
    for path in generated:
        source = read_image(source_of[str(path.relative_to(out))])
        gray_source = np.array_equal(source[..., 0], source[..., 1]) and np.array_equal(source[..., 0], source[..., 2])
        with Image.open(path) as img:
            # 8 bits per channel; a grayscale source stays one channel (lossless: readers return RGB).
            assert img.mode == ("L" if gray_source else "RGB"), (path, img.mode)
        assert read_image(path).shape == (64, 64, 3)
    # train/good keeps the original bytes (documented: add_file copies), and reads back as 8-bit RGB.
    for path in sorted((out / "train" / "good").iterdir()):
        assert path.read_bytes() == (modes / path.name).read_bytes()
        image = read_image(path)
        assert image.dtype == np.uint8 and image.shape == (64, 64, 3)

    model = tmp_path / "model"
    assert detect_main(["fit", "-q", "--model", "padim", "--data", str(modes), "--out", str(model),
                        "--image-size", "64"]) == 0
    pred = tmp_path / "pred"
    assert detect_main(["predict", "-q", "--model-dir", str(model), str(modes), "--out", str(pred)]) == 0
    rows = list(csv.DictReader((pred / "scores.csv").open()))
    assert len(rows) == 6 and all(r["error"] == "" and r["score"] for r in rows)
    overlays = sorted((pred / "overlays").iterdir())
    assert len(overlays) == 6
    for path in overlays:
        with Image.open(path) as img:
            assert img.mode == "RGB" and img.size == (128, 64)
    capsys.readouterr()


def test_unreadable_normals_are_skipped_and_listed(paths, tmp_path):
    folder = tmp_path / "normals"
    shutil.copytree(paths["normals_trunc"], folder)
    for kind in ("zero", "text", "huge"):
        source = paths[f"normals_{kind}"]
        bad = next(p for p in source.iterdir() if not p.name.startswith("brick"))
        shutil.copy(bad, folder / f"{kind}_{bad.name}")
    out = tmp_path / "out"
    assert synth_main(["generate", "-q", "--normal", str(folder), "--method", "perlin", "--n", "3",
                       "--out", str(out)]) == 0
    skipped = json.loads((out / "dataset_info.json").read_text())["skipped_files"]
    assert len(skipped) == 4
    for name, reason in (("bad.png", "truncated"), ("zero_bad.png", "0 bytes"), ("text_bad.png", "cannot decode"),
                         ("huge_huge.png", "above the limit")):
        assert any(name in line and reason in line for line in skipped), (name, skipped)
    assert sorted(p.name for p in (out / "train" / "good").iterdir()) == sorted(
        p.name for p in folder.iterdir() if p.name.startswith("brick"))


def test_empty_mask_among_good_ones_is_skipped(paths, tmp_path):
    out = tmp_path / "out"
    assert synth_main(["generate", "-q", "--normal", str(paths["brick"] / "train" / "good"), "--method", "paste",
                       "--masks", str(paths["masks_onezero"]), "--n", "2", "--out", str(out)]) == 0
    skipped = json.loads((out / "dataset_info.json").read_text())["skipped_files"]
    assert len(skipped) == 1 and "brick_spot_000_mask.png: empty mask" in skipped[0]


@pytest.mark.parametrize("kind", ["rgb", "16bit"])
def test_three_channel_and_16bit_masks_work(paths, tmp_path, kind):
    out = tmp_path / "out"
    assert synth_main(["generate", "-q", "--normal", str(paths["brick"] / "train" / "good"), "--method", "paste",
                       "--masks", str(paths[f"masks_{kind}"]), "--defects", str(paths["defects"]),
                       "--n", "2", "--out", str(out)]) == 0
    for mask_path in (out / "ground_truth").rglob("*.png"):
        mask = np.asarray(Image.open(mask_path))
        assert mask.ndim == 2 and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255} and mask.any()


def test_predict_skips_unreadable_images_into_the_error_column(paths, model, tmp_path, capsys):
    out = tmp_path / "pred"
    rc = detect_main(["predict", "-q", "--model-dir", str(model), str(paths["bad_files"]),
                      str(paths["brick"] / "test" / "good"), "--out", str(out)])
    assert rc == 0
    assert "4 unreadable, see the error column" in capsys.readouterr().out
    rows = {Path(r["image"]).name: r for r in csv.DictReader((out / "scores.csv").open())}
    assert len(rows) == 4 + 8
    for name, reason in (("zero_bad.png", "0 bytes"), ("trunc_bad.png", "truncated"),
                         ("text_bad.png", "cannot decode"), ("huge_huge.png", "above the limit")):
        assert reason in rows[name]["error"] and rows[name]["score"] == ""
    assert sum(1 for r in rows.values() if r["score"]) == 8
    assert len(list((out / "overlays").iterdir())) == 8


# --------------------------------------------------------------------------------------------------------------
# nothing already written is lost or corrupted
# --------------------------------------------------------------------------------------------------------------

def refused(argv: Sequence[str], capsys) -> str:
    rc, err = run_main(argv, capsys)
    return assert_one_clear_error(rc, err, [])


def test_generate_into_a_partial_run_keeps_its_files(paths, tmp_path, capsys, monkeypatch):
    from synth import generate as generate_module

    normal = paths["brick"] / "train" / "good"
    out = tmp_path / "out"
    # One worker: the injected failure counts calls in this process (forked workers would each count their own).
    base = ["synth", "generate", "-q", "--normal", str(normal), "--method", "perlin", "--n", "6", "--out", str(out),
            "--workers", "1"]
    # A partial run: the generator fails (as a crash or kill would) at its 4th call, after 3 complete samples.
    real_build = generate_module.build_generator
    fail_at = {"call": 4}

    def failing_build(cfg, skipped=None):
        inner = real_build(cfg, skipped)
        calls = {"n": 0}

        def generator(image, rng):
            calls["n"] += 1
            if calls["n"] == fail_at["call"]:
                raise generate_module.InputError("injected failure mid-way")
            return inner(image, rng)

        return generator

    monkeypatch.setattr(generate_module, "build_generator", failing_build)
    assert "injected failure" in refused(base, capsys)
    partial = tree_digest(out)
    assert sum(1 for name in partial if name.startswith("test/")) == 3
    manifest = (out / "manifest.jsonl").read_bytes()

    # Bad inputs at start, into the partial run: nothing changes.
    config = tmp_path / "cfg.yaml"
    config.write_text("normal: [unclosed\n")
    for extra in (["--n", "-1"], ["--set", "threshold=abc"], ["--seed", "x"], ["--method", "paste"],
                  ["--strict", "--normal", str(paths["normals_trunc"])], ["--config", str(config)]):
        refused([*base, *extra], capsys)
        assert tree_digest(out) == partial, extra

    # A failure mid-way through the resumed run keeps every file already there, byte for byte.
    fail_at["call"] = 2
    assert "injected failure" in refused(base, capsys)
    after = tree_digest(out)
    assert sum(1 for name in after if name.startswith("test/")) == 4
    assert {k: after[k] for k in partial if k != "manifest.jsonl"} == {
        k: v for k, v in partial.items() if k != "manifest.jsonl"}
    assert (out / "manifest.jsonl").read_bytes().startswith(manifest)  # rows are only appended
    monkeypatch.undo()
    assert synth_main(base[1:]) == 0  # and the same command then completes the set
    assert sum(1 for _ in (out / "test").rglob("*.png")) == 6


def test_fit_force_with_bad_input_keeps_the_saved_model(paths, model, tmp_path, capsys):
    out = tmp_path / "model"
    shutil.copytree(model, out)
    before = tree_digest(out)
    base = ["detect", "fit", "-q", "--force", "--model", "padim", "--out", str(out), "--image-size", "64"]
    for extra in (["--data", str(paths["normals_trunc"])], ["--data", str(paths["missing"])],
                  ["--data", str(paths["brick"]), "--set", "n_features=abc"],
                  ["--data", str(paths["brick"]), "--config", str(paths["syntax"])]):
        refused([*base, *extra], capsys)
        assert tree_digest(out) == before, extra
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging folder left beside it
    refused(["detect", "fit", "-q", "--model", "padim", "--out", str(out), "--data", str(paths["brick"])], capsys)
    assert tree_digest(out) == before


def test_predict_and_eval_with_bad_input_keep_existing_results(paths, model, tmp_path, capsys):
    out = tmp_path / "pred"
    good = str(paths["brick"] / "test" / "good")
    assert detect_main(["predict", "-q", "--model-dir", str(model), good, "--out", str(out)]) == 0
    assert detect_main(["eval", "-q", "--model-dir", str(model), "--data", str(paths["brick"]),
                        "--out", str(out / "eval")]) == 0
    capsys.readouterr()
    before = tree_digest(out)
    assert "scores.csv" in before and "eval/metrics.json" in before
    for argv in (["--model-dir", str(paths["missing"]), good], ["--model-dir", str(model), str(paths["missing"])],
                 ["--model-dir", str(model), good, str(paths["missing"])],
                 ["--model-dir", str(paths["model_badjson"]), good], ["--model-dir", str(model), good,
                                                                      "--batch-size", "0"]):
        refused(["detect", "predict", "-q", "--out", str(out), *argv], capsys)
        assert tree_digest(out) == before, argv
    for data in ("set_badimage", "set_badmask", "missing"):
        refused(["detect", "eval", "-q", "--model-dir", str(model), "--data", str(paths[data]),
                 "--out", str(out / "eval")], capsys)
        assert tree_digest(out) == before, data


def test_pipeline_rerun_with_bad_config_keeps_finished_results(paths, tmp_path, capsys):
    out = tmp_path / "run"
    head = f"name: t\ndata: {paths['brick']}\nout: {out}\ngenerate: {{method: perlin, n: 3}}\nreport: {{samples: 2}}\n"
    config = tmp_path / "pipeline.yaml"
    config.write_text(head)
    assert pipelines_main(["run", "-q", str(config)]) == 0
    capsys.readouterr()
    before = tree_digest(out)
    assert "report.html" in before and any(k.endswith("done.json") for k in before)
    for text in ("name: t\ndata: [unclosed\n", head.replace("n: 3", "n: -3"), head + "extra: 1\n",
                 head + "fewshot: {models: [nosuch]}\n"):
        config.write_text(text)
        refused(["pipelines", "run", "-q", str(config)], capsys)
        assert tree_digest(out) == before, text
    # Fails mid-way: the generate stage is reused, then the filter stage cannot find its real defects.
    config.write_text(head + f"filter: {{real_defects: {paths['missing']}, embedder: lite0, image_size: 32}}\n")
    assert "real defects folder not found" in refused(["pipelines", "run", "-q", str(config)], capsys)
    after = tree_digest(out)
    assert {k: after[k] for k in before} == before
    assert not any("done.json" in k for k in set(after) - set(before))  # the failed stage is not marked done


def test_anomalies_for_a_normal_only_model_name_the_models_that_take_them() -> None:
    import ast

    import detect
    import detect.base
    from synth.core.errors import InputError

    detector = detect.create("padim", image_size=64)
    with pytest.raises(InputError) as info:
        detector.fit([np.zeros((64, 64, 3), np.uint8)] * 2, anomalies=[np.zeros((64, 64, 3), np.uint8)])
    message = str(info.value)
    assert "padim trains on normal images only" in message
    for able in ("draem", "supersimplenet"):
        assert able in message
    # The list comes from the registry without base importing it back (no base <-> registry circle).
    tree = ast.parse(open(detect.base.__file__, encoding="utf-8").read())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "detect.registry" not in imported
