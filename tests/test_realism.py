"""Realism metrics (KID, IC-LPIPS-style) on real scikit-image texture crops (brick, grass, gravel), 64 px."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines import realism
from pipelines.realism import (
    crop_to_defect,
    embed_images,
    ic_lpips,
    kid,
    lpips_style_distances,
    lpips_style_features,
    mmd2_unbiased,
    polynomial_kernel,
    realism_metrics,
)
from synth.core.errors import ConfigError, InputError
from synth.toyset import load_texture, random_crop

SIZE = 64
IMAGE_SIZE = 64  # backbone input side: the crops' own size, for speed (the stride-32 stage is 2x2)


def crops(texture: str, n: int, seed: int) -> list[np.ndarray]:
    """``n`` random 64x64 RGB crops of a real skimage texture photo."""
    rng = np.random.default_rng(seed)
    photo = load_texture(texture)
    return [random_crop(photo, SIZE, rng) for _ in range(n)]


def patched(base: list[np.ndarray], texture: str | None, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Crops with a 14-20 px square defect at a random place: a patch of another real texture, or a flat grey
    fill when ``texture`` is None (a defect without texture). Returns (images, masks)."""
    rng = np.random.default_rng(seed)
    photo = None if texture is None else load_texture(texture)
    images, masks = [], []
    for image in base:
        side = int(rng.integers(14, 21))
        top, left = (int(v) for v in rng.integers(0, SIZE - side, size=2))
        out = image.copy()
        out[top:top + side, left:left + side] = int(rng.integers(60, 200)) if photo is None else random_crop(
            photo, side, rng)
        mask = np.zeros((SIZE, SIZE), dtype=bool)
        mask[top:top + side, left:left + side] = True
        images.append(out)
        masks.append(mask)
    return images, masks


@pytest.fixture(scope="module")
def embeddings() -> dict[str, np.ndarray]:
    """Pooled Lite0 features: a pool of 48 brick crops, 16 gravel and 16 grass crops."""
    sets = {
        "brick": crops("brick", 48, seed=1), "gravel": crops("gravel", 16, seed=2), "grass": crops("grass", 16, seed=3)
    }
    return {name: embed_images(images, image_size=IMAGE_SIZE) for name, images in sets.items()}


# --------------------------------------------------------------------------------------------------
# KID
# --------------------------------------------------------------------------------------------------

def test_kid_ranks_same_texture_far_below_other_textures(embeddings):
    brick_a, brick_b = embeddings["brick"][:16], embeddings["brick"][16:32]
    same = kid(brick_a, brick_b, subsets=50, subset_size=12)["kid_mean"]
    gravel = kid(brick_a, embeddings["gravel"], subsets=50, subset_size=12)["kid_mean"]
    grass = kid(brick_a, embeddings["grass"], subsets=50, subset_size=12)["kid_mean"]
    # Margin: another texture is at least 10x farther than other brick crops (and than an absolute 0.01).
    assert gravel > 10 * max(same, 0.01), (same, gravel)
    assert grass > 10 * max(same, 0.01), (same, grass)


def test_kid_of_a_set_against_itself_is_near_zero(embeddings):
    brick = embeddings["brick"][:16]
    self_kid = kid(brick, brick, subsets=50, subset_size=16)
    other = kid(brick, embeddings["gravel"], subsets=50, subset_size=16)["kid_mean"]
    # X against itself is not two independent samples: what remains is the estimator's diagonal correction,
    # 2 * (O / (m (m-1)) - (T + O) / m^2) with T, O the diagonal and off-diagonal kernel sums, i.e. O(1/m).
    kxx = polynomial_kernel(brick, brick)
    m, trace = len(brick), np.trace(kxx)
    off = kxx.sum() - trace
    assert self_kid["kid_mean"] == pytest.approx(2 * (off / (m * (m - 1)) - (trace + off) / m**2), rel=1e-9)
    # Margin: under 10 % of another texture's KID at the same subset size, and shrinking with the set size.
    assert abs(self_kid["kid_mean"]) < 0.1 * other, (self_kid, other)
    pool = embeddings["brick"]
    assert abs(kid(pool, pool, subsets=5)["kid_mean"]) < 0.5 * abs(self_kid["kid_mean"])
    assert self_kid["kid_std"] == pytest.approx(0.0, abs=1e-9)  # every subset is the whole set
    assert self_kid["kid_subset_size"] == 16


def test_kid_is_unbiased_for_disjoint_samples_of_one_pool(embeddings):
    """Random 24/24 splits of the brick pool: the unbiased mean stays near 0, the biased (V-statistic) one not."""
    pool = embeddings["brick"]
    rng = np.random.default_rng(0)
    unbiased, biased = [], []
    for _ in range(30):
        order = rng.permutation(len(pool))
        x, y = pool[order[:24]], pool[order[24:]]
        unbiased.append(mmd2_unbiased(x, y))
        kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
        biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    unbiased, biased = np.array(unbiased), np.array(biased)
    sem = unbiased.std(ddof=1) / np.sqrt(len(unbiased))
    assert abs(unbiased.mean()) < 3 * sem + 1e-4, (unbiased.mean(), sem)
    # The biased estimate is clearly positive for the same splits: the test above could fail.
    assert biased.mean() > abs(unbiased.mean()) + 10 * sem, (biased.mean(), unbiased.mean(), sem)


def test_mmd2_matches_the_double_sum_definition(embeddings):
    x, y = embeddings["brick"][:5], embeddings["gravel"][:5]
    d = x.shape[1]

    def k(a, b):
        return (float(a @ b) / d + 1.0) ** 3

    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    assert mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-9)


def test_kid_cached_and_per_subset_paths_agree_and_seed_decides(embeddings, monkeypatch):
    a, b = embeddings["brick"][:20], embeddings["gravel"]
    cached = kid(a, b, subsets=10, subset_size=8, seed=3)
    monkeypatch.setattr(realism, "_KID_CACHE_MAX", 0)
    direct = kid(a, b, subsets=10, subset_size=8, seed=3)
    assert direct["kid_mean"] == pytest.approx(cached["kid_mean"], rel=1e-10)
    assert direct["kid_std"] == pytest.approx(cached["kid_std"], rel=1e-9)
    assert kid(a, b, subsets=10, subset_size=8, seed=3) == direct
    assert kid(a, b, subsets=10, subset_size=8, seed=4)["kid_mean"] != direct["kid_mean"]
    assert cached["kid_subset_size"] == 8 and cached["kid_subsets"] == 10
    assert kid(a, b, subset_size=1000)["kid_subset_size"] == 16  # clipped to the smaller set


def test_kid_input_errors(embeddings):
    a = embeddings["brick"]
    with pytest.raises(InputError, match="at least 2"):
        kid(a[:1], a)
    with pytest.raises(InputError, match="dimensions differ"):
        kid(a, a[:, :100])
    with pytest.raises(ConfigError, match="kid_subset_size"):
        kid(a, a, subset_size=1)
    with pytest.raises(ConfigError, match="kid_subsets"):
        kid(a, a, subsets=0)


# --------------------------------------------------------------------------------------------------
# LPIPS-style distance and IC-LPIPS
# --------------------------------------------------------------------------------------------------

def test_lpips_style_distance_is_zero_on_self_symmetric_and_texture_aware():
    brick, gravel = crops("brick", 6, seed=5), crops("gravel", 6, seed=6)
    fb = lpips_style_features(brick, image_size=IMAGE_SIZE)
    fg = lpips_style_features(gravel, image_size=IMAGE_SIZE)
    assert len(fb) == len(realism.LPIPS_STAGES)
    dbb = lpips_style_distances(fb, fb)
    assert np.abs(np.diag(dbb)).max() < 1e-5
    np.testing.assert_allclose(dbb, dbb.T, atol=1e-5)
    assert dbb.max() <= 4.0
    off_diag = dbb[~np.eye(len(brick), dtype=bool)].mean()
    # Margin: brick-to-gravel at least 1.2x brick-to-brick.
    assert lpips_style_distances(fb, fg).mean() > 1.2 * off_diag


def test_ic_lpips_copies_score_zero_and_diverse_crops_score_clearly_higher():
    real = crops("brick", 4, seed=7)
    copies = [real[0].copy() for _ in range(12)]
    diverse = crops("brick", 12, seed=8)
    common = {"image_size": IMAGE_SIZE, "kid_subsets": 10}
    on_copies = realism_metrics(real, copies, **common)
    on_diverse = realism_metrics(real, diverse, **common)
    assert on_copies["ic_lpips"] < 1e-6
    assert on_copies["ic_lpips_clusters"] == 1 and on_copies["ic_lpips_cluster_sizes"] == [12, 0, 0, 0]
    assert on_copies["lpips_to_nearest_real"] < 1e-4  # copies of a real image sit on it
    # Margin: diverse real crops of the same texture are far from 0 (typical 0.3-0.6 on this scale).
    assert on_diverse["ic_lpips"] > 0.1, on_diverse
    assert on_diverse["ic_lpips_clusters"] >= 1
    assert sum(on_diverse["ic_lpips_cluster_sizes"]) == 12
    for result in (on_copies, on_diverse):
        json.dumps(result, allow_nan=False)  # JSON-safe
        assert result["n_real"] == 4 and result["n_generated"] == 12
        assert result["backbone"] == "tf_efficientnet_lite0" and result["crop_to_mask"] is False


def test_ic_lpips_pair_cap_and_singletons():
    real = crops("brick", 2, seed=9)
    fr = lpips_style_features(real, image_size=IMAGE_SIZE)
    fg = lpips_style_features(crops("brick", 10, seed=10), image_size=IMAGE_SIZE)
    capped = ic_lpips(fr, fg, max_pairs=3, seed=0)
    assert capped["ic_lpips_pairs"] <= 3 * capped["ic_lpips_clusters"]
    assert capped == ic_lpips(fr, fg, max_pairs=3, seed=0)
    full = ic_lpips(fr, fg, max_pairs=1000)
    sizes = full["ic_lpips_cluster_sizes"]
    assert full["ic_lpips_pairs"] == sum(s * (s - 1) // 2 for s in sizes)
    # Two generated images, each a copy of a different real image: no cluster has a pair.
    alone = ic_lpips(fr, [f.copy() for f in fr])
    assert alone["ic_lpips"] is None and alone["ic_lpips_clusters"] == 0
    with pytest.raises(InputError, match="at least 2 generated"):
        ic_lpips(fr, [f[:1] for f in fr])


# --------------------------------------------------------------------------------------------------
# Defect crops, determinism, input errors
# --------------------------------------------------------------------------------------------------

def test_crop_to_defect_geometry():
    image = np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:20, 30:34] = True  # 10 x 4 box
    crop = crop_to_defect(image, mask, margin=0.5, min_size=4)
    assert crop.shape[:2] == (20, 20)  # longer side 10 grown by 2 x 0.5 x 10, square
    np.testing.assert_array_equal(crop, image[5:25, 22:42])
    assert crop_to_defect(image, mask, margin=0.0, min_size=16).shape[:2] == (16, 16)
    corner = np.zeros((64, 64), dtype=bool)
    corner[0:3, 60:64] = True
    assert crop_to_defect(image, corner, margin=1.0, min_size=16).shape[:2] == (16, 16)  # shifted inside
    assert crop_to_defect(image, np.zeros((64, 64), bool)) is image
    assert crop_to_defect(image, None) is image
    assert crop_to_defect(image, mask, margin=10.0).shape[:2] == (64, 64)  # clipped to the image


def test_crop_to_mask_measures_the_defect_not_the_background():
    """Real: brick with gravel-patch defects. Generator A pastes the right defect (gravel) on the wrong background
    (grass); generator B keeps the brick background but its defects are flat grey fills. Whole images rank A as
    the worse set (background dominates); defect crops rank B worse, which is what matters for defect data."""
    real, masks_real = patched(crops("brick", 12, seed=11), "gravel", seed=12)
    a, masks_a = patched(crops("grass", 12, seed=13), "gravel", seed=14)
    b, masks_b = patched(crops("brick", 12, seed=13), None, seed=14)
    common = {"image_size": IMAGE_SIZE, "kid_subsets": 10, "ic_lpips_max_pairs": 10, "crop_margin": 0.0}

    def kid_of(images, masks, crop):
        result = realism_metrics(real, images, masks_real=masks_real, masks_generated=masks, crop_to_mask=crop,
                                 **common)
        assert result["crop_to_mask"] is crop
        return result["kid_mean"]

    # Margins: each ranking holds by a factor of 3 (measured: whole 32.3 vs 6.0, crops 10.8 vs -1.0).
    assert kid_of(a, masks_a, False) > 3 * kid_of(b, masks_b, False)
    assert kid_of(b, masks_b, True) > 3 * max(kid_of(a, masks_a, True), 0.1)
    # crop_to_mask defaults to on when both mask lists are given.
    assert realism_metrics(real[:3], b[:3], masks_real=masks_real[:3], masks_generated=masks_b[:3],
                           image_size=IMAGE_SIZE, kid_subsets=2)["crop_to_mask"] is True


def test_realism_metrics_is_deterministic_and_seeded():
    real, generated = crops("brick", 10, seed=15), crops("gravel", 10, seed=16)
    common = {"image_size": IMAGE_SIZE, "kid_subsets": 10, "kid_subset_size": 5, "ic_lpips_max_pairs": 5}
    first = realism_metrics(real, generated, seed=1, **common)
    assert realism_metrics(real, generated, seed=1, **common) == first
    assert realism_metrics(real, generated, seed=2, **common)["kid_mean"] != first["kid_mean"]


def test_realism_metrics_reads_paths_and_explains_bad_input(tmp_path):
    from synth.core.io import write_image

    real = crops("brick", 3, seed=17)
    paths = []
    for k, image in enumerate(real):
        paths.append(tmp_path / f"r{k}.png")
        write_image(paths[-1], image)
    common = {"image_size": IMAGE_SIZE, "kid_subsets": 2}
    # PNG is lossless: paths and the arrays they hold give the same numbers.
    assert realism_metrics(paths, real, **common) == realism_metrics(real, real, **common)

    with pytest.raises(InputError, match="at least 2 real images.*got 0"):
        realism_metrics([], real, **common)
    with pytest.raises(InputError, match="at least 2 generated images.*got 1"):
        realism_metrics(real, real[:1], **common)
    with pytest.raises(InputError, match="file not found"):
        realism_metrics([tmp_path / "missing.png", *paths], real, **common)
    masks = [np.ones((SIZE, SIZE), bool)] * 3
    with pytest.raises(InputError, match="real images only"):
        realism_metrics(real, real, masks_real=masks, **common)
    with pytest.raises(InputError, match="masks_generated has 2 entries"):
        realism_metrics(real, real, masks_real=masks, masks_generated=masks[:2], **common)
    with pytest.raises(InputError, match="mask shape"):
        realism_metrics(real, real, masks_real=masks, masks_generated=[np.ones((8, 8), bool)] * 3, **common)
    with pytest.raises(InputError, match="needs masks_real and masks_generated"):
        realism_metrics(real, real, crop_to_mask=True, **common)
    with pytest.raises(ConfigError, match="image_size"):
        realism_metrics(real, real, image_size=8)
