"""UniNet (contrastive reverse distillation + DFS, negatives from synth): learns on brick crops.
Round trip, same seed, CLI and config errors: test_detector_contract.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import detect
from detect.base import AnomalySamples
from detect.metrics import auroc
from detect.models.distillation.uninet import UniNet
from detect.models.distillation.uninet.torch_model import (
    DomainFeatureSelection,
    uninet_loss,
    weighted_decision_scores,
)

SIZE = 64
# Small student (one block per stage) and batch 4: learns in 30 epochs on the 13 training crops; the defaults
# (paper-sized 3/4/6 decoder, batch 8, 100 epochs) need several times longer. blur_sigma 1 at 64 px is the
# paper's 4 at 256 px.
CONFIG = {"image_size": SIZE, "epochs": 30, "batch_size": 4, "decoder_blocks": [1, 1, 1], "bottleneck_blocks": 1,
          "blur_sigma": 1.0, "seed": 0}
# Measured on brick_set at image_size 64 (30 epochs, negatives DRAEM + CutPaste from synth): image AUROC 0.953
# (seeds 1, 2: 0.805, 0.906), pixel AUROC 0.945 (0.954, 0.949); loss 8.51 -> 6.79 (the contrastive term has a
# floor of about log(h * w) at the paper's temperature 2, so the loss falls by ~20 %, not by a factor).
IMAGE_AUROC_BAR = 0.8
PIXEL_AUROC_BAR = 0.9
LOSS_FACTOR = 0.85
SHORT = {**CONFIG, "epochs": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fitted(brick_set):
    return UniNet(**CONFIG).fit(brick_set, progress=False)


@pytest.fixture(scope="module")
def prediction(fitted, test_split):
    return fitted.predict(test_split[0])


def test_registered_frozen_teacher_and_shapes(fitted):
    assert "uninet" in detect.list_models("distillation")
    assert UniNet.supports_anomalies
    model = fitted.model
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert model.target is None  # target_teacher is off by default (see the detector docstring)
    with torch.no_grad():
        teacher, student = model.pairs(torch.rand(2, 3, SIZE, SIZE))
    assert [tuple(s.shape) for s in student] == [tuple(t.shape) for t in teacher]
    assert [t.shape[1] for t in teacher] == [24, 40, 112]  # tf_efficientnet_lite0 stages 1-3


def test_training_loss_decreases(fitted):
    history = fitted.history
    assert len(history) == CONFIG["epochs"]
    assert all(np.isfinite(history))
    assert history[-1] < LOSS_FACTOR * history[0]


def test_learns_image_and_pixel_auroc(prediction, test_split):
    paths, labels, masks = test_split
    assert prediction.scores.shape == (len(paths),)
    assert prediction.anomaly_maps.shape == (len(paths), SIZE, SIZE)
    assert auroc(prediction.scores, labels) >= IMAGE_AUROC_BAR
    assert auroc(prediction.anomaly_maps, masks) >= PIXEL_AUROC_BAR
    assert prediction.labels is not None  # calibrated


@pytest.fixture(scope="module")
def short(brick_set):
    return UniNet(**SHORT).fit(brick_set, progress=False)


def test_negatives_and_seed_matter(brick_set, short):
    # Same seed, same model (fit, CLI, round trip): test_detector_contract.py, with SHORT.
    # The synthetic negatives (drawn from seed) change training; without them it is one-class training.
    one_epoch = {**SHORT, "epochs": 1}
    one_class = UniNet(**one_epoch, negatives=[]).fit(brick_set, progress=False)
    assert one_class.history[0] != short.history[0]
    other_seed = UniNet(**{**one_epoch, "seed": 1}).fit(brick_set, progress=False)
    assert other_seed.history[0] != short.history[0]


def test_labeled_anomalies_are_negatives_too(brick_set, short, tmp_path):
    # Two labeled anomalies (one with its mask, one with the image label only), as fit(anomalies=...) passes them.
    chosen = brick_set.select(anomalous=True)[:2]
    anomalies = AnomalySamples([brick_set.image_path(s) for s in chosen],
                               [brick_set.load_mask(chosen[0]), None], source="real")
    plain = short
    supervised = UniNet(**SHORT).fit(brick_set, anomalies=anomalies, progress=False)
    assert supervised.history != plain.history and all(np.isfinite(supervised.history))
    assert supervised.train_anomalies is None  # not kept after fit
    supervised.save(tmp_path / "sup")
    assert detect.load(tmp_path / "sup").predict([brick_set.image_path(chosen[0])]).scores.shape == (1,)


def test_target_teacher_adapts_and_round_trips(brick_set, test_split, tmp_path):
    model = UniNet(**{**SHORT, "epochs": 1, "target_teacher": True}).fit(brick_set, progress=False)
    source, target = model.model.teacher.state_dict(), model.model.target.state_dict()
    assert any(k.endswith("running_mean") and not torch.equal(source[k], target[k]) for k in source)
    assert any(p.requires_grad for p in model.model.target.parameters())
    with torch.no_grad():
        teacher, student = model.model.pairs(torch.rand(1, 3, SIZE, SIZE))
    assert len(teacher) == len(student) == 6  # source vs student(target), target vs student(source)
    before = model.predict(test_split[0][:4])
    model.save(tmp_path / "target")
    after = detect.load(tmp_path / "target").predict(test_split[0][:4])
    np.testing.assert_array_equal(before.anomaly_maps, after.anomaly_maps)


# ----- loss and scoring terms on constructed features ---------------------------------------------------------


def _features(seed: int = 0, channels: int = 16, side: int = 4) -> torch.Tensor:
    return torch.randn(2, channels, side, side, generator=torch.Generator().manual_seed(seed))


def test_contrastive_loss_prefers_corresponding_features():
    t = _features()
    shuffled = t.flatten(2)[..., torch.randperm(16, generator=torch.Generator().manual_seed(1))].view_as(t)
    for temperature in (0.1, 2.0):
        same = uninet_loss([t], [t.clone()], temperature=temperature).item()
        other = uninet_loss([t], [shuffled], temperature=temperature).item()
        assert same < other
    # Scale does not matter (cosine), only direction.
    assert uninet_loss([t], [3 * t], temperature=0.5).item() == pytest.approx(
        uninet_loss([t], [t], temperature=0.5).item(), rel=1e-5)


def test_contrastive_term_and_temperature():
    t = _features()
    hw = 16
    # Contrastive term alone (lambda 0, margin 0): identical features, a sharper softmax (lower temperature)
    # gives the positive more probability; a very high temperature makes all positions alike: log(h * w).
    losses = [uninet_loss([t], [t], temperature=tau, lambda_weight=0.0, margin=0.0).item() for tau in (0.05, 0.5, 5)]
    assert losses[0] < losses[1] < losses[2] < math.log(hw)
    assert uninet_loss([t], [t], temperature=1e4, lambda_weight=0.0, margin=0.0).item() == pytest.approx(
        math.log(hw), rel=1e-3)
    # Cosine term alone: 1 - cos, 0 for identical and 2 for opposite features.
    assert uninet_loss([t], [t], temperature=1.0, lambda_weight=1.0, margin=0.0).item() == pytest.approx(0, abs=1e-6)
    assert uninet_loss([t], [-t], temperature=1.0, lambda_weight=1.0, margin=0.0).item() == pytest.approx(2.0)


def test_negatives_are_pushed_away():
    t = _features()
    anomalous = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    anomalous[:, :16, :16] = True  # position (0, 0) of the 4x4 grid
    # Labeled anomaly (no clean original): a student equal to the teacher there is penalised when the softmax is
    # sharp enough for P[p, p] to pass margin / 2 (the paper's supervised term), not otherwise.
    normal_only = uninet_loss([t], [t], temperature=0.05)
    with_negative = uninet_loss([t], [t], temperature=0.05, masks=anomalous)
    assert with_negative.item() > normal_only.item()
    # Synthetic anomaly with its clean original: the clean teacher features are the positives and the anomaly's
    # own teacher feature is a negative; reproducing the clean features beats copying the anomaly.
    clean = _features(seed=5)
    repairable = torch.ones(2, dtype=torch.bool)
    mixed = clean.clone()
    mixed[..., 0, 0] = t[..., 0, 0]  # the student copied the anomalous teacher feature at the defect
    kwargs = {"temperature": 0.5, "masks": anomalous, "clean": [clean], "repairable": repairable}
    assert uninet_loss([t], [clean], **kwargs).item() < uninet_loss([t], [mixed], **kwargs).item()


def test_weighted_decision_mechanism():
    maps = torch.zeros(1, 10, 10)
    maps[0, 0, :5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    # Level maxima (1, 1, 4): only the 3rd is above the average softmax probability -> weight 0.1 * 4 = 0.4
    # with alpha 0.1 -> k = 40 of 100 pixels: (5 + 4 + 3 + 2 + 1) / 40.
    score = weighted_decision_scores(torch.tensor([[1.0, 1.0, 4.0]]), maps, alpha=0.1, beta=1e-3)
    assert score.item() == pytest.approx(15 / 40)
    # Tiny alpha: beta's floor, at least one pixel: the maximum.
    score = weighted_decision_scores(torch.tensor([[1.0, 1.0, 4.0]]), maps, alpha=1e-6, beta=1e-6)
    assert score.item() == pytest.approx(5.0)


def test_domain_feature_selection_starts_from_the_plain_weighting():
    dfs = DomainFeatureSelection([16])
    t, s = _features(), _features(seed=3)
    (selected,) = dfs([s], [t])
    prior = torch.nn.functional.normalize(t, dim=1)
    spatial = torch.softmax(prior.flatten(2), dim=-1).view_as(t)
    torch.testing.assert_close(selected, s * spatial * (1.0 + prior.mean(dim=(-2, -1), keepdim=True)))


