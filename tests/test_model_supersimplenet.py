"""SuperSimpleNet: learns on brick crops unsupervised and supervised.
Round trip, same seed, CLI and config errors: test_detector_contract.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import detect
import synth.masks
from detect.metrics import auroc
from detect.models.feature_adaptation.supersimplenet import SuperSimpleNet, anomaly_generator
from detect.models.feature_adaptation.supersimplenet.anomaly_generator import (
    add_feature_anomalies,
    max_scale_exp,
    perlin_masks,
)
from detect.models.feature_adaptation.supersimplenet.detector import downsample_masks
from detect.models.feature_adaptation.supersimplenet.losses import focal_loss, truncated_l1_loss
from synth.core.errors import InputError

SIZE = 64
# Test-sized settings: an 8x8 feature map (upscale 1 at 64 px; the paper's 2 gives 16x16 at 4x the cost), a
# 256-wide segmentation head and learning rates about 10x the paper's, so both heads learn within ~200 CPU steps
# (batch 4: 4 steps per epoch on the 13 training crops; the paper trains 300 epochs on a GPU).
BASE = {"image_size": SIZE, "batch_size": 4, "hidden_dim": 256, "upscale": 1, "lr": 1e-3, "seg_lr": 2e-3,
        "cls_lr": 5e-3, "seed": 0}
UNSUPERVISED = {**BASE, "epochs": 60}
SUPERVISED = {**BASE, "epochs": 40}  # 4 anomalies x 4 flips + 13 normals: 8 steps per epoch
# Measured on brick_set (image AUROC of the classification-head logit, the paper's image score; one torch thread):
# unsupervised, 60 epochs, full test split, seeds 0..6: 0.914, 0.961, 0.906, 0.984, 0.977, 0.547, 1.000 (seed 5 is
#   an unstable run; the map-max score is steadier: 0.984, 0.992, 1.000, 1.000, 0.984, 0.914, 1.000); pixel AUROC
#   0.87-0.93; loss 2.40 -> 0.044 (seed 0);
# supervised with 2 spot + 2 scratch anomalies, 40 epochs, on the 20 remaining test images, seeds 0, 1, 2, 4: 0.927,
#   1.000, 0.979, 0.917 (30 epochs: 0.906, 0.917, 0.969, 0.896; seed 0 with two threads 0.823); the unsupervised
#   models score 0.917, 0.958, 0.938, 0.979 on the same 20 images: with this budget and two defect kinds that
#   unsupervised training already finds, the labeled anomalies add little beyond faster learning.
IMAGE_AUROC_BAR = 0.85
MAP_MAX_AUROC_BAR = 0.95
LOSS_FACTOR = 0.1


@pytest.fixture(scope="module")
def split(brick_set):
    """Two spot and two scratch defects to train on; the rest of the test split to score."""
    samples = brick_set.select(split="test")
    train_anomalies = [s for c in ("spot", "scratch") for s in [s for s in samples if s.defect_class == c][:2]]
    held = [s for s in samples if s not in train_anomalies]
    pairs = [(brick_set.image_path(s), brick_set.load_mask(s)) for s in train_anomalies]
    return pairs, [brick_set.image_path(s) for s in held], np.array([s.is_anomalous for s in held])


@pytest.fixture(scope="module")
def fitted(brick_set):
    return SuperSimpleNet(**UNSUPERVISED).fit(brick_set, progress=False)


@pytest.fixture(scope="module")
def supervised(brick_set, split):
    return SuperSimpleNet(**SUPERVISED).fit(brick_set, anomalies=split[0], progress=False)


@pytest.fixture(scope="module")
def prediction(fitted, test_split):
    return fitted.predict(test_split[0])


def test_registered_and_supervised_capable(fitted):
    assert "supersimplenet" in detect.list_models("feature_adaptation")
    assert SuperSimpleNet.supports_anomalies
    state = fitted.model.state_dict()
    assert any(k.startswith("adaptor.") for k in state) and any(k.startswith("head.cls_fc") for k in state)
    assert not any(p.requires_grad for p in fitted.model.feature_extractor.parameters())
    assert fitted.model.head.stop_grad  # paper's unsupervised setting


def test_training_loss_decreases(fitted):
    history = fitted.history
    assert len(history) == UNSUPERVISED["epochs"]
    assert all(np.isfinite(history))
    assert history[-1] < LOSS_FACTOR * history[0]


def test_learns_image_auroc(fitted, prediction, test_split):
    paths, labels, masks = test_split
    assert prediction.scores.shape == (len(paths),)
    assert prediction.anomaly_maps.shape == (len(paths), SIZE, SIZE)
    assert auroc(prediction.scores, labels) >= IMAGE_AUROC_BAR
    assert prediction.labels is not None  # calibrated
    # The map localises the defects, and its maximum ranks images too (score_mode="map_max").
    assert auroc(prediction.anomaly_maps, masks) >= 0.9
    fitted.model.score_mode = "map_max"
    try:
        map_scores = fitted.predict(paths).scores
    finally:
        fitted.model.score_mode = "cls"
    np.testing.assert_allclose(map_scores, prediction.anomaly_maps.reshape(len(paths), -1).max(axis=1), rtol=1e-6)
    assert auroc(map_scores, labels) >= MAP_MAX_AUROC_BAR


def test_supervised_reaches_the_unsupervised_bar(supervised, fitted, split):
    _, paths, labels = split
    assert supervised.settings(True) == {"perlin_threshold": 0.6, "stop_grad": False, "clip_grad_norm": 1.0}
    assert supervised.model.head.stop_grad is False
    assert len(supervised.history) == SUPERVISED["epochs"] and all(np.isfinite(supervised.history))
    supervised_auroc = auroc(supervised.predict(paths).scores, labels)
    unsupervised_auroc = auroc(fitted.predict(paths).scores, labels)
    assert supervised_auroc >= IMAGE_AUROC_BAR, (supervised_auroc, unsupervised_auroc)


def test_step_budget_sets_the_epochs_from_the_training_set_size(brick_set, split):
    """steps: the same optimizer-step budget whatever the number of anomalies (epochs = ceil(steps / batches))."""
    options = {**BASE, "epochs": 1, "steps": 12, "batch_size": 8}
    few = SuperSimpleNet(**options).fit(brick_set, anomalies=split[0][:1], progress=False, calibrate=False)
    many = SuperSimpleNet(**options).fit(brick_set, anomalies=split[0], progress=False, calibrate=False)
    n_normal = len(brick_set.select(split="train"))
    # 1 anomaly x 4 flips, repeated to ~n_normal; 4 anomalies x 4 flips, repeated likewise
    sizes = [n_normal + 4 * max(1, round(n_normal / 4)), n_normal + 16 * max(1, round(n_normal / 16))]
    assert [len(few.history), len(many.history)] == [math.ceil(12 / math.ceil(n / 8)) for n in sizes]


def test_anomalies_need_a_supervised_model(brick_set, split):
    with pytest.raises(InputError, match="supersimplenet"):
        detect.create("padim", image_size=SIZE).fit(brick_set, anomalies=split[0], progress=False)


def test_feature_anomalies_use_synth_perlin_masks():
    assert anomaly_generator.perlin_mask is synth.masks.perlin_mask
    assert max_scale_exp(16, 16) == 4 and max_scale_exp(64, 64) == 6 and max_scale_exp(8, 8) == 3
    rng = np.random.default_rng(0)
    masks = perlin_masks(400, 8, 8, rng, threshold=0.2, probability=0.5)
    drawn = masks.flatten(1).amax(dim=1)
    assert 0.4 < float(drawn.mean()) < 0.6  # half of the copies get an anomaly

    features = torch.randn(3, 5, 8, 8)
    gt = torch.zeros(3, 1, 8, 8)
    gt[2, :, :4] = 1.0  # a real defect on the top half of image 2
    labels = torch.tensor([0.0, 0.0, 1.0])
    valid = torch.tensor([True, True, False])
    out, masks, new_labels, new_valid = add_feature_anomalies(
        features, gt, labels, valid, rng=np.random.default_rng(1), generator=torch.Generator().manual_seed(0),
        noise_std=0.5, threshold=0.2, probability=1.0)
    assert out.shape == (6, 5, 8, 8) and masks.shape == (6, 1, 8, 8)
    assert new_valid.tolist() == [True, True, False] * 2
    changed = (out != torch.cat([features, features])).any(dim=1, keepdim=True)
    synthetic = masks.bool() & ~torch.cat([gt, gt]).bool()
    assert torch.equal(changed, synthetic)  # noise exactly inside the Perlin mask, never on the real defect
    assert torch.all(masks[[2, 5], :, :4] == 1)  # the real defect stays in the target
    assert new_labels.tolist() == [1.0] * 6  # probability 1: every copy is anomalous


def test_losses_and_mask_downsampling():
    logits = torch.tensor([-1.0, 0.0, 2.0])
    target = torch.tensor([0.0, 0.0, 1.0])
    # normal: max(0, -1 + .5) = 0, max(0, 0 + .5) = .5 -> mean .25; anomalous: max(0, .5 - 2) = 0.
    assert truncated_l1_loss(logits, target).item() == pytest.approx(0.25)
    # gamma 0 is plain BCE; a confident correct prediction costs ~nothing with gamma 4.
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert focal_loss(logits, target, gamma=0.0).item() == pytest.approx(bce.item())
    assert focal_loss(torch.tensor([8.0]), torch.tensor([1.0])).item() < 1e-12
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :4] = 1.0
    mask[..., 7, 7] = 1.0  # a one-pixel speck vanishes at 1/4 resolution (bilinear, >= 0.5)
    small = downsample_masks(mask, (2, 2))
    assert small.flatten().tolist() == [1.0, 0.0, 0.0, 0.0]


