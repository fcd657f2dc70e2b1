"""Tests for synth.placement: mask-guided placement of deformed real defect masks on normal images.

Normal images are crops of real photos (skimage's brick and gravel textures, coffee for colour);
exemplar defects are cv2-drawn masks (ellipse = blowhole, thick line = crack) whose defect image is a
texture darkened to 45% inside the mask.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from skimage import data

from synth.core.errors import InputError
from synth.placement import (
    DefectExemplar,
    MaskGuidedPlacer,
    PlacementError,
    blend,
    deform_exemplar,
    deform_mask,
    deform_mask_and_patch,
    estimate_foreground,
    fit_to_shape,
    place_mask,
    resolve_foreground_kind,
)

FEATHER = 3
# Mean absolute change (grey levels) a rendered defect must reach inside its mask: a 45% darkening of
# these textures is ~60 levels, so 15 separates "a visible defect" from "nothing happened".
MIN_INSIDE_CHANGE = 15.0


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.dstack([gray] * 3))


@pytest.fixture(scope="module")
def brick() -> np.ndarray:
    return _rgb(data.brick()[200:456, 100:400])  # 256x300 normal texture


@pytest.fixture(scope="module")
def gravel() -> np.ndarray:
    return _rgb(data.gravel()[:128, :160])


def _ellipse_mask(shape: tuple[int, int] = (128, 160)) -> np.ndarray:
    canvas = np.zeros(shape, np.uint8)
    cv2.ellipse(canvas, (80, 64), (30, 14), 25, 0, 360, 1, -1)
    return canvas.astype(bool)


def _line_mask(shape: tuple[int, int] = (128, 160)) -> np.ndarray:
    canvas = np.zeros(shape, np.uint8)
    cv2.line(canvas, (20, 30), (140, 100), 1, 3)
    return canvas.astype(bool)


def _defect_image(texture: np.ndarray, mask: np.ndarray, factor: float = 0.45) -> np.ndarray:
    out = texture.copy()
    out[mask] = np.clip(out[mask] * factor, 0, 255).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def exemplars(gravel: np.ndarray) -> list[DefectExemplar]:
    ellipse, line = _ellipse_mask(), _line_mask()
    return [
        DefectExemplar(ellipse, _defect_image(gravel, ellipse), "blowhole", "blowhole_01.png"),
        DefectExemplar(line, _defect_image(gravel, line), "crack", "crack_01.png"),
    ]


def _outside(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels farther than `radius` (square neighbourhood) from the mask."""
    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    return ~cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def _tight(mask: np.ndarray) -> tuple[slice, slice]:
    ys, xs = np.nonzero(mask)
    return slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)


# ------------------------------------------------------------------------------------------ deform


@pytest.mark.parametrize("make_mask", [_ellipse_mask, _line_mask])
def test_deformed_masks_non_empty_tight_and_deterministic(make_mask) -> None:
    mask = make_mask()
    shapes = set()
    for seed in range(20):
        out = deform_mask(mask, np.random.default_rng(seed))
        assert out.dtype == np.bool_ and out.ndim == 2 and out.any()
        # tight crop: every border row/column touches the defect
        assert out[0].any() and out[-1].any() and out[:, 0].any() and out[:, -1].any()
        assert np.array_equal(out, deform_mask(mask, np.random.default_rng(seed)))
        shapes.add(out.shape)
    assert len(shapes) > 10  # the seeds really produce different deformations


def test_patch_gets_the_same_warp_as_the_mask(gravel: np.ndarray) -> None:
    mask = _ellipse_mask()
    for seed in range(5):
        alone = deform_mask(mask, np.random.default_rng(seed), p_elastic=1.0)
        warped, patch = deform_mask_and_patch(
            mask, _defect_image(gravel, mask), np.random.default_rng(seed), p_elastic=1.0
        )
        assert np.array_equal(alone, warped)
        assert patch.shape == warped.shape + (3,) and patch.dtype == np.uint8
        # A patch that *is* the mask must come out as the warped mask.
        _, mask_as_patch = deform_mask_and_patch(
            mask, _rgb(mask.astype(np.uint8) * 255), np.random.default_rng(seed), p_elastic=1.0
        )
        assert ((mask_as_patch[..., 0] > 127) == warped).mean() > 0.99


def test_identity_deformation_returns_the_crop(gravel: np.ndarray) -> None:
    mask = _ellipse_mask()
    image = _defect_image(gravel, mask)
    out_mask, out_patch = deform_mask_and_patch(
        mask, image, np.random.default_rng(0), scale=(1, 1), rotation=(0, 0), flip=False, p_elastic=0.0
    )
    assert np.array_equal(out_mask, mask[_tight(mask)])
    assert np.array_equal(out_patch, image[_tight(mask)])


def test_deformation_that_empties_the_mask_falls_back_to_the_crop() -> None:
    # A hollow ring shrunk to ~1 px samples only its empty centre, so every draw is empty.
    ring = np.zeros((64, 64), np.uint8)
    cv2.circle(ring, (32, 32), 20, 1, 2)
    result = deform_exemplar(ring.astype(bool), np.random.default_rng(0), scale=(0.01, 0.02), p_elastic=0.0)
    assert result.params.fallback
    assert np.array_equal(result.mask, ring.astype(bool)[_tight(ring > 0)])


def test_context_keeps_a_false_margin_around_the_defect(gravel: np.ndarray) -> None:
    mask = _ellipse_mask()
    result = deform_exemplar(mask, np.random.default_rng(1), patches=(gravel,), context=6)
    inner = result.mask[6:-6, 6:-6]
    assert not result.mask[:6].any() and not result.mask[-6:].any()
    assert inner[0].any() and inner[-1].any() and inner[:, 0].any() and inner[:, -1].any()
    assert result.patches[0].shape == result.mask.shape + (3,)


def test_deform_rejects_bad_masks() -> None:
    with pytest.raises(InputError, match="empty"):
        deform_mask(np.zeros((10, 10), bool), np.random.default_rng(0))
    with pytest.raises(InputError, match="bool"):
        deform_mask(np.ones((10, 10), np.uint8), np.random.default_rng(0))


# -------------------------------------------------------------------------------------- foreground


def _object_on_uniform_background() -> tuple[np.ndarray, np.ndarray]:
    """Coffee-photo content inside an ellipse on a light grey, slightly noisy background."""
    image = np.full((240, 320, 3), (205, 205, 198), np.uint8)
    obj = np.zeros((240, 320), np.uint8)
    cv2.ellipse(obj, (160, 120), (95, 65), 20, 0, 360, 1, -1)
    obj = obj.astype(bool)
    image[obj] = data.coffee()[80:320, 140:460][obj]
    noise = np.random.default_rng(0).normal(0, 3, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8), obj


def test_foreground_of_object_on_uniform_background() -> None:
    image, obj = _object_on_uniform_background()
    assert resolve_foreground_kind(image) == "object"
    fg = estimate_foreground(image)  # auto
    assert (fg & obj).sum() / obj.sum() >= 0.95  # covers the object
    assert (fg & ~obj).sum() / (~obj).sum() <= 0.05  # and not the background


def test_foreground_of_texture_is_whole_image(brick: np.ndarray) -> None:
    assert resolve_foreground_kind(brick) == "texture"
    assert estimate_foreground(brick).all()
    assert estimate_foreground(brick, kind="texture").all()


def test_foreground_is_never_empty() -> None:
    flat = np.full((50, 60, 3), 128, np.uint8)
    assert estimate_foreground(flat, kind="object").all()
    coffee = data.coffee()
    fg = estimate_foreground(coffee, kind="object")
    assert fg.shape == coffee.shape[:2] and fg.dtype == np.bool_ and fg.any()


# --------------------------------------------------------------------------------------- placement


def test_placement_lies_inside_foreground_and_is_deterministic() -> None:
    image, _ = _object_on_uniform_background()
    fg = estimate_foreground(image)
    crop = _ellipse_mask()[_tight(_ellipse_mask())]
    for seed in range(10):
        full, (top, left) = place_mask(crop, image.shape, fg, np.random.default_rng(seed), min_inside=0.95)
        assert full.shape == fg.shape and full.sum() == crop.sum()
        assert np.array_equal(full[top : top + crop.shape[0], left : left + crop.shape[1]], crop)
        assert (full & fg).sum() / full.sum() >= 0.95
        again, pos = place_mask(crop, image.shape, fg, np.random.default_rng(seed), min_inside=0.95)
        assert pos == (top, left) and np.array_equal(full, again)


def test_placement_exhaustive_search_finds_a_small_foreground() -> None:
    fg = np.zeros((200, 200), bool)
    fg[150:170, 20:60] = True  # 2% of the image: random probes almost surely miss it
    crop = np.ones((15, 30), bool)
    full, _ = place_mask(crop, fg.shape, fg, np.random.default_rng(0), max_tries=3, min_inside=1.0)
    assert (full & fg).sum() == crop.sum()


def test_oversized_mask_is_shrunk_to_fit() -> None:
    crop = np.ones((300, 120), bool)
    full, (top, left) = place_mask(crop, (100, 200), np.ones((100, 200), bool), np.random.default_rng(0))
    assert full.any() and full.shape == (100, 200)
    mask, _, factor = fit_to_shape(crop, (100, 200))
    assert mask.shape[0] <= 100 and factor == pytest.approx(1 / 3)


def test_impossible_placement_raises_catchable_error() -> None:
    fg = np.zeros((100, 100), bool)
    fg[:10, :10] = True
    with pytest.raises(PlacementError, match="foreground") as info:
        place_mask(np.ones((40, 40), bool), fg.shape, fg, np.random.default_rng(0))
    assert isinstance(info.value, InputError)
    with pytest.raises(InputError, match="target_shape"):
        place_mask(np.ones((4, 4), bool), (50, 50), np.ones((40, 40), bool), np.random.default_rng(0))


# ------------------------------------------------------------------------------------------ blend


def _placed_defect(normal: np.ndarray, gravel: np.ndarray, top_left: tuple[int, int], context: int = 8):
    """Deformed real defect (mask + patch with context) placed at top_left on `normal`."""
    mask = _ellipse_mask()
    result = deform_exemplar(
        mask, np.random.default_rng(7), patches=(_defect_image(gravel, mask),), context=context
    )
    tight = result.mask[context:-context, context:-context]
    full = np.zeros(normal.shape[:2], bool)
    top, left = top_left
    full[top : top + tight.shape[0], left : left + tight.shape[1]] = tight
    return full, result.patches[0], (top - context, left - context)


@pytest.mark.parametrize("mode", ["alpha", "texture", "poisson"])
@pytest.mark.parametrize("where", ["middle", "corner"])
def test_blend_changes_only_the_feathered_mask(mode: str, where: str, brick, gravel) -> None:
    top_left = (100, 120) if where == "middle" else (0, 0)  # corner: mask touches the image border
    full, patch, offset = _placed_defect(brick, gravel, top_left)
    image, mask = blend(
        brick,
        full,
        mode=mode,
        rng=np.random.default_rng(0),
        source_patch=patch,
        patch_offset=offset,
        feather=FEATHER,
        alpha_polarity="dark",
    )
    assert image.dtype == np.uint8 and image.shape == brick.shape and np.array_equal(mask, full)
    outside = _outside(full, FEATHER)
    assert np.array_equal(image[outside], brick[outside])
    ys, xs = _tight(full)  # poisson promise from the brief: nothing changes outside the padded bbox
    pad = 6
    box = np.zeros(full.shape, bool)
    box[max(0, ys.start - pad) : ys.stop + pad, max(0, xs.start - pad) : xs.stop + pad] = True
    assert np.array_equal(image[~box], brick[~box])
    change = np.abs(image.astype(np.int16) - brick)[full].mean()
    assert change > MIN_INSIDE_CHANGE


@pytest.mark.parametrize("mode", ["alpha", "texture", "poisson", "paint"])
@pytest.mark.parametrize("top_left", [(100, 120), (0, 0), (150, 200)])
def test_blend_on_a_window_matches_the_whole_image(mode: str, top_left, brick, gravel) -> None:
    """blend works on a window around the mask for speed; its bytes equal the whole-image computation."""
    from synth.placement import _CLONE_FLAGS, _blend_window

    full, patch, offset = _placed_defect(brick, gravel, top_left)
    with_patch = mode != "paint"
    kwargs = {"feather": FEATHER, "alpha_strength": (0.3, 0.6), "alpha_polarity": "random", "texture_gain": 1.0}
    windowed, _ = blend(brick, full, mode="alpha" if mode == "paint" else mode, rng=np.random.default_rng(3),
                        source_patch=patch if with_patch else None, patch_offset=offset if with_patch else None,
                        clone_mode="mixed", **kwargs)
    whole = _blend_window(brick, full, mode="alpha" if mode == "paint" else mode, rng=np.random.default_rng(3),
                          source_patch=patch if with_patch else None, source_background=None,
                          offset=offset if with_patch else (0, 0), clone_flag=_CLONE_FLAGS["mixed"], **kwargs)
    assert np.array_equal(windowed, whole)


def test_synthetic_alpha_paint_without_patch(brick) -> None:
    full = np.zeros(brick.shape[:2], bool)
    full[40:168, 60:220] = _ellipse_mask()
    for polarity, sign in [("dark", -1), ("bright", 1)]:
        image, _ = blend(brick, full, mode="alpha", rng=np.random.default_rng(1), alpha_polarity=polarity)
        delta = (image.astype(np.int16) - brick)[full].mean()
        assert sign * delta > MIN_INSIDE_CHANGE
        assert np.array_equal(image[_outside(full, FEATHER)], brick[_outside(full, FEATHER)])


def test_poisson_mixed_clone_runs_and_stays_local(brick, gravel) -> None:
    full, patch, offset = _placed_defect(brick, gravel, (150, 200))
    image, _ = blend(
        brick,
        full,
        mode="poisson",
        rng=np.random.default_rng(0),
        source_patch=patch,
        patch_offset=offset,
        clone_mode="mixed",
    )
    assert np.array_equal(image[_outside(full, FEATHER)], brick[_outside(full, FEATHER)])
    assert not np.array_equal(image[full], brick[full])


@pytest.mark.parametrize("factor, sign", [(0.45, -1), (1.8, 1)])
def test_texture_mode_keeps_the_defect_polarity(factor: float, sign: int, brick, gravel) -> None:
    mask = _ellipse_mask()
    defect = _defect_image(gravel, mask, factor)
    exemplar_dev = (defect.astype(np.int16) - gravel)[mask].mean()
    assert np.sign(exemplar_dev) == sign
    placer = MaskGuidedPlacer([DefectExemplar(mask, defect, "blowhole", "b.png")], blend_mode="texture")
    for seed in range(3):
        result = placer(brick, np.random.default_rng(seed))
        placed_dev = (result.image.astype(np.int16) - brick)[result.mask].mean()
        assert sign * placed_dev > 10.0  # dark stays dark, bright stays bright


@pytest.mark.parametrize("mode", ["poisson", "texture"])
def test_patch_modes_need_the_defect_images(mode: str, brick) -> None:
    full = np.zeros(brick.shape[:2], bool)
    full[10:20, 10:20] = True
    with pytest.raises(InputError, match="--defects DIR"):
        blend(brick, full, mode=mode, rng=np.random.default_rng(0))
    with pytest.raises(InputError, match="--defects DIR"):
        MaskGuidedPlacer([DefectExemplar(_ellipse_mask(), None, "crack", "m.png")], blend_mode=mode)


# ------------------------------------------------------------------------------------------ placer


def test_exemplar_validation_names_the_source(gravel) -> None:
    with pytest.raises(InputError, match="empty_mask.png"):
        MaskGuidedPlacer([DefectExemplar(np.zeros((32, 32), bool), None, "crack", "empty_mask.png")])
    with pytest.raises(InputError, match=r"crack_07\.png.*128x160.*100x90"):
        MaskGuidedPlacer([DefectExemplar(_ellipse_mask(), gravel[:100, :90], "crack", "crack_07.png")])


@pytest.mark.parametrize("mode", ["alpha", "texture", "poisson"])
def test_placer_results_are_labeled_serialisable_and_reproducible(mode: str, exemplars, brick) -> None:
    placer = MaskGuidedPlacer(exemplars, blend_mode=mode)
    for seed in range(3):
        result = placer(brick, np.random.default_rng(seed))  # normal is 256x300, exemplars 128x160
        again = placer(brick, np.random.default_rng(seed))
        assert np.array_equal(result.image, again.image) and np.array_equal(result.mask, again.mask)
        assert result.mask.shape == brick.shape[:2] and result.mask.any()
        assert result.defect_class == exemplars[result.params["exemplar_index"]].defect_class
        params = json.loads(json.dumps(result.params))
        assert params == result.params
        for key in ("exemplar_index", "source", "scale", "rotation", "flip_h", "elastic", "top", "left"):
            assert key in params
        assert params["blend_mode"] == mode and params["foreground_kind"] == "texture"
        outside = _outside(result.mask, FEATHER)
        assert np.array_equal(result.image[outside], brick[outside])


@pytest.mark.parametrize("mode", ["alpha", "texture", "poisson"])
def test_placer_shrinks_defects_for_small_normal_images(mode: str, exemplars, gravel) -> None:
    small = np.ascontiguousarray(gravel[:40, :50])  # smaller than the 120-px crack exemplar
    placer = MaskGuidedPlacer(exemplars[1:], blend_mode=mode)
    result = placer(small, np.random.default_rng(0))
    assert result.params["fit_factor"] < 1.0 and result.mask.any()
    assert np.array_equal(result.image[_outside(result.mask, FEATHER)], small[_outside(result.mask, FEATHER)])
    assert np.abs(result.image.astype(np.int16) - small)[result.mask].mean() > MIN_INSIDE_CHANGE


def test_placer_keeps_defects_on_the_object() -> None:
    image, obj = _object_on_uniform_background()
    exemplar = DefectExemplar(_ellipse_mask(), None, "blowhole", "b.png")
    placer = MaskGuidedPlacer([exemplar], foreground="auto", min_inside=0.95)
    for seed in range(5):
        result = placer(image, np.random.default_rng(seed))
        assert result.params["foreground_kind"] == "object"
        assert (result.mask & obj).sum() / result.mask.sum() >= 0.9  # 0.95 of the *estimated* object


def test_class_balanced_selection(exemplars) -> None:
    many = exemplars[:1] * 3 + exemplars[1:]  # 3 blowholes, 1 crack
    rng = np.random.default_rng(0)
    uniform_placer, class_placer = MaskGuidedPlacer(many), MaskGuidedPlacer(many, balance="class")
    uniform = [uniform_placer.choose_exemplar(rng) for _ in range(400)]
    balanced = [class_placer.choose_exemplar(rng) for _ in range(400)]
    assert 0.15 < np.mean(np.array(uniform) == 3) < 0.35
    assert 0.4 < np.mean(np.array(balanced) == 3) < 0.6
