"""Thresholds at a stated false-positive rate from few normal shots (detect.calibration, issue 16).

The statistics are checked against their definitions; the cross-fitting against an independent fit (a leak of
the held-out image into its fold model's memory bank would score it 0); and the whole decision on real images:
at k = 16 shots the false-positive rate measured on held-out good parts stays within 2x the 5 % target while
the recall stays within 10 points of what the ROC allows at that rate (brick toy set, and magnetic tile).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import detect
from detect.calibration import (
    atypical_normals,
    augmented_views,
    fold_indices,
    fpr_threshold,
    normals_needed,
    operating_point,
    oracle_recall,
)
from detect.cli import main as detect_main
from detect.threshold import Calibration
from synth.core.defect_set import read_defect_set
from synth.core.errors import ConfigError, InputError
from synth.toyset import make_texture_defect_set

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TARGET = 0.05
# The bar of issue 16 at k >= 8: measured FPR <= 2 x target, recall within 10 points of the ROC's at the target.
FPR_FACTOR, RECALL_GAP = 2.0, 0.10


def test_normals_needed_follows_the_binomial_spread():
    assert normals_needed(0.05) == 76 and normals_needed(0.01) == 396
    assert normals_needed(0.5) == 4


def test_empirical_threshold_with_many_normals_is_the_conformal_quantile():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=2000)
    tail = fpr_threshold(scores, None, TARGET)
    assert tail.tail == "empirical" and tail.warning is None
    rank = int(np.ceil(2001 * 0.95))
    assert np.sort(scores)[rank - 1] <= tail.threshold < np.sort(scores)[rank]
    fresh = rng.normal(size=200_000)
    assert 0.04 <= (fresh >= tail.threshold).mean() <= 0.06


@pytest.mark.parametrize("lognormal", [False, True])
def test_few_normals_predictive_threshold_hits_the_target_on_average(lognormal):
    # For normal (or log-normal) scores the Student-t predictive quantile exceeds a new normal score with
    # probability exactly `target`, averaged over the draws of the 8 calibration scores.
    rng = np.random.default_rng(1)
    rates = []
    for _ in range(3000):
        draw = rng.normal(2.0, 0.5, size=9)
        scores = np.exp(draw) if lognormal else draw - 5.0  # all positive / some negative -> both tails
        tail = fpr_threshold(scores[:8], None, TARGET)
        rates.append(float(scores[8] >= tail.threshold))
        assert tail.tail == ("lognormal" if lognormal else "normal")
    assert abs(np.mean(rates) - TARGET) < 0.012, np.mean(rates)


def test_too_few_normals_give_an_honest_warning():
    tail = fpr_threshold(np.array([1.0, 1.2, 0.9]), np.array([1.1, 1.05]), 0.01)
    assert "only 3 held-out normal image(s)" in tail.warning and "about 396 normal images" in tail.warning
    one = fpr_threshold(np.array([1.0]), np.array([1.1, 0.95]), TARGET)
    assert one.threshold > 1.1 and "one image" in one.warning
    with pytest.raises(InputError, match="target_fpr"):
        fpr_threshold(np.array([1.0, 2.0]), None, 1.5)


def test_atypical_normals_are_the_outlying_high_scores():
    scores = np.array([26.0, 27.1, 27.5, 28.0, 28.6, 29.5, 30.4, 31.0, 53.0])
    assert atypical_normals(scores).tolist() == [8]
    assert atypical_normals(scores[:-1]).size == 0 and atypical_normals(scores[:4]).size == 0  # < 5: none


def test_a_defective_part_among_the_shots_is_named(brick_set):
    shots = sorted(brick_set.image_path(s) for s in brick_set.select(split="train"))[:11]
    defect = next(brick_set.image_path(s) for s in brick_set.select(split="test", anomalous=True)
                  if s.defect_class == "spot")
    model = detect.create("patchcore", image_size=64).fit([*shots, defect], progress=False)
    assert model.calibration.atypical_normals == [defect.name]
    assert f"({defect.name}): check that they are good parts" in model.calibration.warning
    clean = detect.create("patchcore", image_size=64).fit(shots, progress=False)
    assert clean.calibration.atypical_normals is None


def test_views_are_mild_and_seeded():
    image = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    first = augmented_views(image, 4, np.random.default_rng(3))
    again = augmented_views(image, 4, np.random.default_rng(3))
    assert len(first) == 4 and all(v.shape == image.shape and v.dtype == np.uint8 for v in first)
    assert all((a == b).all() for a, b in zip(first, again, strict=True))
    gain = first[1].astype(float).mean() - image.astype(float).mean()
    assert abs(gain) <= 0.05 * 128 + 1


def test_folds_cover_every_image_once():
    folds = fold_indices(11, 4, seed=0)
    assert len(folds) == 4 and sorted(np.concatenate(folds).tolist()) == list(range(11))
    assert [len(f) for f in fold_indices(5, 8, seed=0)] == [1] * 5  # leave-one-out below the fold count
    with pytest.raises(InputError):
        fold_indices(1, 8, seed=0)


def test_operating_point_counts():
    labels = np.array([False, False, False, False, True, True])
    point = operating_point(np.array([0, 1, 2, 5, 4, 6]), labels, 4.0)
    assert point["fpr"] == 0.25 and point["recall"] == 1.0 and point["precision"] == 2 / 3
    assert oracle_recall(np.array([0, 1, 2, 5, 4, 6]), labels, 0.25) == 1.0
    assert oracle_recall(np.array([0, 1, 2, 5, 4, 6]), labels, 0.1) == 0.5


def test_crossfit_scores_never_see_their_own_image(brick_set):
    # coreset_ratio 1: every training patch is in the bank, so an image scored by a model that holds it scores 0.
    # A held-out score must equal the score of a model fitted on the other folds alone, and be clearly above 0.
    images = sorted(brick_set.image_path(s) for s in brick_set.select(split="train"))[:10]
    model = detect.create("patchcore", image_size=64, coreset_ratio=1.0, calibration_folds=4, seed=3)
    model.fit(images, progress=False)
    held = model.calibration_scores
    assert held.scheme == "crossfit-4" and held.normal.shape == (10,) and held.views.shape == (20,)
    assert model.calibration.num_normal == 10 and model.calibration.scheme == "crossfit-4"
    in_sample = model.predict(images).scores
    assert in_sample.max() < 1e-4  # the deployed model holds all 10 images: in-sample scores are 0
    folds = fold_indices(10, 4, seed=3)
    order = np.concatenate(folds)
    assert held.normal.min() > 100 * max(in_sample.max(), 1e-6)
    for position, fold in enumerate(folds):
        rest = [images[i] for i in range(10) if i not in set(fold.tolist())]
        alone = detect.create("patchcore", image_size=64, coreset_ratio=1.0, seed=3).fit(rest, calibrate=False,
                                                                                          progress=False)
        expected = alone.predict([images[i] for i in fold]).scores
        start = sum(len(f) for f in folds[:position])
        np.testing.assert_allclose(held.normal[start:start + len(fold)], expected, rtol=1e-5)
    assert sorted(order.tolist()) == list(range(10))


def test_trained_models_hold_out_and_val_images_are_scored_by_the_deployed_model(brick_set):
    images = sorted(brick_set.image_path(s) for s in brick_set.select(split="train"))
    fast = detect.create("fastflow", image_size=64, epochs=1)
    assert fast.calibration_scheme(16) == "holdout" and fast.calibration_scheme(4) == "in-sample"
    assert fast.calibration_scheme(16, val=images) == "val"
    padim = detect.create("padim", image_size=64)
    assert padim.calibration_scheme(16) == "crossfit" and padim.calibration_scheme(200) == "holdout"
    good = sorted(brick_set.image_path(s) for s in brick_set.select(split="test", anomalous=False))
    padim.fit(images, val=good, progress=False)
    assert padim.calibration.scheme == "val" and padim.calibration.num_normal == len(good)
    np.testing.assert_allclose(padim.calibration_scores.normal, padim.predict(good).scores, rtol=1e-5)


def test_bad_calibration_options_name_the_key():
    for key, value in (("target_fpr", 0.0), ("target_fpr", 1.0), ("calibration", "loo"),
                       ("calibration_folds", 1), ("calibration_views", -1), ("threshold_method", "fpr2")):
        with pytest.raises(ConfigError, match=f"key '{key}'"):
            detect.create("padim", **{key: value})


def test_models_saved_before_the_operating_point_still_load():
    old = {"image_threshold": 1.0, "method": "f1-synthetic", "score_min": 0.0, "score_max": 2.0,
           "pixel_threshold": None, "pixel_min": None, "pixel_max": None, "num_normal": 3, "num_anomalous": 3}
    calibration = Calibration.from_dict(old)
    assert calibration.target_fpr is None and "f1-synthetic" in calibration.describe()


def test_cli_states_the_operating_point(brick_set, tmp_path, capsys):
    out = tmp_path / "padim"
    assert detect_main(["fit", "-q", "--model", "padim", "--data", str(brick_set.root), "--out", str(out),
                        "--image-size", "64", "--set", "target_fpr=0.02"]) == 0
    printed = capsys.readouterr().out
    assert "target false-positive rate 2.0%" in printed and "16 held-out normal image(s) [crossfit-8]" in printed
    assert "expected recall" in printed and "warning: only 16 held-out normal image(s)" in printed
    assert "about 196 normal images" in printed
    assert detect_main(["eval", "-q", "--model-dir", str(out), "--data", str(brick_set.root)]) == 0
    printed = capsys.readouterr().out
    assert "false-positive rate" in printed and "target false-positive rate 0.020" in printed
    threshold = json.loads((out / "eval" / "metrics.json").read_text())["threshold"]
    assert threshold["target_fpr"] == 0.02 and 0 <= threshold["roc_recall_at_target"] <= 1
    assert threshold["calibration_warning"].startswith("only 16")


def _measure(root, model: str, size: int, k: int, seeds: tuple[int, ...], max_defects: int | None = None
             ) -> tuple[float, float, list[float]]:
    """Mean measured FPR, mean recall gap (ROC recall at the target - recall at the threshold), per-seed FPRs."""
    dataset = read_defect_set(root)
    train = sorted(dataset.image_path(s) for s in dataset.select(split="train", anomalous=False))
    test = sorted(dataset.select(split="test"), key=lambda s: s.image)
    if max_defects is not None:
        keep = np.random.default_rng(0).permutation([i for i, s in enumerate(test) if s.is_anomalous])[:max_defects]
        test = [s for i, s in enumerate(test) if not s.is_anomalous or i in set(keep.tolist())]
    labels = np.array([s.is_anomalous for s in test])
    paths = [dataset.image_path(s) for s in test]
    fprs, gaps = [], []
    for seed in seeds:
        shots = [train[i] for i in np.random.default_rng(seed).permutation(len(train))[:k]]
        detector = detect.create(model, image_size=size, seed=seed, target_fpr=TARGET).fit(shots, progress=False)
        prediction = detector.predict(paths)
        fprs.append(float(prediction.labels[~labels].mean()))
        gaps.append(oracle_recall(prediction.scores, labels, TARGET) - float(prediction.labels[labels].mean()))
    return float(np.mean(fprs)), float(np.mean(gaps)), fprs


def test_toy_set_fpr_at_the_tool_threshold_is_near_the_target(tmp_path):
    # 200 good test crops, so a 5 % rate is measured to +-1.5 points. Measured (seeds 0, 1): FPR 0.010 / 0.000,
    # mean recall gap 0.000 (PatchCore separates these planted defects almost perfectly: AUROC ~1).
    root = make_texture_defect_set(tmp_path / "toy", texture="brick", size=64, n_train=40, n_test_good=200,
                                   n_test_per_class=25, seed=0).root
    fpr, gap, fprs = _measure(root, "patchcore", 64, 16, (0, 1))
    assert fpr <= FPR_FACTOR * TARGET and gap <= RECALL_GAP, (fprs, gap)


def test_magnetic_tile_fpr_at_the_tool_threshold_is_near_the_target(magnetic_tile):
    # 200 good test tiles; 100 of the 392 defects (seeded) keep the test short. Measured (seeds 0, 1, 128 px):
    # FPR 0.075 / 0.050 (bar 0.10), mean recall gap -0.025 (bar 0.10); scripts/results/bench_thresholds has the
    # 5-seed table.
    fpr, gap, fprs = _measure(magnetic_tile, "patchcore", 128, 16, (0, 1), max_defects=100)
    assert fpr <= FPR_FACTOR * TARGET and gap <= RECALL_GAP, (fprs, gap)


def test_calibrate_is_the_step_fit_ends_with(brick_set):
    """``fit(val=...)`` equals ``fit(calibrate=False)`` then ``calibrate(...)``; a new target moves only the
    threshold (the scores stay), and is checked like a config value."""
    images = sorted(brick_set.image_path(s) for s in brick_set.select(split="train"))
    good = sorted(brick_set.image_path(s) for s in brick_set.select(split="test", anomalous=False))
    with pytest.raises(InputError, match="not fitted"):
        detect.create("padim", image_size=64).calibrate(good)
    in_fit = detect.create("padim", image_size=64).fit(images, val=good, progress=False)
    stepwise = detect.create("padim", image_size=64).fit(images, calibrate=False, progress=False)
    assert stepwise.calibration is None
    assert stepwise.calibrate(good) is stepwise and stepwise.calibration.to_dict() == in_fit.calibration.to_dict()
    strict = stepwise.predict(good)
    stepwise.calibrate(good, target_fpr=0.3)
    loose = stepwise.predict(good)
    assert stepwise.config.target_fpr == 0.3 and stepwise.calibration.target_fpr == 0.3
    np.testing.assert_array_equal(strict.scores, loose.scores)
    assert stepwise.calibration.image_threshold < in_fit.calibration.image_threshold
    assert loose.labels.sum() > strict.labels.sum()
    with pytest.raises(ConfigError, match="key 'target_fpr'"):
        stepwise.calibrate(good, target_fpr=1.5)


def test_calibrate_with_anomalies_keeps_the_held_out_normals_and_their_scores(brick_set):
    """``calibrate(anomalies=...)`` without ``val``: the F1 threshold between the normals ``fit`` cross-fitted
    (their fold scores, not re-scored by the model that trained on them) and the newly scored anomalies."""
    images = sorted(brick_set.image_path(s) for s in brick_set.select(split="train"))
    defects = [brick_set.image_path(s) for s in brick_set.select(split="test", anomalous=True)]
    good = sorted(brick_set.image_path(s) for s in brick_set.select(split="test", anomalous=False))
    detector = detect.create("padim", image_size=64, calibration_folds=2).fit(images, progress=False)
    with pytest.raises(InputError, match="needs val= .* or anomalies="):
        detector.calibrate()
    fitted, held = detector.calibration, detector.calibration_scores
    assert held.scheme.startswith("crossfit")
    detector.calibrate(anomalies=[(path, None) for path in defects], threshold_method="f1")
    new = detector.calibration
    assert new.method == "f1-real" and new.num_anomalous == len(defects) and new.num_normal == held.normal.size
    np.testing.assert_array_equal(detector.calibration_scores.normal, held.normal)
    np.testing.assert_allclose(detector.calibration_scores.anomalous, detector.predict(defects).scores)
    assert new.pixel_threshold == fitted.pixel_threshold  # the maps of the held-out normals are not kept
    assert new.estimated_recall == float((detector.calibration_scores.anomalous >= new.image_threshold).mean())
    assert new.calibration_fpr == float((np.r_[held.normal, held.views] >= new.image_threshold).mean())
    # F1-optimal on exactly these scores: no worse there than the fit's 5 %-FPR threshold
    scores = np.r_[held.normal, detector.calibration_scores.anomalous]
    labels = np.r_[np.zeros(held.normal.size, bool), np.ones(len(defects), bool)]
    assert (operating_point(scores, labels, new.image_threshold)["f1"]
            >= operating_point(scores, labels, fitted.image_threshold)["f1"])
    # with val= the anomalies join the given normals, which are scored afresh
    detector.calibrate(good, anomalies=[(path, None) for path in defects])
    assert detector.calibration.num_normal == len(good) and detector.calibration.num_anomalous == len(defects)
    detector.calibration_scores = None  # as after detect.load: the held-out scores are not saved
    with pytest.raises(InputError, match="no held-out normal scores"):
        detector.calibrate(anomalies=[(path, None) for path in defects])


def test_cli_calibrate_resets_the_threshold_and_keeps_the_weights(brick_set, tmp_path, capsys):
    out = tmp_path / "padim"
    assert detect_main(["fit", "-q", "--model", "padim", "--data", str(brick_set.root), "--out", str(out),
                        "--image-size", "64"]) == 0
    weights = (out / "model.safetensors").read_bytes()
    before = json.loads((out / "config.json").read_text())["calibration"]
    capsys.readouterr()
    assert detect_main(["calibrate", "-q", "--model-dir", str(out), "--data", str(brick_set.root / "test" / "good"),
                        "--target-fpr", "0.2"]) == 0
    printed = capsys.readouterr().out
    assert "target false-positive rate 20.0%" in printed and "[val]" in printed
    after = json.loads((out / "config.json").read_text())
    assert after["config"]["target_fpr"] == 0.2 and after["calibration"]["target_fpr"] == 0.2
    assert after["calibration"]["image_threshold"] != before["image_threshold"]
    assert (out / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["padim"]  # no staging folder left
    assert detect_main(["calibrate", "-q", "--model-dir", str(out), "--data", str(tmp_path / "missing")]) != 0
    assert json.loads((out / "config.json").read_text()) == after  # a failed run changes nothing
