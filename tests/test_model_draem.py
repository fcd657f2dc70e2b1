"""DRAEM (reconstructive + discriminative sub-networks on synth's DRAEM anomalies): learns on brick crops, also
with real anomalies mixed in. Round trip, same seed, CLI and config errors: test_detector_contract.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import detect
from detect.base import AnomalySamples
from detect.metrics import auroc
from detect.models.reconstruction.draem import Draem
from detect.models.reconstruction.draem.torch_model import (
    DiscriminativeSubNetwork,
    DraemModel,
    ReconstructiveSubNetwork,
    auto_score_window,
    focal_loss,
    ssim,
)
from synth.augment import DraemAugmenter
from synth.core.errors import InputError

SIZE = 64
# CPU-sized: base widths 8 / 16 (paper 128 / 64), batch 4 (4 steps per epoch on the 13 training crops), 20
# epochs at Adam lr 2e-3 (x0.2 after epochs 16 and 18); simulated anomalies use the crop itself as texture.
CONFIG = {"image_size": SIZE, "epochs": 20, "batch_size": 4, "lr": 2e-3, "reconstructive_width": 8,
          "discriminative_width": 16, "seed": 0}
# Measured on brick_set at image_size 64 with CONFIG (one torch thread): image AUROC 0.945 / 1.000 / 0.930 / 1.000
# (seeds 0-3; the misses are scratches, spots score 1.000), pixel AUROC 0.897 (seed 0); total loss 1.20 -> 0.39
# (focal term -> 0.02). With two threads the float sums differ and so does the run; it passes the bars too.
# The bars were measured on one torch thread; with 2 threads (float reduction order) seed 0 ended at pixel AUROC
# 0.71 on this AMD EPYC machine. One thread makes the numbers independent of the core count.
pytestmark = pytest.mark.usefixtures("one_torch_thread")
IMAGE_AUROC_BAR = 0.8
PIXEL_AUROC_BAR = 0.8
LOSS_FACTOR = 0.4
TINY = {"image_size": SIZE, "epochs": 2, "batch_size": 4, "reconstructive_width": 8, "discriminative_width": 8}


@pytest.fixture(scope="module")
def fitted(brick_set):
    return Draem(**CONFIG).fit(brick_set, progress=False)


@pytest.fixture(scope="module")
def prediction(fitted, test_split):
    return fitted.predict(test_split[0])


def test_registered_with_both_sub_networks(fitted):
    assert "draem" in detect.list_models("reconstruction")
    assert Draem.supports_anomalies
    state = fitted.model.state_dict()
    assert any(k.startswith("reconstructive.") for k in state)
    assert any(k.startswith("discriminative.") for k in state)
    assert fitted.model.score_window == 5  # paper's 21 px at 256 px, scaled to 64 px


def test_training_loss_decreases(fitted):
    history = fitted.history
    assert len(history) == CONFIG["epochs"]
    assert all(np.isfinite(history))
    assert history[-1] < LOSS_FACTOR * history[0]
    terms = fitted.loss_terms
    assert len(terms) == CONFIG["epochs"] and set(terms[0]) == {"l2", "ssim", "focal"}
    assert terms[-1]["focal"] < 0.5 * terms[0]["focal"]
    assert terms[-1]["l2"] < 0.2 * terms[0]["l2"]


def test_learns_image_and_pixel_auroc(prediction, test_split):
    paths, labels, masks = test_split
    assert prediction.scores.shape == (len(paths),)
    assert prediction.anomaly_maps.shape == (len(paths), SIZE, SIZE)
    assert prediction.anomaly_maps.min() >= 0 and prediction.anomaly_maps.max() <= 1  # softmax probabilities
    assert auroc(prediction.scores, labels) >= IMAGE_AUROC_BAR
    assert auroc(prediction.anomaly_maps, masks) >= PIXEL_AUROC_BAR
    assert prediction.labels is not None  # calibrated


def test_another_seed_trains_another_model(brick_set):
    # Same seed, same model (fit, CLI, round trip): test_detector_contract.py.
    first, other = (Draem(**{**TINY, "seed": seed}).fit(brick_set, progress=False) for seed in (0, 1))
    assert other.history != first.history


def test_simulated_anomalies_come_from_synth(tmp_path):
    augmenter = Draem(p_anomaly=0.3, beta_range=[0.1, 0.5]).augmenter()
    assert isinstance(augmenter, DraemAugmenter)
    assert augmenter.p_anomaly == 0.3 and augmenter.beta_range == (0.1, 0.5) and augmenter.num_sources == 0
    with pytest.raises(InputError, match="anomaly-source folder"):
        Draem(anomaly_source=str(tmp_path / "missing")).augmenter()


def test_anomaly_source_folder(brick_set, test_split, tmp_path):
    # A texture folder as DRAEM's DTD: here the brick test crops (any images do).
    model = Draem(**{**TINY, "epochs": 1, "anomaly_source": str(brick_set.root / "test" / "good")})
    assert model.augmenter().num_sources == 8
    model.fit(brick_set, progress=False)
    assert np.isfinite(model.history).all()


@pytest.fixture(scope="module")
def anomaly_split(brick_set):
    """4 spots + 4 scratches to train on; the other 8 defects and the 8 test normals to evaluate."""
    anomalous = brick_set.select(split="test", anomalous=True)
    spots = [s for s in anomalous if s.defect_class == "spot"]
    scratches = [s for s in anomalous if s.defect_class == "scratch"]
    train = spots[:4] + scratches[:4]
    held_out = spots[4:] + scratches[4:]
    normal = brick_set.select(split="test", anomalous=False)
    samples = AnomalySamples([brick_set.image_path(s) for s in train], [brick_set.load_mask(s) for s in train])
    paths = [brick_set.image_path(s) for s in normal + held_out]
    labels = np.array([False] * len(normal) + [True] * len(held_out))
    return samples, paths, labels


@pytest.mark.slow  # a second 20-epoch fit (~18 s CPU): over the file's time budget
def test_fit_with_real_anomalies(brick_set, anomaly_split, fitted):
    """Real labeled anomalies mixed into the training batches (real_anomaly_ratio 0.25), evaluated on the defects
    not trained on. Measured (CONFIG, one thread): held-out image AUROC 1.000 (seeds 0 and 1; the unsupervised
    model 1.000 for seed 1), training loss 1.20 -> 0.42."""
    samples, paths, labels = anomaly_split
    model = Draem(**CONFIG).fit(brick_set, anomalies=samples, progress=False)
    assert model.history[-1] < LOSS_FACTOR * model.history[0]
    supervised = auroc(model.predict(paths).scores, labels)
    assert supervised >= 0.9
    assert supervised >= auroc(fitted.predict(paths).scores, labels)


def test_real_anomaly_ratio_one_trains_on_real_anomalies_only(brick_set, anomaly_split):
    # Every batch slot is a real anomaly: no anomaly-free original, so no reconstruction loss at all.
    model = Draem(**{**TINY, "epochs": 1, "real_anomaly_ratio": 1.0}).fit(brick_set, anomalies=anomaly_split[0],
                                                                          progress=False)
    assert model.loss_terms[0]["l2"] == 0 and model.loss_terms[0]["ssim"] == 0 and model.loss_terms[0]["focal"] > 0


def test_anomalies_without_masks_are_refused(brick_set):
    image = brick_set.image_path(brick_set.select(split="test", anomalous=True)[0])
    with pytest.raises(InputError, match="mask"):
        Draem(**TINY).fit(brick_set, anomalies=[(image, None)], progress=False)


def test_ssim_and_focal_loss():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=generator)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-5)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=generator)).clamp(0, 1)
    assert ssim(x, noisy).item() < ssim(x, (x + 0.05 * torch.randn(x.shape, generator=generator)).clamp(0, 1)).item()
    # Uniform prediction: p_t = 0.5 everywhere -> (1 - 0.5)^2 * ln 2; confident and right -> ~0.
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[:, 2:4, 2:4] = True
    assert focal_loss(torch.zeros(2, 2, 8, 8), masks).item() == pytest.approx(0.25 * np.log(2), rel=1e-3)
    confident = torch.stack([(~masks).float(), masks.float()], dim=1) * 20
    assert focal_loss(confident, masks).item() < 1e-6
    assert focal_loss(-confident, masks).item() > 1.0


def test_score_window_and_architecture():
    assert [auto_score_window(s) for s in (256, 224, 128, 64, 32)] == [21, 19, 11, 5, 3]
    model = DraemModel(reconstructive_width=4, discriminative_width=4, score_window=5)
    maps = torch.zeros(1, 64, 64)
    maps[0, 30, 30] = 1.0  # a single hot pixel: the 5x5 mean filter spreads it to 1/25
    assert model.score(maps).item() == pytest.approx(1 / 25)
    # Any input size (not only multiples of 32): decoders upsample to the encoder levels' sizes.
    scores, out = model.eval()(torch.rand(2, 3, 72, 72))
    assert scores.shape == (2,) and out.shape == (2, 72, 72)
    # Paper widths (128 / 64) give the reference code's 97.4 M parameters.
    with torch.device("meta"):
        count = sum(p.numel() for net in (ReconstructiveSubNetwork(128), DiscriminativeSubNetwork(64))
                    for p in net.parameters())
    assert count == 97_422_725


