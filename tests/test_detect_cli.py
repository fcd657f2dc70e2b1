"""``detect fit / predict / eval / benchmark / models`` end to end on the brick set, and their bad inputs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import detect
from detect.cli import main as detect_main
from synth.core.io import read_image, write_image

FAST = ["--image-size", "64", "--set", "blur_sigma=1"]


@pytest.fixture(scope="module")
def fitted(brick_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "padim"
    assert detect_main(["fit", "-q", "--model", "padim", "--data", str(brick_set.root), "--out", str(out), *FAST]) == 0
    return out


def test_fit_writes_a_loadable_model(fitted):
    assert sorted(p.name for p in fitted.iterdir()) == ["config.json", "model.safetensors"]
    model = detect.load(fitted)
    assert model.name == "padim" and model.config.image_size == 64
    calibration = model.calibration
    assert calibration is not None and calibration.method == "fpr-0.05" and calibration.scheme == "crossfit-8"
    # The operating point is saved with the model: target, expected recall on synthetic anomalies, the warning.
    assert calibration.target_fpr == 0.05 and calibration.anomalies_are == "synthetic"
    assert calibration.num_normal == 16 and calibration.num_views == 32
    assert 0 <= calibration.estimated_recall <= 1 and "76 normal images" in calibration.warning


def test_predict_writes_scores_and_overlays(fitted, brick_set, tmp_path):
    images = [brick_set.image_path(s) for s in brick_set.select(split="test")]
    (tmp_path / "odd").mkdir()
    big = np.repeat(read_image(images[-1]), 2, axis=0)  # another size: 128x64
    write_image(tmp_path / "odd" / "tall.png", big)
    (tmp_path / "odd" / "broken.png").write_bytes(b"garbage")
    out = tmp_path / "pred"
    assert detect_main(["predict", "-q", "--model-dir", str(fitted), *map(str, images), str(tmp_path / "odd"),
                        "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == len(images) + 2
    broken = [r for r in rows if r["image"].endswith("broken.png")][0]
    assert "cannot decode" in broken["error"]
    scored = [r for r in rows if not r["error"]]
    labels = np.array([r["anomalous"] == "1" for r in scored[: len(images)]])
    truth = np.array(["good" not in p.parent.name for p in images])
    assert (labels == truth).mean() >= 0.7  # thresholded decisions, not just scores
    overlays = sorted((out / "overlays").iterdir())
    assert len(overlays) == len(images) + 1
    tall = [p for p in overlays if "tall" in p.name][0]
    assert read_image(tall).shape == (128, 128, 3)  # original | heat map, at the original size


def test_eval_writes_metrics_and_roc(fitted, brick_set, tmp_path):
    out = tmp_path / "eval"
    assert detect_main(["eval", "-q", "--model-dir", str(fitted), "--data", str(brick_set.root),
                        "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["image_auroc"] >= 0.85  # PaDiM on 13 brick crops at 64 px reaches ~0.93
    for key in ("pixel_auroc", "aupro", "image_f1_max", "pixel_ap", "per_class_image_auroc", "threshold"):
        assert key in metrics
    assert set(metrics["per_class_image_auroc"]) == {"spot", "scratch"}
    assert (out / "roc.png").stat().st_size > 1000


def test_benchmark_table(brick_set, tmp_path):
    out = tmp_path / "bench"
    assert detect_main(["benchmark", "-q", "--models", "padim,dfm", "--data", str(brick_set.root),
                        "--out", str(out), "--image-size", "64"]) == 0
    results = json.loads((out / "benchmark.json").read_text())["results"]
    assert [r["model"] for r in results] == ["padim", "dfm"]
    for row in results:
        assert row["fit_s"] > 0 and row["predict_images_per_s"] > 0 and row["peak_rss_mb"] > 50
        assert row["image_auroc"] > 0.6
    assert "| padim |" in (out / "benchmark.md").read_text()


def test_models_lists_the_registry(capsys):
    assert detect_main(["models"]) == 0
    listed = capsys.readouterr().out
    for name in ("patchcore", "padim", "dfkde", "dfm", "cfa"):
        assert name in listed


def test_bad_inputs(fitted, brick_set, tmp_path, capsys):
    assert detect_main(["fit", "--model", "patchcor", "--data", str(brick_set.root), "--out", str(tmp_path / "x")]) == 2
    assert "Did you mean patchcore" in capsys.readouterr().err
    assert detect_main(["fit", "--model", "padim", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    empty = str(tmp_path / "empty")
    assert detect_main(["fit", "--model", "padim", "--data", empty, "--out", str(tmp_path / "x")]) == 2
    assert "no images" in capsys.readouterr().err
    assert detect_main(["fit", "--model", "padim", "--data", str(brick_set.root), "--out", str(tmp_path / "x"),
                        "--set", "n_features=-1"]) == 2
    assert "n_features" in capsys.readouterr().err
    assert detect_main(["fit", "--model", "padim", "--data", str(brick_set.root), "--out", str(fitted)]) == 2
    assert "--force" in capsys.readouterr().err
    assert detect.load(fitted).name == "padim"  # the refused fit left the existing model intact

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((fitted / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes((fitted / "model.safetensors").read_bytes()[:100])
    assert detect_main(["predict", "--model-dir", str(corrupt), str(brick_set.root / "train/good"),
                        "--out", str(tmp_path / "p")]) == 2
    assert "corrupted weights" in capsys.readouterr().err
    assert detect_main(["eval", "--model-dir", str(tmp_path / "nomodel"), "--data", str(brick_set.root)]) == 2
    assert "missing" in capsys.readouterr().err


def test_unfitted_model_refuses_to_predict():
    model = detect.create("padim", image_size=64)
    with pytest.raises(detect.base.InputError, match="not fitted"):
        model.predict([np.zeros((64, 64, 3), np.uint8)])


def test_every_model_package_imports():
    # Discovery tolerates a broken model package (the others stay usable); the shipped tree has none.
    from detect import registry

    registry.list_models()
    assert registry._IMPORT_ERRORS == {}


def test_broken_model_package_is_reported_not_fatal(monkeypatch):
    from detect import registry

    monkeypatch.setitem(registry._IMPORT_ERRORS, "brokenmodel", "ModuleNotFoundError: No module named 'open_clip'")
    assert "padim" in registry.list_models()
    with pytest.raises(detect.base.InputError, match="could not be imported.*open_clip"):
        registry.get_model_class("brokenmodel")


def test_anomalies_refused_by_unsupervised_models(brick_set):
    with pytest.raises(detect.base.InputError, match="normal images only"):
        detect.create("padim", image_size=64).fit(brick_set, anomalies=brick_set, progress=False)


def test_resolve_anomalies_forms(brick_set):
    from detect.base import AnomalySamples, resolve_anomalies

    from_set = resolve_anomalies(brick_set)
    assert len(from_set) == 16 and from_set.source == "synthetic"  # planted by synth.toyset (manifest generator)
    image, mask = from_set.load(0)
    assert mask is not None and mask.shape == image.shape[:2] and mask.any()
    pairs = resolve_anomalies([(np.zeros((8, 8, 3), np.uint8), np.ones((8, 8), np.uint8))])
    assert pairs.masks[0].dtype == bool
    bad = AnomalySamples([np.zeros((8, 8, 3), np.uint8)], [np.ones((4, 4), bool)])
    with pytest.raises(detect.base.InputError, match="mask"):
        bad.load(0)
    with pytest.raises(detect.base.InputError, match="no anomalous samples"):
        resolve_anomalies([])


def test_benchmark_resumes_and_reports_failures(brick_set, tmp_path, monkeypatch):
    from detect import runner

    out = tmp_path / "bench"
    options = {"image_size": 64}
    benchmark_one = runner._benchmark_one
    runner.benchmark(["dfm"], brick_set.root, out, options=options, progress=False)
    first = json.loads((out / "benchmark.json").read_text())["results"][0]
    assert "error" not in first, first
    # A rerun with the same setup reuses the finished row instead of refitting.
    monkeypatch.setattr(runner, "_benchmark_one", lambda *a: pytest.fail("refit a finished model"))
    runner.benchmark(["dfm"], brick_set.root, out, options=options, progress=False)
    assert json.loads((out / "benchmark.json").read_text())["results"][0] == first
    # A model that fails gets its error in the table; the run goes on.
    row = benchmark_one("padim", str(brick_set.root), {"image_size": 64, "n_features": -1}, None)
    assert "error" in row and "n_features" in row["error"]


def test_fit_without_calibration_trains_on_every_image_and_sets_no_threshold(brick_set, monkeypatch):
    seen: list[int] = []
    model = detect.create("padim", image_size=64, blur_sigma=1)
    real_fit = type(model)._fit
    monkeypatch.setattr(type(model), "_fit", lambda self, images, progress: (seen.append(len(images)),
                                                                              real_fit(self, images, progress)))
    model.fit(brick_set.root, progress=False, calibrate=False)
    assert model.fitted and model.calibration is None
    prediction = model.predict(sorted((brick_set.root / "test" / "good").iterdir())[:2])
    assert prediction.labels is None and prediction.scores.shape == (2,)
    model.fit(brick_set.root, progress=False)  # default: the deployed model on all 16, then 8 fold models on 14
    assert seen == [16, 16] + [14] * 8 and model.calibration is not None
    seen.clear()
    model = detect.create("padim", image_size=64, blur_sigma=1, calibration="holdout")
    model.fit(brick_set.root, progress=False)  # holdout: 20 % of the 16 normals kept out of training
    assert seen == [13] and model.calibration.scheme == "holdout" and model.calibration.num_normal == 3
