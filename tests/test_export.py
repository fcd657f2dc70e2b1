"""ONNX export (detect.export, `detect export`): onnxruntime reproduces PyTorch for the six main detectors.

Each model is fitted tiny on brick_set (64 px, 1-2 epochs: export correctness does not depend on training
quality), exported with a dynamic batch (traced at batch 2), and scored by onnxruntime on the 24 brick test
images in batches of 5 and all at once. Tolerance: max |onnx - torch| of scores and of maps <= 1e-4 times the
score scale (the largest |torch| output). Measured on the 24 brick test images (64 px, 1 thread, all at once):
relative differences 4.8e-7 (EfficientAD) to 1.2e-6 (STFPM); e.g. PatchCore score 1.5e-5 / map 3.1e-5 on a scale
of 47.6, PaDiM score 3.7e-4 / map 6.1e-4 on a scale of 889. The dynamo exporter is checked too (slow test).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
import torch

import detect
from detect import export as export_module
from detect.cli import main as detect_main
from detect.data import load_tensor
from detect.export import ExportCheckError, export_onnx, verify_onnx
from detect.metrics import auroc
from detect.models.memory.patchcore import torch_model as patchcore_torch_model
from synth.core.errors import ConfigError, InputError

ort = pytest.importorskip("onnxruntime")

SIZE = 64
RTOL = 1e-4
MODELS = {
    "patchcore": {},
    "padim": {},
    "stfpm": {"epochs": 2, "batch_size": 4},
    "fastflow": {"epochs": 1},
    # A random teacher (teacher_epochs 0) keeps the fit short; the exported graph is the same either way.
    "efficientad": {"teacher_epochs": 0, "pool_size": 4, "epochs": 1},
    "reverse_distillation": {"epochs": 1},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exported(brick_set, tmp_path_factory):
    """name -> (fitted detector, path of its checked ONNX export)."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, options in MODELS.items():
        detector = detect.create(name, image_size=SIZE, seed=0, **options).fit(brick_set, progress=False)
        out[name] = detector, export_onnx(detector, root / name / "model.onnx")
    return out


@pytest.fixture(scope="module")
def brick_test(brick_set):
    samples = brick_set.select(split="test")
    images = load_tensor([brick_set.image_path(s) for s in samples], SIZE)
    return images, np.array([s.is_anomalous for s in samples])


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_reproduces_pytorch_on_brick_images(name, exported, brick_test):
    detector, path = exported[name]
    images, labels = brick_test
    with torch.no_grad():
        ref_scores, ref_maps = (t.numpy() for t in detector.model(images))
    sess = session(path)
    # Batches of 5 (and a last one of 4) and all 24 at once: none is the traced batch size (2).
    chunks = [sess.run(None, {"image": chunk.numpy()}) for chunk in images.split(5)]
    scores = np.concatenate([c[0] for c in chunks])
    maps = np.concatenate([c[1] for c in chunks])
    whole_scores, whole_maps = sess.run(["score", "anomaly_map"], {"image": images.numpy()})
    scale = max(np.abs(ref_scores).max(), np.abs(ref_maps).max())
    for got_scores, got_maps in ((scores, maps), (whole_scores, whole_maps)):
        assert got_maps.shape == ref_maps.shape == (24, SIZE, SIZE)
        score_diff = np.abs(got_scores - ref_scores).max()
        map_diff = np.abs(got_maps - ref_maps).max()
        assert score_diff <= RTOL * scale, (name, score_diff, scale)
        assert map_diff <= RTOL * scale, (name, map_diff, scale)
        # Same decisions: identical image AUROC and the same ranking of the 24 images.
        assert auroc(got_scores, labels) == auroc(ref_scores, labels)
        np.testing.assert_array_equal(np.argsort(got_scores, kind="stable"), np.argsort(ref_scores, kind="stable"))


def test_export_metadata_and_graph_interface(exported):
    detector, path = exported["padim"]
    meta = json.loads((path.parent / "export.json").read_text())
    assert meta["model"] == "padim" and meta["image_size"] == SIZE and meta["onnx_file"] == "model.onnx"
    assert meta["calibration"]["image_threshold"] == detector.calibration.image_threshold
    assert meta["calibration"]["pixel_threshold"] == detector.calibration.pixel_threshold
    assert meta["opset"] == export_module.DEFAULT_OPSET and meta["exporter"] == "torchscript"
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["check"]["max_relative_diff"] <= RTOL
    assert {run["batch"] for run in meta["check"]["runs"]} == {3, 1}
    assert "inside the graph" in meta["preprocessing"]
    # The same metadata travels inside the ONNX file.
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["pixelvision"]) == meta
    sess = session(path)
    (inp,) = sess.get_inputs()
    assert inp.name == "image" and inp.shape[1:] == [3, SIZE, SIZE] and isinstance(inp.shape[0], str)
    assert [o.name for o in sess.get_outputs()] == ["score", "anomaly_map"]


def test_check_detects_a_mismatching_graph(exported):
    """The verification can fail: PaDiM's module against STFPM's graph differs hugely and says by how much."""
    padim, _ = exported["padim"]
    _, stfpm_path = exported["stfpm"]
    with pytest.raises(ExportCheckError, match=r"padim: the ONNX graph does not reproduce PyTorch .*relative"):
        verify_onnx(padim, stfpm_path)


def test_patchcore_blockwise_search_exports_for_any_batch(exported, monkeypatch, tmp_path):
    """Eager PatchCore splits the distance matrix into blocks depending on the batch; the export must not
    freeze that split (tiny blocks force it here) and the traced graph must still match other batch sizes."""
    detector, _ = exported["patchcore"]
    monkeypatch.setattr(patchcore_torch_model, "SEARCH_BLOCK_ELEMENTS", 1000)
    path = export_onnx(detector, tmp_path / "pc.onnx", exporter="torchscript")
    meta = json.loads((tmp_path / "export.json").read_text())
    assert meta["exporter"] == "torchscript"  # not rescued by the dynamo fallback
    assert meta["check"]["max_relative_diff"] <= RTOL
    assert path.is_file()


def test_failed_export_leaves_previous_file_untouched(exported, monkeypatch, tmp_path):
    detector, _ = exported["padim"]
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous")

    def broken_check(*args, **kwargs):
        raise ExportCheckError("padim: the ONNX graph does not reproduce PyTorch (stub)")

    real_export = export_module._export_graph

    def torchscript_only(*args, exporter, **kwargs):
        if exporter == "dynamo":
            raise RuntimeError("dynamo stub")
        return real_export(*args, exporter=exporter, **kwargs)

    monkeypatch.setattr(export_module, "verify_onnx", broken_check)
    monkeypatch.setattr(export_module, "_export_graph", torchscript_only)
    with pytest.raises(InputError, match=r"padim could not be exported to ONNX: torchscript: .*stub.*dynamo"):
        export_onnx(detector, out)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temp file, no export.json


def test_cli_export(exported, tmp_path, capsys):
    detector, _ = exported["reverse_distillation"]
    model_dir = detector.save(tmp_path / "rd")
    assert detect_main(["export", "--model-dir", str(model_dir), "-q"]) == 0
    assert (model_dir / "model.onnx").is_file() and (model_dir / "export.json").is_file()
    assert "model.onnx" in capsys.readouterr().out
    custom = tmp_path / "deploy" / "rd.onnx"
    assert detect_main(["export", "--model-dir", str(model_dir), "--out", str(custom), "--opset", "17",
                        "--no-check", "-q"]) == 0
    meta = json.loads((custom.parent / "export.json").read_text())
    assert meta["opset"] == 17 and meta["check"] is None and meta["onnx_file"] == "rd.onnx"
    # The CLI's file scores the brick images like the in-framework model (same tolerance).
    images = load_tensor([np.full((SIZE, SIZE, 3), 128, np.uint8)] * 2, SIZE)
    got = session(custom).run(None, {"image": images.numpy()})[0]
    with torch.no_grad():
        ref = detector.model(images)[0].numpy()
    assert np.abs(got - ref).max() <= RTOL * np.abs(ref).max()


def test_cli_rejects_unknown_format_and_bad_model_dirs(exported, tmp_path, capsys):
    detector, _ = exported["padim"]
    model_dir = detector.save(tmp_path / "padim")
    assert detect_main(["export", "--model-dir", str(model_dir), "--format", "tflite"]) == 2
    err = capsys.readouterr().err
    assert "--format 'tflite'" in err and "allowed: onnx" in err and "Traceback" not in err
    assert detect_main(["export", "--model-dir", str(tmp_path / "missing")]) == 2
    assert "no such model folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert detect_main(["export", "--model-dir", str(tmp_path / "empty")]) == 2
    assert "config.json: missing" in capsys.readouterr().err
    assert not (model_dir / "model.onnx").exists()


def test_unfitted_and_non_exportable_models_are_refused(tmp_path):
    with pytest.raises(InputError, match="padim: the model is not fitted"):
        export_onnx(detect.create("padim", image_size=SIZE), tmp_path / "a.onnx")
    refused = r"vlm_ad cannot be exported to ONNX: .*HTTP API.*Exportable models: .*patchcore"
    with pytest.raises(InputError, match=refused):
        export_onnx(detect.create("vlm_ad", image_size=SIZE), tmp_path / "b.onnx")
    with pytest.raises(ConfigError, match="exporter 'tensorrt'"):
        export_onnx(tmp_path, exporter="tensorrt")
    with pytest.raises(InputError, match="must end in .onnx"):
        export_onnx(detect.create("padim", image_size=SIZE), tmp_path / "c.pt")
    assert not list(tmp_path.iterdir())


def test_missing_onnxruntime_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    hint = r'onnxruntime \(not installed\); install with: pip install "pixelvision\[export\]"'
    with pytest.raises(InputError, match=hint):
        export_onnx(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_dynamo_exporter_also_reproduces_pytorch(name, exported, tmp_path):
    """The torch.export-based exporter (5-30 s per model here) gives checked graphs too."""
    detector, _ = exported[name]
    path = export_onnx(detector, tmp_path / "model.onnx", exporter="dynamo")
    meta = json.loads((tmp_path / "export.json").read_text())
    assert meta["exporter"] == "dynamo" and meta["check"]["max_relative_diff"] <= RTOL
    assert path.is_file()
