"""Few-shot detection pipeline on the brick toy set (64 px, tiny budgets): schema, mode semantics, nested shots,
caching/resume, determinism, a learning bar and config/input errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from detect import registry
from detect.base import Detector
from detect.calibration import oracle_recall
from pipelines import fewshot
from pipelines.fewshot import FewShotConfig, fewshot_table, run_fewshot, shot_order
from synth.core.config import validate_config
from synth.core.defect_set import read_defect_set
from synth.core.errors import ConfigError, InputError
from synth.core.io import write_image

SIZE = 64
SHOTS = [1, 4, "all"]
# DRAEM at a test budget (the smallest widths of tests/test_model_draem.py, 2 epochs): it only has to run and
# take the synthetic anomalies; its numbers at this budget are near chance and not asserted.
DRAEM_TINY = {"epochs": 2, "batch_size": 4, "reconstructive_width": 8, "discriminative_width": 8}
SYNTHETIC_N = 16
# Image AUROC of PaDiM with all 16 shots (cross-fitted threshold, the model fits on all 16), seed 0, on the
# 24 test crops (8 good, 16 defects): measured 0.914 (k=1: 0.719, k=4: 0.852), as before cross-fitting. Chance
# is 0.5; the bar leaves a 0.21 margin below the measurement and is 0.2 above chance.
PADIM_ALL_BAR = 0.7
ROW_KEYS = {"model", "k", "k_images", "synthetic", "image_auroc", "pixel_auroc", "image_f1", "threshold", "fit_s",
            "seed"}
METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "image_f1", "image_precision", "image_recall", "threshold")


def _config(data: Path, **overrides) -> FewShotConfig:
    settings = {"data": str(data), "models": ["padim", "draem"], "shots": SHOTS, "image_size": SIZE,
                "synthetic_n": SYNTHETIC_N, "model_options": {"draem": DRAEM_TINY}, "strict": True}
    settings.update(overrides)
    return validate_config(FewShotConfig, settings)


def _rows(result: dict) -> dict[tuple[str, str, str], dict]:
    return {(r["model"], r["synthetic"], str(r["k"])): r for r in result["rows"]}


@pytest.fixture(scope="module")
def run(brick_set, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fewshot")
    cfg = _config(brick_set.root)
    return cfg, workdir, run_fewshot(cfg, workdir, progress=False)


def test_schema_and_json(run):
    cfg, workdir, result = run
    assert result["kind"] == "fewshot" and result["shots"] == SHOTS
    assert result["config"] == cfg.model_dump(mode="json")
    json.dumps(result, allow_nan=False)  # JSON-safe: no NaN, no paths objects
    assert len(result["rows"]) == 2 * 3 * 3  # models x synthetic modes x shots
    for row in result["rows"]:
        assert ROW_KEYS <= set(row)
        if row["skipped"] is None:
            assert row["error"] is None
            assert 0.0 <= row["image_auroc"] <= 1.0 and 0.0 <= row["pixel_auroc"] <= 1.0
            assert 0.0 <= row["image_f1"] <= 1.0 and row["fit_s"] > 0
            roc = result["roc"][f"{row['model']}|{row['synthetic']}|k={row['k']}"]
            assert 2 <= len(roc["fpr"]) == len(roc["tpr"]) <= 200
            assert roc["fpr"][0] == 0.0 and roc["fpr"][-1] == roc["tpr"][-1] == 1.0
    assert [r["k_images"] for r in result["rows"][:3]] == [1, 4, 16]
    assert result["n_train"] == 16 and result["test_counts"] == {"good": 8, "scratch": 8, "spot": 8}
    synthetic = Path(result["synthetic_set"])
    assert synthetic.is_dir() and workdir in synthetic.parents
    assert (workdir / "fewshot.json").is_file()


def test_threshold_mode_keeps_weights_and_uses_synthetic_anomalies(run):
    _, _, result = run
    rows = _rows(result)
    anomalies = read_defect_set(result["synthetic_set"]).select(anomalous=True)
    for model in ("padim", "draem"):
        for k in map(str, SHOTS):
            none, thr = rows[(model, "none", k)], rows[(model, "threshold", k)]
            # Same fitted model: identical ranking metrics, only the threshold (and F1) may differ.
            for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "fit_s"):
                assert thr[key] == none[key], (model, k, key)
            # "none": the detector's own threshold for the target false-positive rate (normals set it; the
            # detector's synthetic anomalies made from the held-out shots only estimate its recall).
            assert none["threshold_method"] == "fpr-0.05" and none["target_fpr"] == 0.05
            assert 0 <= none["calibration_fpr"] <= 1 and 0 <= thr["calibration_fpr"] <= 1
            assert thr["threshold_method"] == "f1-synthetic"
            assert thr["calibration_anomalies"] == round(0.25 * len(anomalies))
    # The two thresholds are chosen from different data: they differ somewhere.
    assert any(rows[(m, "none", k)]["threshold"] != rows[(m, "threshold", k)]["threshold"]
               for m in ("padim", "draem") for k in map(str, SHOTS))


def test_train_mode_skips_unsupervised_models_and_trains_supervised(run):
    _, _, result = run
    rows = _rows(result)
    anomalies = read_defect_set(result["synthetic_set"]).select(anomalous=True)
    for k in map(str, SHOTS):
        padim = rows[("padim", "train", k)]
        assert "supports_anomalies" in padim["skipped"]
        assert padim["image_auroc"] is None and f"padim|train|k={k}" not in result["roc"]
        draem = rows[("draem", "train", k)]
        assert draem["skipped"] is None and draem["image_auroc"] is not None
        assert draem["train_anomalies"] == len(anomalies) - round(0.25 * len(anomalies))
        assert draem["threshold_method"] == "fpr-0.05"
    assert fewshot_table(result).count("skipped") == 3


def test_shots_are_nested_and_calibration_split(run, brick_set):
    cfg, workdir, result = run
    order = result["shot_order"]["0"]
    pool = sorted(brick_set.select(split="train"), key=lambda s: s.image)
    assert order == [Path(pool[i].image).name for i in shot_order(16, cfg.seed)]
    sets = [json.loads((workdir / "cells" / f"padim__none__k{k}__r0.json").read_text())["cell"]["shots"]
            for k in SHOTS]
    assert [len(s) for s in sets] == [1, 4, 16]
    assert sets[0] == order[:1] and sets[1] == order[:4] and sorted(sets[2]) == sorted(order)
    assert shot_order(16, 0) == shot_order(16, 0) and shot_order(16, 0) != shot_order(16, 1)
    # PaDiM (a cheap refit) is cross-fitted: it fits on every shot and every shot is a held-out calibration
    # normal; DRAEM holds 20 % of the shots out from 5 on, and with 1 or 4 shots calibrates in-sample.
    rows = _rows(result)
    for k, scheme in (("1", "in-sample"), ("4", "crossfit-4"), ("all", "crossfit-8")):
        padim = rows[("padim", "none", k)]
        assert padim["fit_images"] == padim["calibration_normals"] == padim["k_images"]
        assert padim["calibration_scheme"] == scheme
    assert (rows[("draem", "none", "all")]["fit_images"], rows[("draem", "none", "all")]["calibration_normals"]) \
        == (13, 3)
    assert rows[("draem", "none", "4")]["calibration_scheme"] == "in-sample"
    assert all(rows[(m, "none", k)]["threshold_warning"] for m in ("padim", "draem") for k in map(str, SHOTS))


def test_oracle_recall_is_the_roc_point_at_the_target_rate():
    labels = np.array([False] * 20 + [True] * 4)
    scores = np.r_[np.arange(20), [18.5, 19.5, 25, 30]].astype(float)
    # 5 % of 20 normals = 1 may be flagged (19): everything above 18 is flagged -> 4 of 4 anomalies.
    assert oracle_recall(scores, labels, 0.05) == 1.0
    assert oracle_recall(scores, labels, 0.01) == 0.75  # no normal may be flagged: above 19 -> 3 of 4


def test_padim_beats_chance_with_all_shots(run):
    rows = _rows(run[2])
    auroc = rows[("padim", "none", "all")]["image_auroc"]
    assert auroc >= PADIM_ALL_BAR, f"PaDiM all-shot image AUROC {auroc:.3f} (bar {PADIM_ALL_BAR}, chance 0.5)"


def test_rerun_reuses_every_cell(run, monkeypatch):
    cfg, workdir, result = run

    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was fitted again")

    monkeypatch.setattr(registry, "create", refuse)
    monkeypatch.setattr(Detector, "fit", refuse)
    again = run_fewshot(cfg, workdir, progress=False)
    assert again["rows"] == result["rows"] and again["roc"] == result["roc"]
    assert again["cells_reused"] == 15  # 6 PaDiM + 9 DRAEM cells; the 3 skipped ones are never fitted


def test_killed_run_resumes_and_refits_identically(run, monkeypatch):
    cfg, workdir, result = run
    (workdir / "cells" / "padim__none__k1__r0.json").unlink()  # as if killed before this cell was written
    created = []
    original = registry.create

    def counting(name, **options):
        created.append(name)
        return original(name, **options)

    monkeypatch.setattr(registry, "create", counting)
    again = run_fewshot(cfg, workdir, progress=False)
    assert created == ["padim"]  # one fit recomputes the missing cell (and its "threshold" sibling)
    assert again["cells_reused"] == 13
    before, after = _rows(result), _rows(again)
    for key in before:
        for metric in METRIC_KEYS:
            assert after[key][metric] == before[key][metric], (key, metric)  # same seed -> same numbers


def test_fresh_run_is_deterministic(run, brick_set, tmp_path):
    _, _, result = run
    cfg = _config(brick_set.root, models=["padim"], shots=[1, "all"], synthetic=["none", "threshold"])
    fresh = run_fewshot(cfg, tmp_path, progress=False)
    before, after = _rows(result), _rows(fresh)
    assert len(after) == 4
    for key, row in after.items():
        for metric in METRIC_KEYS:
            assert row[metric] == before[key][metric], (key, metric)


def test_fewshot_table(run):
    table = fewshot_table(run[2])
    lines = table.strip().splitlines()
    assert lines[2] == "| model | synthetic | k=1 | k=4 | k=all (16) |"
    assert len(lines) == 4 + 6
    row = _rows(run[2])[("padim", "none", "all")]
    cell = f"{row['image_auroc']:.3f} / {row['image_fpr']:.3f} / {row['image_recall']:.3f}"
    assert "| padim | none | " in table and cell in table


def test_given_synthetic_set_and_failing_cells(brick_set, tmp_path, monkeypatch):
    cfg = _config(brick_set.root, models=["padim"], shots=[1], synthetic=["threshold"],
                  synthetic_set=str(brick_set.root), strict=False)
    result = run_fewshot(cfg, tmp_path / "given", progress=False)
    assert result["synthetic_set"] == str(brick_set.root.resolve())
    assert not (tmp_path / "given" / "synthetic").exists()
    assert result["rows"][0]["calibration_anomalies"] == 4  # a quarter of the 16 planted defects

    def boom(self, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(Detector, "fit", boom)
    cfg = _config(brick_set.root, models=["padim"], shots=[1], synthetic=["none"], strict=False)
    failed = run_fewshot(cfg, tmp_path / "failed", progress=False)
    assert "boom" in failed["rows"][0]["error"] and failed["rows"][0]["image_auroc"] is None
    assert not list((tmp_path / "failed" / "cells").glob("*.json"))  # failures are retried on the next run
    with pytest.raises(RuntimeError, match="boom"):
        run_fewshot(cfg.model_copy(update={"strict": True}), tmp_path / "failed", progress=False)


def test_synthetic_from_shots_uses_only_the_shots(brick_set, tmp_path):
    cfg = _config(brick_set.root, models=["padim"], shots=[1], synthetic=["threshold"], synthetic_n=4,
                  synthetic_from="shots")
    result = run_fewshot(cfg, tmp_path, progress=False)
    assert result["synthetic_set"] == str((tmp_path / "synthetic").resolve())
    (folder,) = (tmp_path / "synthetic").iterdir()
    shot = result["shot_order"]["0"][0]
    sources = {Path(s.source_image).name for s in read_defect_set(folder).select(split="test")}
    assert sources == {shot}


@pytest.mark.parametrize(("override", "key"), [
    ({"shots": [0, 1]}, "shots"),
    ({"shots": [1, "most"]}, "shots"),
    ({"models": ["padim", "no_such_model"]}, "models"),
    ({"synthetic": ["none", "sometimes"]}, "synthetic"),
    ({"synthetic_method": "magic"}, "synthetic_method"),
    ({"synthetic_method": "paste"}, "masks"),
    ({"model_options": {"padim": {"image_size": 32}}}, "model_options"),
    ({"model_options": {"padim": {"no_such_option": 1}}}, "model_options"),
    ({"model_options": {"no_such_model": {"epochs": 1}}}, "model_options"),
    ({"synthetic_from": "shots", "synthetic_set": "x"}, "synthetic_from"),
    ({"synthetic_calibration_fraction": 1.0}, "synthetic_calibration_fraction"),
    ({"image_size": 60}, "image_size"),
    ({"unknown_key": 1}, "unknown_key"),
])
def test_bad_config_names_the_key(brick_set, override, key):
    with pytest.raises(ConfigError, match=f"key '{key}"):
        _config(brick_set.root, **{"models": ["padim"], **override})


def test_runner_style_update_is_validated_again(brick_set, tmp_path):
    # The pipeline runner fills synthetic_set with model_copy (no validation); run_fewshot checks again.
    cfg = _config(brick_set.root, models=["padim"], synthetic_from="shots")
    with pytest.raises(ConfigError, match="key 'synthetic_from'"):
        run_fewshot(cfg.model_copy(update={"synthetic_set": brick_set.root}), tmp_path, progress=False)


def test_data_without_train_good(tmp_path):
    write_image(tmp_path / "data" / "test" / "good" / "a.png", np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(InputError, match="train/good"):
        run_fewshot(_config(tmp_path / "data", models=["padim"]), tmp_path / "work", progress=False)


def test_defaults_follow_the_issue():
    cfg = FewShotConfig(data=Path("x"))
    assert cfg.models == ["patchcore", "draem", "supersimplenet"] and cfg.shots == [1, 2, 4, 8, "all"]
    assert cfg.synthetic == list(fewshot.SYNTHETIC_MODES) and cfg.synthetic_method == "perlin"
    assert (cfg.synthetic_n, cfg.image_size, cfg.repeats) == (64, 128, 1)
