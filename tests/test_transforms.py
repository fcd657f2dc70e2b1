"""Synthetic anomalies inside albumentations and torchvision-v2 style pipelines."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch
from skimage import data

from synth.augment import AUGMENTERS
from synth.core.errors import InputError
from synth.transforms import SyntheticAnomaly, SyntheticAnomalyV2


@pytest.fixture(scope="module")
def brick() -> np.ndarray:
    gray = data.brick()[:160, :160]
    return np.repeat(gray[:, :, None], 3, axis=2)


@pytest.mark.parametrize("generator", sorted(AUGMENTERS))
def test_inside_compose_with_other_transforms(brick, generator):
    pipeline = A.Compose([
        A.RandomCrop(128, 128),
        SyntheticAnomaly(generator, p=1.0),
        A.HorizontalFlip(p=0.5),
    ], seed=3)
    out = pipeline(image=brick, mask=np.zeros(brick.shape[:2], np.uint8))
    assert out["image"].shape == (128, 128, 3) and out["mask"].shape == (128, 128)
    defect = out["mask"] > 0
    if generator != "cutpaste3way" or defect.any():
        assert defect.any()
    # Undo the geometric part: replay without the anomaly and compare outside the mask.
    plain = A.Compose([A.RandomCrop(128, 128), A.NoOp(), A.HorizontalFlip(p=0.5)], seed=3)
    reference = plain(image=brick)["image"]
    assert (out["image"][~defect] == reference[~defect]).all()
    if defect.any():
        assert (out["image"][defect] != reference[defect]).any()


def test_seeded_compose_is_reproducible_and_existing_masks_are_kept(brick):
    def run():
        pipeline = A.Compose([SyntheticAnomaly("draem", p=1.0)], seed=7)
        mask = np.zeros(brick.shape[:2], np.uint8)
        mask[:5, :5] = 1  # a real label already present
        return pipeline(image=brick, mask=mask)

    first, second = run(), run()
    assert (first["image"] == second["image"]).all() and (first["mask"] == second["mask"]).all()
    assert first["mask"][:5, :5].all()
    assert first["mask"].max() == 1  # keeps the caller's 0/1 convention


def test_probability_zero_is_identity(brick):
    out = A.Compose([SyntheticAnomaly("cutpaste", p=0.0)], seed=0)(image=brick, mask=np.zeros((160, 160), np.uint8))
    assert (out["image"] == brick).all() and not out["mask"].any()


def test_grayscale_input_stays_grayscale(brick):
    gray = brick[:, :, 0]
    out = A.Compose([SyntheticAnomaly("perlin", p=1.0)], seed=1)(image=gray, mask=np.zeros(gray.shape, np.uint8))
    assert out["image"].shape == gray.shape and out["mask"].any()


def test_torchvision_v2_style(brick):
    from torchvision.transforms import v2

    image = torch.from_numpy(brick).permute(2, 0, 1).contiguous()
    transform = v2.Compose([SyntheticAnomalyV2("cutpaste", p=1.0, seed=0)])
    out, mask = transform(image)
    assert out.shape == image.shape and out.dtype == torch.uint8 and mask.dtype == torch.bool and mask.any()
    assert torch.equal(out[:, ~mask], image[:, ~mask])
    floats = image.float() / 255
    out_f, mask_f = SyntheticAnomalyV2("scar", p=1.0, seed=0)(floats, torch.zeros(160, 160))
    assert out_f.is_floating_point() and 0 <= out_f.min() and out_f.max() <= 1 and mask_f.any()
    a = SyntheticAnomalyV2("perlin", p=1.0, seed=5)(image)[0]
    b = SyntheticAnomalyV2("perlin", p=1.0, seed=5)(image)[0]
    assert torch.equal(a, b)
    with pytest.raises(InputError, match="C = 1 or 3"):
        SyntheticAnomalyV2("perlin")(torch.zeros(5, 8, 8))
    with pytest.raises(InputError, match="unknown generator"):
        SyntheticAnomalyV2("nope")
