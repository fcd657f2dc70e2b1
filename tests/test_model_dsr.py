"""DSR (dual subspace re-projection): three training stages on brick crops, quantizer and anomaly sampler units.
Round trip, same seed, CLI and config errors: test_detector_contract.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import detect
import synth.masks
from detect.data import resize_mask
from detect.metrics import auroc
from detect.models.reconstruction.dsr import Dsr
from detect.models.reconstruction.dsr import detector as dsr_detector
from detect.models.reconstruction.dsr.torch_model import (
    NEAREST_EXCLUDED,
    VectorQuantizer,
    focal_loss,
    replace_with_distant_codes,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 64
# Narrow CPU-test networks (defaults are wider); batch 2 gives 7 optimiser steps per epoch on the 13 crops.
TINY = {"image_size": SIZE, "seed": 0, "batch_size": 2, "embedding_dim": 16, "num_embeddings": 64,
        "num_hiddens": 32, "num_residual_hiddens": 16, "segmentation_width": 8}
# CPU-sized recipe (about 30 s of training on one thread): 40 + 20 + 20 epochs (280 + 140 + 140 steps); every
# stage-0 image carries a synth DRAEM anomaly (vq_augment 1, paper: ImageNet pre-training), every stage-1/2
# image a simulated one (p_anomaly 1, paper 0.5) and feature anomalies draw from all but the nearest 5 % of
# the codebook (anomaly_strength 1, paper U(0.2, 1)): the paper's 100 epochs x 1000 steps are out of reach, so
# each step carries the most visible training anomalies.
CONFIG = {**TINY, "vq_epochs": 40, "vq_lr": 2e-3, "vq_augment": 1.0, "epochs": 20, "lr": 1e-3,
          "upsampling_epochs": 20, "upsampling_lr": 2e-3, "p_anomaly": 1.0, "anomaly_strength": 1.0}
# Measured with CONFIG on brick_set, one torch thread (seeds 0 / 1 / 2):
#   anomaly-map pixel AUROC on the planted defects         0.831 / 0.854 / 0.848
#   detection module, held-out synthetic feature anomalies  0.637 / 0.621 / 0.685 (pixel AUROC vs. their masks)
#   image AUROC (not asserted here: it swings with the seed) 0.641 / 0.789 / 0.781
#   losses first -> last epoch: VQ-VAE 0.22 -> 0.004, object branch 2.3-3.1 -> 0.26-0.27, upsampling 0.07-0.10
#   -> 0.04. At this budget the object-specific reconstruction is still close to the mean training image (the
#   subspace restriction modules have not learnt the layouts yet), so the detection module's image score is
#   noisy; the upsampling module, trained on image-space anomalies with exact masks, already localises.
MAP_PIXEL_AUROC_BAR = 0.75
SYNTHETIC_PIXEL_AUROC_BAR = 0.58
VQ_LOSS_FACTOR = 0.1
OBJECT_LOSS_FACTOR = 0.3
# Slow learning test (about 3 minutes of CPU): wider networks, 150 + 150 + 20 epochs at batch size 4.
LEARNING_CONFIG = {"image_size": SIZE, "seed": 0, "batch_size": 4, "embedding_dim": 32, "num_embeddings": 128,
                   "num_hiddens": 32, "num_residual_hiddens": 16, "segmentation_width": 16, "vq_epochs": 150,
                   "vq_lr": 2e-3, "epochs": 150, "lr": 1e-3, "upsampling_epochs": 20, "upsampling_lr": 1e-3}
# Measured with LEARNING_CONFIG on brick_set: seed 0 image AUROC 0.906, pixel AUROC 0.866; seed 1: 0.648 / 0.771;
# seed 2: 0.914 / 0.908 (the detection module's progress at this budget still depends on the seed).
IMAGE_AUROC_BAR = 0.8
PIXEL_AUROC_BAR = 0.75


@pytest.fixture(scope="module")
def fitted(brick_set):
    return Dsr(**CONFIG).fit(brick_set, progress=False)


@pytest.fixture(scope="module")
def prediction(fitted, test_split):
    return fitted.predict(test_split[0])


# ----- units ----------------------------------------------------------------------------------------------------
def test_quantizer_nearest_entry_and_straight_through_gradient():
    generator = torch.Generator().manual_seed(0)
    quantizer = VectorQuantizer(num_embeddings=8, dim=3)
    quantizer.codebook.copy_(torch.randn(8, 3, generator=generator))
    features = torch.randn(2, 3, 4, 5, generator=generator, requires_grad=True)
    quantized, indices = quantizer(features)
    flat = features.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    expected = torch.cdist(flat, quantizer.codebook).argmin(dim=1)
    assert torch.equal(indices.flatten(), expected)
    torch.testing.assert_close(quantized.detach().permute(0, 2, 3, 1).reshape(-1, 3), quantizer.codebook[expected])
    # Straight-through: d(sum(w * q))/d(features) = w, as if quantisation were the identity.
    weights = torch.randn(quantized.shape, generator=generator)
    (quantized * weights).sum().backward()
    torch.testing.assert_close(features.grad, weights)


def test_quantizer_ema_moves_entries_to_their_features():
    quantizer = VectorQuantizer(num_embeddings=2, dim=1, decay=0.5, epsilon=0.0)
    quantizer.codebook.copy_(torch.tensor([[0.0], [10.0]]))
    quantizer.ema_sum.copy_(quantizer.codebook)
    quantizer.ema_size.fill_(1.0)
    features = torch.tensor([1.0, 2.0, 9.0]).view(3, 1, 1, 1)
    quantizer.ema_update(features, quantizer(features)[1])
    # entry 0: sum 0.5 * 0 + 0.5 * 3, count 0.5 * 1 + 0.5 * 2 -> 1.5 / 1.5 = 1; entry 1: (5 + 4.5) / 1 = 9.5
    torch.testing.assert_close(quantizer.codebook, torch.tensor([[1.0], [9.5]]))


def test_distant_code_sampler_changes_only_masked_positions():
    generator = torch.Generator().manual_seed(0)
    k, d = 40, 4
    codebook = torch.randn(k, d, generator=generator)
    features = torch.randn(3, d, 6, 6, generator=generator)
    quantized = VectorQuantizer(k, d)
    quantized.codebook.copy_(codebook)
    q, _ = quantized(features)
    mask = torch.rand(3, 1, 6, 6, generator=generator) < 0.4
    strength = torch.tensor([0.2, 0.6, 1.0])
    out = replace_with_distant_codes(features, q, codebook, mask, strength, generator)
    inside = mask.expand_as(q)
    assert torch.equal(out[~inside], q[~inside])
    # Every masked vector is a codebook entry whose distance rank lies in [5 % K, strength * K].
    flat_out = out.permute(0, 2, 3, 1).reshape(-1, d)
    flat_features = features.permute(0, 2, 3, 1).reshape(-1, d)
    ranks = torch.cdist(flat_features, codebook).argsort(dim=1, stable=True)
    entry = torch.cdist(flat_out, codebook).argmin(dim=1)
    torch.testing.assert_close(flat_out, codebook[entry])
    rank_of_entry = (ranks == entry.unsqueeze(1)).float().argmax(dim=1).view(3, 36)
    flat_mask = mask.view(3, 36)
    for i, s in enumerate(strength.tolist()):
        chosen = rank_of_entry[i][flat_mask[i]]
        assert chosen.numel() > 0
        assert chosen.min() >= int(NEAREST_EXCLUDED * k) and chosen.max() <= int(s * k)
    assert (rank_of_entry[flat_mask] > 0).all()  # never the original (nearest) entry


def test_focal_loss_values():
    logits = torch.zeros(1, 2, 2, 2)
    target = torch.tensor([[[0, 1], [1, 0]]])
    # p_t = 0.5 everywhere: (1 - 0.5)^2 * ln 2
    assert focal_loss(logits, target).item() == pytest.approx(0.25 * np.log(2.0))
    sign = 2 * target - 1
    confident = torch.stack([-10 * sign, 10 * sign], dim=1).float()
    assert focal_loss(confident, target).item() < 1e-8


def test_perlin_masks_come_from_synth():
    assert dsr_detector.perlin_mask is synth.masks.perlin_mask
    detector = Dsr(**TINY, p_anomaly=1.0)
    masks = detector._perlin_masks(3, np.random.default_rng(1))
    rng = np.random.default_rng(1)
    for mask in masks:
        rng.random()  # the p_anomaly draw
        np.testing.assert_array_equal(mask[0].numpy() > 0, synth.masks.perlin_mask((SIZE, SIZE), rng))


# ----- the fitted model ---------------------------------------------------------------------------------------
def test_registered_and_stages_trained(fitted):
    assert "dsr" in detect.list_models("reconstruction")
    assert len(fitted.vq_history) == CONFIG["vq_epochs"]
    assert len(fitted.history) == CONFIG["epochs"]
    assert len(fitted.upsampling_history) == CONFIG["upsampling_epochs"]
    assert not any(p.requires_grad for p in fitted.model.parameters())
    state = fitted.model.state_dict()
    assert "vq.quantizer_lo.codebook" in state and "vq.quantizer_hi.codebook" in state
    assert not any("ema" in key for key in state)  # EMA state is training-only


def test_training_losses_decrease(fitted):
    for history in (fitted.vq_history, fitted.history, fitted.upsampling_history):
        assert all(np.isfinite(history))
    assert fitted.vq_history[-1] < VQ_LOSS_FACTOR * fitted.vq_history[0]
    assert fitted.history[-1] < OBJECT_LOSS_FACTOR * fitted.history[0]
    assert fitted.upsampling_history[-1] < fitted.upsampling_history[0]


def test_learns_anomaly_maps_on_planted_defects(prediction, test_split):
    """The anomaly maps localise real (planted) spots and scratches the model never saw: pixel AUROC >= 0.75,
    0.25 above chance."""
    assert auroc(prediction.anomaly_maps, test_split[2]) >= MAP_PIXEL_AUROC_BAR


def test_detection_module_segments_held_out_feature_anomalies(fitted, brick_set):
    """What stage 1 trains the anomaly detection module to do, on images it never saw: fresh feature-space
    anomalies (the training simulation, new synth Perlin masks and codebook draws) in the test split's normals
    are segmented from the object-specific and general reconstructions (pixel AUROC 0.08 above chance)."""
    good = [brick_set.image_path(s) for s in brick_set.select(split="test") if not s.is_anomalous]
    images = fitted.load_tensor(good * 3)
    rng = np.random.default_rng(123)
    masks = np.stack([synth.masks.perlin_mask((SIZE, SIZE), rng) for _ in range(len(images))])
    sim = fitted.simulate_feature_anomalies(images, torch.from_numpy(masks[:, None].astype(np.float32)),
                                            torch.Generator().manual_seed(123))
    with torch.no_grad():
        _, _, specific = fitted.model.object_specific(sim["lo_in"], sim["hi_in"])
        probability = torch.softmax(fitted.model.segment(specific, sim["general"]), dim=1)[:, 1]
    target = sim["target"][:, 0] > 0
    assert target.any() and not target.all()
    assert auroc(probability.numpy(), target.numpy()) >= SYNTHETIC_PIXEL_AUROC_BAR


def test_prediction_schema(prediction, test_split):
    paths = test_split[0]
    assert prediction.scores.shape == (len(paths),)
    assert prediction.anomaly_maps.shape == (len(paths), SIZE, SIZE)
    assert ((prediction.anomaly_maps >= 0) & (prediction.anomaly_maps <= 1)).all()
    assert prediction.labels is not None  # calibrated


def test_score_kernel_scales_with_image_size():
    assert Dsr(image_size=256).model.score_kernel == 21  # the paper's 21 px at 256 px
    assert Dsr(image_size=64).model.score_kernel == 5
    assert Dsr(image_size=64, score_kernel=3).model.score_kernel == 3


@pytest.mark.slow
def test_learns_image_auroc(brick_set, test_split):
    """DSR needs many optimiser steps before its anomaly detection module separates the two reconstructions;
    the fast fixture above (about 10 s of training) only shows that every stage learns its own loss."""
    paths, labels, _ = test_split
    masks = np.stack([resize_mask(brick_set.load_mask(s), SIZE) if s.is_anomalous else np.zeros((SIZE, SIZE), bool)
                      for s in brick_set.select(split="test")])
    model = Dsr(**LEARNING_CONFIG).fit(brick_set, progress=False)
    prediction = model.predict(paths)
    assert auroc(prediction.scores, labels) >= IMAGE_AUROC_BAR
    assert auroc(prediction.anomaly_maps, masks) >= PIXEL_AUROC_BAR
