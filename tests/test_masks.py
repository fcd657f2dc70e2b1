"""Tests for synth.masks: Perlin noise correctness, DRAEM Perlin masks and the shape masks."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from synth.core.errors import InputError
from synth.masks import (
    MASK_GENERATORS,
    blob_mask,
    fractal_perlin_noise,
    perlin_mask,
    perlin_mask_with_params,
    perlin_noise,
    scratch_mask,
)

SHAPES = [(256, 256), (97, 131), (8, 300)]


def _reference_perlin(shape: tuple[int, int], scale: tuple[int, int], angles: np.ndarray) -> np.ndarray:
    """Textbook per-pixel Perlin noise (slow loops, float64) with DRAEM's conventions."""
    h, w = shape
    gx, gy = np.cos(angles), np.sin(angles)
    out = np.zeros(shape)

    def fade(t: float) -> float:
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    for i in range(h):
        t0 = i * scale[0] / h
        c0, u = int(math.floor(t0)), t0 - math.floor(t0)
        for j in range(w):
            t1 = j * scale[1] / w
            c1, v = int(math.floor(t1)), t1 - math.floor(t1)
            n = {}
            for a in (0, 1):
                for b in (0, 1):
                    n[a, b] = gx[c0 + a, c1 + b] * (u - a) + gy[c0 + a, c1 + b] * (v - b)
            fu, fv = fade(u), fade(v)
            lo = n[0, 0] + fu * (n[1, 0] - n[0, 0])
            hi = n[0, 1] + fu * (n[1, 1] - n[0, 1])
            out[i, j] = math.sqrt(2) * (lo + fv * (hi - lo))
    return out


# --- noise


@pytest.mark.parametrize(("shape", "scale"), [((16, 24), (2, 3)), ((20, 14), (3, 5)), ((32, 32), (4, 1))])
def test_perlin_noise_matches_per_pixel_reference(shape, scale):
    # Same seed -> same gradient angles (drawn first, as float32 in [0, 2pi)), so the vectorised
    # separable-matmul version must reproduce the textbook loop, including non-divisible shapes.
    noise = perlin_noise(shape, scale, np.random.default_rng(3))
    angles = np.random.default_rng(3).random((scale[0] + 1, scale[1] + 1), dtype=np.float32)
    ref = _reference_perlin(shape, scale, angles.astype(np.float64) * np.float32(2 * math.pi))
    assert noise.dtype == np.float32 and noise.shape == shape
    np.testing.assert_allclose(noise, ref, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_perlin_noise_shape_range_and_lattice_zeros(shape):
    noise = perlin_noise(shape, (4, 8), np.random.default_rng(0))
    assert noise.shape == shape and noise.dtype == np.float32
    assert np.abs(noise).max() <= 1.0 + 1e-5  # sqrt(2)-normalised 2-D Perlin noise is bounded by 1
    assert noise.std() > 0.05
    if shape == (256, 256):  # lattice points every 64 rows / 32 columns: gradient noise is 0 there
        np.testing.assert_allclose(noise[::64, ::32], 0.0, atol=1e-6)


def test_fractal_noise_first_octave_is_plain_perlin():
    shape = (64, 96)
    one = fractal_perlin_noise(shape, (2, 3), 1, 0.5, np.random.default_rng(5))
    plain = perlin_noise(shape, (2, 3), np.random.default_rng(5))
    np.testing.assert_array_equal(one, plain)
    four = fractal_perlin_noise(shape, (2, 3), 4, 0.5, np.random.default_rng(5))
    assert four.shape == shape and four.dtype == np.float32
    # Higher octaves add fine detail: the high-frequency energy (pixel differences) grows.
    assert np.abs(np.diff(four, axis=1)).mean() > np.abs(np.diff(one, axis=1)).mean()


# --- DRAEM mask


@pytest.mark.parametrize("shape", SHAPES)
def test_perlin_mask_non_empty_bool(shape):
    for seed in range(25):
        mask = perlin_mask(shape, np.random.default_rng(seed))
        assert mask.dtype == np.bool_ and mask.shape == shape
        assert mask.any()


def test_perlin_mask_params_follow_draem():
    rng = np.random.default_rng(0)
    exps, angles = set(), []
    for _ in range(200):
        mask, params = perlin_mask_with_params((64, 64), rng)
        exps.update(params["scale_exp"])
        assert params["scale"] == [2**e for e in params["scale_exp"]]
        angles.append(params["angle"])
        assert params["area_fraction"] == pytest.approx(mask.mean())
    assert exps == {0, 1, 2, 3, 4, 5}  # 2**randint(0, 6): exclusive upper bound like DRAEM
    assert -90 <= min(angles) < -45 and 45 < max(angles) <= 90


def test_higher_threshold_gives_smaller_masks():
    coverage = {}
    for thr in (0.3, 0.5, 0.7):
        coverage[thr] = np.mean(
            [perlin_mask((128, 128), np.random.default_rng(s), threshold=thr).mean() for s in range(40)]
        )
    assert coverage[0.3] > coverage[0.5] > coverage[0.7] > 0


def test_finer_scale_gives_more_fragmented_masks():
    def mean_components(exp: int) -> float:
        counts = []
        for s in range(20):
            mask = perlin_mask((128, 128), np.random.default_rng(s), min_scale_exp=exp, max_scale_exp=exp + 1)
            counts.append(cv2.connectedComponents(mask.astype(np.uint8))[0] - 1)
        return float(np.mean(counts))

    assert mean_components(5) > 3 * mean_components(1)


def test_rotate_false_and_min_area_fraction():
    for s in range(20):
        mask, params = perlin_mask_with_params(
            (64, 80), np.random.default_rng(s), rotate=False, min_area_fraction=0.05
        )
        assert params["angle"] == 0.0
        assert mask.mean() >= 0.05


def test_perlin_mask_bounded_retries_still_non_empty():
    # Noise never exceeds 1, so threshold 2 can never be met: the fallback keeps the top pixels.
    mask, params = perlin_mask_with_params((32, 32), np.random.default_rng(0), threshold=2.0, max_tries=3)
    assert params["fallback"] is True and params["tries"] == 3
    assert mask.any()


# --- all generators


@pytest.mark.parametrize("name", sorted(MASK_GENERATORS))
def test_generators_non_empty_bool_any_size(name):
    gen = MASK_GENERATORS[name]
    for shape in [(256, 256), (61, 203), (5, 7), (1, 1)]:
        for seed in range(10):
            mask = gen(shape, np.random.default_rng(seed))
            assert mask.dtype == np.bool_ and mask.shape == shape
            assert mask.any(), (name, shape, seed)


@pytest.mark.parametrize("name", sorted(MASK_GENERATORS))
def test_generators_deterministic(name):
    gen = MASK_GENERATORS[name]
    a = gen((96, 128), np.random.default_rng(11))
    b = gen((96, 128), np.random.default_rng(11))
    assert np.array_equal(a, b)
    others = [gen((96, 128), np.random.default_rng(s)) for s in (12, 13, 14)]
    assert any(not np.array_equal(a, o) for o in others)


def test_registry_names():
    assert set(MASK_GENERATORS) == {"perlin", "ellipse", "scratch", "blob"}


def test_scratch_width_controls_thickness():
    thin = np.mean(
        [scratch_mask((128, 128), np.random.default_rng(s), width_range=(1, 1)).mean() for s in range(20)]
    )
    thick = np.mean(
        [scratch_mask((128, 128), np.random.default_rng(s), width_range=(6, 6)).mean() for s in range(20)]
    )
    assert thick > 2.5 * thin
    # thin scratches stay a small fraction of the image
    assert thin < 0.03


def test_blob_is_single_compact_region():
    for s in range(10):
        mask = blob_mask((128, 128), np.random.default_rng(s))
        n_components = cv2.connectedComponents(mask.astype(np.uint8))[0] - 1
        assert n_components == 1


@pytest.mark.parametrize(
    "call",
    [
        lambda: perlin_mask((0, 10), np.random.default_rng(0)),
        lambda: perlin_mask((10, 10, 3), np.random.default_rng(0)),
        lambda: perlin_mask((10, 10), 0),
        lambda: perlin_mask((10, 10), np.random.default_rng(0), min_scale_exp=3, max_scale_exp=3),
        lambda: perlin_noise((10, 10), (0, 2), np.random.default_rng(0)),
        lambda: perlin_noise((10, 10), (2.5, 2), np.random.default_rng(0)),
        lambda: fractal_perlin_noise((10, 10), (2, 2), 0, 0.5, np.random.default_rng(0)),
        lambda: scratch_mask((10, 10), np.random.default_rng(0), width_range=(3, 1)),
        lambda: blob_mask((10, 10), np.random.default_rng(0), irregularity=1.5),
    ],
)
def test_bad_arguments_raise_input_error(call):
    with pytest.raises(InputError):
        call()


def test_rng_error_names_the_fix():
    with pytest.raises(InputError, match="default_rng"):
        perlin_mask((10, 10), 42)  # type: ignore[arg-type]
