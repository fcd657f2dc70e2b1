"""Defect-class classifier (detect.classify): learning, save/load, determinism, the CLI, resume and bad inputs."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from detect.classify import DefectClassifier
from detect.classify.classifier import _batch_indices, collect_labeled
from detect.classify.runner import predict_classes
from detect.cli import main as detect_main
from synth.core.defect_set import read_defect_set
from synth.core.errors import ConfigError, InputError
from synth.core.io import read_image, write_image
from synth.toyset import make_texture_defect_set

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = {"image_size": 64, "steps": 40, "batch_size": 8}
# Spot vs scratch on brick crops (chance 0.5). Measured with FAST, seed 0, one torch thread, on 20 unseen crops:
# balanced accuracy 0.950. The bar leaves 0.15 of margin and is 0.3 above chance.
BALANCED_ACCURACY_BAR = 0.8


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    train = make_texture_defect_set(root / "train", texture="brick", size=64, n_train=8, n_test_good=8,
                                    n_test_per_class=12, seed=0)
    held_out = make_texture_defect_set(root / "eval", texture="brick", size=64, n_train=2, n_test_good=6,
                                       n_test_per_class=10, seed=5)
    return train, held_out


@pytest.fixture(scope="module")
def fitted(sets):
    return DefectClassifier(**FAST).fit(sets[0], progress=False)


def _eval_paths(dataset, classes):
    samples = [s for s in dataset.select(split="test") if s.defect_class in classes]
    return [dataset.image_path(s) for s in samples], [classes.index(s.defect_class) for s in samples]


def test_learns_defect_classes_beyond_chance(fitted, sets):
    assert fitted.classes == ["scratch", "spot"]
    paths, truth = _eval_paths(sets[1], fitted.classes)
    prediction = fitted.predict(paths)
    assert prediction.probabilities.shape == (len(paths), 2)
    np.testing.assert_allclose(prediction.probabilities.sum(axis=1), 1.0, rtol=1e-5)
    per_class = [np.mean(prediction.indices[np.array(truth) == c] == c) for c in range(2)]
    assert np.mean(per_class) >= BALANCED_ACCURACY_BAR, per_class
    assert fitted.history["n_train"] == 24 and fitted.history["final_loss"] < 0.69  # below log(2): it learned


def test_save_load_round_trip_gives_identical_probabilities(fitted, sets, tmp_path):
    paths, _ = _eval_paths(sets[1], fitted.classes)
    fitted.save(tmp_path / "clf")
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == ["classifier.json", "model.safetensors"]
    loaded = DefectClassifier.load(tmp_path / "clf")
    assert loaded.classes == fitted.classes and loaded.config == fitted.config
    np.testing.assert_array_equal(loaded.predict(paths).probabilities, fitted.predict(paths).probabilities)


def test_same_seed_same_model(fitted, sets):
    again = DefectClassifier(**FAST).fit(sets[0], progress=False)
    for (name, a), (_, b) in zip(fitted.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    other = DefectClassifier(**FAST, seed=1).fit(sets[0], progress=False)
    assert not torch.equal(other.model.state_dict()["backbone.classifier.weight"],
                           fitted.model.state_dict()["backbone.classifier.weight"])


def test_good_class_validation_and_early_stopping(sets):
    model = DefectClassifier(**FAST, include_good=True, val_fraction=0.25, eval_every=10).fit(sets[0], progress=False)
    assert model.classes == ["good", "scratch", "spot"]
    history = model.history
    # 8 train/good + 8 test/good normals, capped at the largest class (12); a quarter of each class held out.
    assert history["n_val"] == 9 and history["n_train"] == 36 - 9
    assert [step for step, _ in history["val_curve"]] == [10, 20, 30, 40]
    assert history["val_balanced_accuracy"] == max(score for _, score in history["val_curve"])


def test_synthetic_weight_changes_the_sampling():
    weights = np.array([1.0] * 10 + [0.0] * 10)
    batches = _batch_indices(20, 8, 25, torch.Generator().manual_seed(0), weights)
    assert len(batches) == 25 and all(len(b) == 8 for b in batches)
    assert max(max(b) for b in batches) < 10  # weight 0: never drawn
    uniform = _batch_indices(20, 8, 5, torch.Generator().manual_seed(0))
    assert sorted(uniform[0] + uniform[1] + uniform[2][:4]) == list(range(20))  # one permutation first


def test_real_and_synthetic_sets_are_labeled_with_their_source(sets, tmp_path):
    data = collect_labeled([sets[0].root], [sets[1].root])
    assert data.classes == ["scratch", "spot"] and len(data.images) == 24 + 20
    assert data.sources.count("real") == 24 and data.sources.count("synthetic") == 20


def test_cli_fit_predict_eval_and_resume(sets, tmp_path, capsys, monkeypatch):
    out = tmp_path / "clf"
    assert detect_main(["classify", "fit", "-q", "--data", str(sets[0].root), "--out", str(out),
                        "--image-size", "64", "--set", "steps=40", "--set", "batch_size=8"]) == 0
    assert "2 classes (scratch, spot)" in capsys.readouterr().out
    assert detect_main(["classify", "fit", "-q", "--data", str(sets[0].root), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    folders = [str(sets[1].root / "test" / c) for c in ("scratch", "spot")]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not a png")
    reference = predict_classes(out, [*folders, str(broken)], tmp_path / "pred", batch_size=4, progress=False)
    rows = list(csv.DictReader(reference.open()))
    assert len(rows) == 21 and rows[-1]["error"] and not rows[0]["error"]
    assert set(rows[0]) == {"image", "class", "probability", "top1", "top2", "error"}
    assert rows[0]["top1"].startswith(rows[0]["class"] + ":")
    # A run stopped after its first batch resumes: only the missing images are classified again.
    seen: list[int] = []
    real_predict = DefectClassifier.predict

    def stops_after_one_batch(self, images, **kwargs):
        if seen:
            raise KeyboardInterrupt
        seen.append(len(images))
        return real_predict(self, images, **kwargs)

    monkeypatch.setattr(DefectClassifier, "predict", stops_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        predict_classes(out, [*folders, str(broken)], tmp_path / "killed", batch_size=4, progress=False)
    assert not (tmp_path / "killed" / "predictions.csv").exists()
    counted: list[int] = []

    def counts(self, images, **kwargs):
        counted.append(len(images))
        return real_predict(self, images, **kwargs)

    monkeypatch.setattr(DefectClassifier, "predict", counts)
    resumed = predict_classes(out, [*folders, str(broken)], tmp_path / "killed", batch_size=4, progress=False)
    assert sum(counted) == 20 - 4 and resumed.read_bytes() == reference.read_bytes()
    monkeypatch.undo()

    assert detect_main(["classify", "eval", "-q", "--model-dir", str(out), "--data", str(sets[1].root)]) == 0
    assert "balanced accuracy" in capsys.readouterr().out
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["confusion.png", "metrics.json", "reliability.png"]
    assert metrics["classes"] == ["scratch", "spot"] and metrics["n_images"] == 20
    assert np.asarray(metrics["confusion"]).sum() == 20 and 0 <= metrics["reliability"]["ece"] <= 1
    assert read_image(out / "eval" / "confusion.png").shape[2] == 3


def test_one_class_is_refused_unless_good_is_added(sets, tmp_path, capsys):
    one = tmp_path / "one"
    shutil.copytree(sets[0].root, one)
    shutil.rmtree(one / "test" / "scratch")
    shutil.rmtree(one / "ground_truth" / "scratch")
    (one / "manifest.jsonl").unlink()
    with pytest.raises(InputError, match="include_good"):
        DefectClassifier(**FAST).fit(one, progress=False)
    assert detect_main(["classify", "fit", "-q", "--data", str(one), "--out", str(tmp_path / "m")]) == 2
    assert "--include-good" in capsys.readouterr().err and not (tmp_path / "m").exists()
    # With the normal images as a class it trains; a test class it never saw is reported, not a crash.
    model = DefectClassifier(**{**FAST, "steps": 10}, include_good=True).fit(one, progress=False)
    assert model.classes == ["good", "spot"]
    model.save(tmp_path / "m2")
    assert detect_main(["classify", "eval", "-q", "--model-dir", str(tmp_path / "m2"), "--data",
                        str(sets[1].root)]) == 0
    assert "not in the model: {'scratch': 10}" in capsys.readouterr().out


def test_empty_class_folder_and_mixed_sizes(sets, tmp_path, caplog):
    data = tmp_path / "mixed"
    shutil.copytree(sets[0].root, data)
    (data / "manifest.jsonl").unlink()
    (data / "test" / "dent").mkdir()
    # A defect image of another size (and its mask): images are resized to image_size, any size is accepted.
    big = np.repeat(read_image(data / "test" / "spot" / "brick_spot_000.png"), 2, axis=0)
    write_image(data / "test" / "spot" / "tall.png", big)
    write_image(data / "ground_truth" / "spot" / "tall_mask.png", np.ones(big.shape[:2], bool))
    with caplog.at_level("WARNING"):
        model = DefectClassifier(**{**FAST, "steps": 5}).fit(data, progress=False)
    assert model.classes == ["scratch", "spot"] and model.history["n_train"] == 25
    assert "empty class folder" in caplog.text and "dent" in caplog.text
    assert read_defect_set(data).defect_classes == ["scratch", "spot"]


def test_bad_options_and_missing_model(tmp_path):
    with pytest.raises(ConfigError, match="key 'steps'"):
        DefectClassifier(steps=0)
    with pytest.raises(ConfigError, match="key 'no_such'"):
        DefectClassifier(no_such=1)
    with pytest.raises(InputError, match="no saved classifier"):
        DefectClassifier.load(tmp_path)
    (tmp_path / "classifier.json").write_text(json.dumps({"kind": "defect-classifier", "format_version": 1,
                                                          "classes": ["a", "b"], "config": {}}))
    (tmp_path / "model.safetensors").write_bytes(b"\x80\x04pickle")
    with pytest.raises(InputError, match="safetensors"):
        DefectClassifier.load(tmp_path)


def test_inspect_refuses_a_detector_without_threshold(fitted, sets, tmp_path, capsys):
    import detect

    fitted.save(tmp_path / "clf")
    detect.create("padim", image_size=64).fit(sets[0].root, progress=False, calibrate=False).save(tmp_path / "pd")
    image = str(sets[1].root / "test" / "spot")
    assert detect_main(["inspect", "-q", "--detector", str(tmp_path / "pd"), "--classifier", str(tmp_path / "clf"),
                        image, "--out", str(tmp_path / "o")]) == 2
    assert "no threshold" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert detect_main(["inspect", "-q", "--detector", str(tmp_path / "pd"), "--classifier", str(tmp_path / "pd"),
                        image, "--out", str(tmp_path / "o")]) == 2


def test_onnx_export_reproduces_pytorch(fitted, sets, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from detect.classify.classifier import resize_images

    fitted.save(tmp_path / "clf")
    assert detect_main(["classify", "export", "-q", "--model-dir", str(tmp_path / "clf")]) == 0
    assert "model.onnx" in capsys.readouterr().out
    meta = json.loads((tmp_path / "clf" / "classifier_export.json").read_text())
    assert meta["classes"] == fitted.classes and meta["check"]["max_abs_diff"] <= 1e-4
    paths, _ = _eval_paths(sets[1], fitted.classes)
    pixels = np.stack(resize_images([read_image(p) for p in paths], 64)).astype(np.float32) / 255
    session = ort.InferenceSession(str(tmp_path / "clf" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"image": pixels.transpose(0, 3, 1, 2)})[0]
    expected = fitted.predict(paths).probabilities
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_inspect_runs_detector_and_classifier_together(fitted, sets, tmp_path, capsys):
    import detect

    fitted.save(tmp_path / "clf")
    detector = detect.create("patchcore", image_size=64).fit(sets[0].root, progress=False)
    detector.save(tmp_path / "pc")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG broken")
    folders = [str(sets[1].root / "test" / c) for c in ("good", "scratch", "spot")]
    assert detect_main(["inspect", "-q", "--detector", str(tmp_path / "pc"), "--classifier", str(tmp_path / "clf"),
                        *folders, str(broken), "--out", str(tmp_path / "insp"), "--batch-size", "8"]) == 0
    assert "defective" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "insp" / "inspection.csv").open()))
    assert len(rows) == 27 and rows[-1]["error"] and rows[-1]["anomalous"] == ""
    scored = rows[:-1]
    assert all((r["defect_class"] in ("scratch", "spot")) == (r["anomalous"] == "1") for r in scored)
    defects = [r for r in scored if "/good/" not in r["image"]]
    flagged = [r for r in defects if r["anomalous"] == "1"]
    assert len(flagged) >= 0.8 * len(defects)  # PatchCore finds these planted defects (AUROC ~1 on brick)
    right = sum(r["defect_class"] in r["image"].split("/")[-2] for r in flagged)
    assert right >= 0.8 * len(flagged)  # and the classifier names them
    assert len(list((tmp_path / "insp" / "overlays").iterdir())) == 26
    page = (tmp_path / "insp" / "gallery.html").read_text()
    assert "<h2 id=" in page and "good (not defective)" in page and "unreadable" in page
    assert "http" not in page.replace("http-equiv", "") and page.count("data:image/jpeg;base64,") == 26
