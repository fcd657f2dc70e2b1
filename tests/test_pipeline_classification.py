"""Defect-class classification pipeline (AnomalyDiffusion protocol) on the real brick-texture toy set."""

from __future__ import annotations

import json

import numpy as np
import pytest

import pipelines.classification as clf
from pipelines.classification import ClassificationConfig, run_classification, split_classes
from synth.core.config import validate_config
from synth.core.defect_set import read_defect_set
from synth.core.errors import ConfigError, InputError
from synth.toyset import make_texture_defect_set

N_PER_CLASS = 12
N_REAL = 12  # real images per planted class: 4 to generate from, 8 to test on
# Chance is 0.5 for two balanced classes. Measured mean accuracy of the paste(poisson)-trained classifier on the
# 16 held-out real images with this exact config: 0.938 / 0.875 / 0.938 for seeds 0 / 1 / 2 (one image = 0.0625).
# Required: chance + 0.25, which leaves 0.125 (two test images) below the lowest measured value.
MIN_SYNTHETIC_MEAN_ACCURACY = 0.75


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("brick_cls")
    make_texture_defect_set(root, texture="brick", size=64, n_train=12, n_test_good=2, n_test_per_class=N_REAL,
                            seed=0)
    return root


def _config(data, **overrides):
    values = {"data": data, "n_per_class": N_PER_CLASS, "image_size": 64, "steps": 24, "batch_size": 8,
              "lr": 2e-3, "seed": 0}
    values.update(overrides)
    return validate_config(ClassificationConfig, values)


@pytest.fixture(scope="module")
def first_run(toy_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cls_work")
    cfg = _config(toy_data)
    return cfg, workdir, run_classification(cfg, workdir, progress=False)


def test_result_schema(first_run):
    cfg, workdir, result = first_run
    json.dumps(result, allow_nan=False)  # strictly JSON-safe
    assert result["kind"] == "classification"
    assert result["classes"] == ["scratch", "spot"]
    assert set(result["methods"]) == {"synthetic:paste", "real_only", "crop_paste"}
    assert result["config"] == cfg.model_dump(mode="json")
    for name, method in result["methods"].items():
        assert set(method["per_class"]) == {"scratch", "spot"}, name
        assert all(0.0 <= v <= 1.0 for v in method["per_class"].values())
        assert method["mean_accuracy"] == pytest.approx(np.mean(list(method["per_class"].values())))
        confusion = np.array(method["confusion"])
        assert confusion.shape == (2, 2) and confusion.sum() == 2 * (N_REAL - 4)
        assert method["overall_accuracy"] == pytest.approx(np.trace(confusion) / confusion.sum())
        # per-class accuracy is the recall: the diagonal over the row sum
        assert method["per_class"]["spot"] == pytest.approx(confusion[1, 1] / confusion[1].sum())
    assert result["methods"]["real_only"]["n_train"] == 2 * 4
    assert result["methods"]["synthetic:paste"]["n_train"] == 2 * N_PER_CLASS
    assert result["methods"]["crop_paste"]["n_train"] == 2 * N_PER_CLASS
    assert set(result["generated_sets"]) == {"synthetic:paste", "crop_paste"}
    for path in result["generated_sets"].values():
        generated = read_defect_set(path)
        assert generated.defect_classes == ["scratch", "spot"]
        assert len(generated.select(split="test", defect_class="spot")) == N_PER_CLASS
    assert (workdir / "results" / "synthetic_paste.json").is_file()
    assert json.loads((workdir / "classification.json").read_text()) == result


def test_synthetic_classifier_beats_chance(first_run):
    _, _, result = first_run
    synthetic = result["methods"]["synthetic:paste"]
    assert synthetic["mean_accuracy"] >= MIN_SYNTHETIC_MEAN_ACCURACY, synthetic


def test_paste_uses_only_the_generation_part(first_run):
    _, _, result = first_run
    generated = read_defect_set(result["generated_sets"]["synthetic:paste"])
    for defect_class, part in result["split"].items():
        allowed = {p.rsplit("/", 1)[-1].rsplit(".", 1)[0] for p in part["generation"]}
        for sample in generated.select(split="test", defect_class=defect_class):
            # the placer records which exemplar mask it used: masks/<class>/<name>.png of the generation part
            source = sample.params["source"]
            assert f"/masks/{defect_class}/" in source
            assert source.rsplit("/", 1)[-1].rsplit(".", 1)[0] in allowed


def test_split_is_disjoint_and_deterministic(toy_data):
    dataset = read_defect_set(toy_data)
    classes = ["scratch", "spot"]
    a = split_classes(dataset, classes, 1 / 3, seed=0)
    b = split_classes(dataset, classes, 1 / 3, seed=0)
    c = split_classes(dataset, classes, 1 / 3, seed=1)
    for cls in classes:
        gen = [s.image for s in a[cls]["generation"]]
        test = [s.image for s in a[cls]["test"]]
        assert len(gen) == 4 and len(test) == N_REAL - 4
        assert not set(gen) & set(test)
        assert sorted(gen + test) == sorted(s.image for s in dataset.select(split="test", defect_class=cls))
        assert gen == [s.image for s in b[cls]["generation"]]
    assert any([s.image for s in a[k]["generation"]] != [s.image for s in c[k]["generation"]] for k in classes)


def test_rerun_reuses_cached_results(first_run, monkeypatch):
    cfg, workdir, result = first_run

    def fail(*args, **kwargs):
        raise AssertionError("the classifier was trained although every result is cached")

    monkeypatch.setattr(clf.DefectClassifier, "fit_labeled", fail)
    monkeypatch.setattr(clf, "generate", fail)
    again = run_classification(cfg, workdir, progress=False)
    assert again["methods"] == result["methods"]
    # A changed training setting is a different unit: it must retrain, not reuse.
    with pytest.raises(AssertionError, match="cached"):
        run_classification(_config(cfg.data, lr=1e-3, baselines=["real_only"]), workdir, progress=False)


def test_crop_paste_is_an_unblended_bounding_box_copy():
    rng = np.random.default_rng(0)
    normal = np.full((32, 32, 3), 100, np.uint8)
    image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), bool)
    mask[5:9, 10:20] = True
    out, out_mask = clf.crop_paste_one(normal, image, mask, np.random.default_rng(1))
    ys, xs = np.nonzero(out_mask)
    top, left = ys.min(), xs.min()
    assert out_mask.sum() == mask.sum()
    np.testing.assert_array_equal(out[top:top + 4, left:left + 10], image[5:9, 10:20])
    changed = (out != normal).any(axis=2)
    assert not changed[~out_mask].any()


@pytest.mark.parametrize(("values", "key"), [
    ({"generation_fraction": 0}, "generation_fraction"),
    ({"generation_fraction": 1}, "generation_fraction"),
    ({"baselines": ["real_only", "mixup"]}, "baselines"),
    ({"method": "no_such_method"}, "method"),
    ({"n_per_class": 0}, "n_per_class"),
    ({"crop": True}, "crop"),
])
def test_bad_config_names_the_key(tmp_path, values, key):
    with pytest.raises(ConfigError, match=f"'{key}"):
        validate_config(ClassificationConfig, {"data": tmp_path, **values})


def test_class_with_one_image_is_a_clear_error(tmp_path):
    make_texture_defect_set(tmp_path / "data", size=64, n_train=2, n_test_good=1, n_test_per_class=1)
    with pytest.raises(InputError, match="'scratch' has 1 image"):
        run_classification(_config(tmp_path / "data"), tmp_path / "work", progress=False)


def test_single_defect_class_is_a_clear_error(tmp_path):
    make_texture_defect_set(tmp_path / "data", size=64, n_train=2, n_test_good=1, n_test_per_class=3,
                            classes=("spot",))
    with pytest.raises(InputError, match="at least 2 defect classes"):
        run_classification(_config(tmp_path / "data"), tmp_path / "work", progress=False)


def test_real_plus_synthetic_trains_on_both(first_run):
    cfg, workdir, result = first_run
    both = run_classification(cfg.model_copy(update={"baselines": ["real_only", "real_plus_synthetic"]}), workdir,
                              progress=False)
    # The synthetic set and the real-only classifier are reused; the new method trains on 8 real + 24 synthetic.
    assert both["methods"]["real_only"] == result["methods"]["real_only"]
    mixed = both["methods"]["real_plus_synthetic"]
    assert mixed["n_train"] == 2 * 4 + 2 * N_PER_CLASS and mixed["steps"] == result["methods"]["real_only"]["steps"]
    assert np.array(mixed["confusion"]).sum() == 2 * (N_REAL - 4)
