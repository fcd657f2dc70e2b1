"""Tests for synth.augment: DRAEM, CutPaste, CutPaste-Scar, CutPaste 3-way on real textures."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from skimage import data

from synth.augment import (
    AUGMENTERS,
    DRAEM_OPS,
    PHOTOMETRIC_OPS,
    CutPaste,
    CutPaste3Way,
    CutPasteScar,
    DraemAugmenter,
    PerlinBlend,
    blend_anomaly,
)
from synth.core.errors import InputError
from synth.generators import GeneratedDefect


def _brick(size: tuple[int, int] = (192, 192)) -> np.ndarray:
    gray = data.brick()[: size[0], : size[1]]
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


def _astronaut(size: tuple[int, int] = (144, 176)) -> np.ndarray:
    return np.ascontiguousarray(data.astronaut()[40 : 40 + size[0], 150 : 150 + size[1]])


IMAGES = {"brick": _brick(), "astronaut": _astronaut()}

# One factory per augmenter configuration under test (fresh instance per test).
FACTORIES = {
    "draem-self": lambda: DraemAugmenter(p_anomaly=1.0),
    "draem-arrays": lambda: DraemAugmenter(
        anomaly_source=[_astronaut((100, 120)), _brick((64, 64))], p_anomaly=1.0
    ),
    "cutpaste": CutPaste,
    "scar": CutPasteScar,
    "cutpaste3way": CutPaste3Way,
    "perlin-noise": PerlinBlend,
    "perlin-shade": lambda: PerlinBlend(source="shade"),
}


def _check_result(result: GeneratedDefect, image: np.ndarray) -> None:
    assert isinstance(result, GeneratedDefect)
    assert result.image.dtype == np.uint8 and result.image.shape == image.shape
    assert result.mask.dtype == np.bool_ and result.mask.shape == image.shape[:2]
    # Changes are confined to the mask: outside it the output is byte-identical to the input.
    assert np.array_equal(result.image[~result.mask], image[~result.mask])
    assert result.has_anomaly == bool(result.mask.any())
    if result.has_anomaly:
        assert (result.image[result.mask] != image[result.mask]).any(), (
            "anomaly left the masked pixels unchanged"
        )
    else:
        assert result.label == "normal" and np.array_equal(result.image, image)
    json.dumps(result.params)  # params must be JSON-serialisable as-is


# --- all augmenters


@pytest.mark.parametrize("image_name", sorted(IMAGES))
@pytest.mark.parametrize("factory", sorted(FACTORIES))
def test_changes_only_inside_mask(factory, image_name):
    image = IMAGES[image_name]
    before = image.copy()
    aug = FACTORIES[factory]()
    for seed in range(12):
        result = aug(image, np.random.default_rng(seed))
        _check_result(result, image)
        assert result.image is not image
    assert np.array_equal(image, before), "the input image was modified"


@pytest.mark.parametrize("factory", sorted(FACTORIES))
def test_same_seed_same_output_different_seed_differs(factory):
    image = IMAGES["astronaut"]
    a = FACTORIES[factory]()(image, np.random.default_rng(7))
    b = FACTORIES[factory]()(image, np.random.default_rng(7))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert json.dumps(a.params) == json.dumps(b.params)
    others = [FACTORIES[factory]()(image, np.random.default_rng(s)) for s in (8, 9, 10)]
    assert any(not np.array_equal(a.image, o.image) for o in others)


def test_registry_and_names():
    assert set(AUGMENTERS) == {"perlin", "draem", "cutpaste", "scar", "cutpaste3way"}
    for key, cls in AUGMENTERS.items():
        assert cls.name == key


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((32, 32), dtype=np.uint8),  # grayscale HxW
        np.zeros((32, 32, 1), dtype=np.uint8),  # HxWx1
        np.zeros((32, 32, 4), dtype=np.uint8),  # RGBA
        np.zeros((32, 32, 3), dtype=np.float32),  # float
        np.zeros((0, 32, 3), dtype=np.uint8),  # empty
        [[1, 2, 3]],  # not an array
    ],
)
@pytest.mark.parametrize("factory", sorted(FACTORIES))
def test_bad_image_raises_input_error_with_fix(factory, bad):
    with pytest.raises(InputError, match=r"read_image\(\.\.\., mode='RGB'\)"):
        FACTORIES[factory]()(bad, np.random.default_rng(0))


def test_rng_must_be_generator():
    with pytest.raises(InputError, match="default_rng"):
        CutPaste()(IMAGES["brick"], 0)  # type: ignore[arg-type]


# --- DRAEM


def test_draem_blend_formula_uses_draem_beta():
    # Black image, constant grey texture, no ops: inside the mask out = (1 - beta) * 200.
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    source = np.full((64, 64, 3), 200, dtype=np.uint8)
    aug = DraemAugmenter(anomaly_source=[source], p_anomaly=1.0, num_ops=0)
    for seed in range(10):
        result = aug(image, np.random.default_rng(seed))
        beta = result.params["beta"]
        assert 0.0 <= beta <= 0.8
        assert result.params["source_opacity"] == pytest.approx(1 - beta)
        inside = result.image[result.mask]
        assert np.all(np.abs(inside.astype(int) - round(200 * (1 - beta))) <= 1)


def test_draem_params_describe_the_sample():
    aug = DraemAugmenter(anomaly_source=[_astronaut((50, 60)), _brick((70, 40))], p_anomaly=1.0)
    result = aug(IMAGES["brick"], np.random.default_rng(3))
    p = result.params
    assert p["label"] == "draem" and p["augmenter"] == "draem" and p["has_anomaly"] is True
    assert p["source_kind"] == "arrays" and p["source_index"] in (0, 1)
    assert len(p["ops"]) == 3 and len({op["name"] for op in p["ops"]}) == 3  # without replacement
    assert all(op["name"] in DRAEM_OPS for op in p["ops"])
    assert p["mask_params"]["threshold"] == 0.5
    assert p["mask_params"]["area_fraction"] == pytest.approx(result.mask.mean())


def test_draem_p_anomaly():
    image = IMAGES["astronaut"]
    never = DraemAugmenter(p_anomaly=0.0)
    for seed in range(5):
        result = never(image, np.random.default_rng(seed))
        _check_result(result, image)
        assert not result.has_anomaly and result.params["label"] == "normal"
    assert DraemAugmenter().p_anomaly == 0.5  # DRAEM's training default
    labels = {DraemAugmenter()(image, np.random.default_rng(s)).label for s in range(20)}
    assert labels == {"normal", "draem"}


def test_draem_folder_source(tmp_path):
    folder = tmp_path / "dtd" / "images"
    (folder / "banded").mkdir(parents=True)
    (folder / "dotted").mkdir(parents=True)
    cv2.imwrite(str(folder / "banded" / "a.png"), _astronaut((90, 70)))
    cv2.imwrite(str(folder / "banded" / "b.jpg"), _brick((120, 100)))
    cv2.imwrite(str(folder / "dotted" / "c.png"), _astronaut((64, 64))[::-1])
    (folder / "notes.txt").write_text("not an image")
    aug = DraemAugmenter(anomaly_source=folder, p_anomaly=1.0)
    assert aug.num_sources == 3
    image = IMAGES["brick"]
    seen = set()
    for seed in range(10):
        result = aug(image, np.random.default_rng(seed))
        _check_result(result, image)
        assert result.params["source_kind"] == "folder"
        seen.add(result.params["source_path"])
    assert len(seen) >= 2
    # A second instance (empty cache) reproduces the same sample.
    again = DraemAugmenter(anomaly_source=str(folder), p_anomaly=1.0)(image, np.random.default_rng(9))
    assert np.array_equal(again.image, result.image)


def test_draem_folder_errors(tmp_path):
    with pytest.raises(InputError, match="contains no images"):
        DraemAugmenter(anomaly_source=tmp_path)
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(InputError, match="contains no images"):
        DraemAugmenter(anomaly_source=tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        DraemAugmenter(anomaly_source=tmp_path / "missing")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    aug = DraemAugmenter(anomaly_source=tmp_path, p_anomaly=1.0)
    with pytest.raises(InputError, match="broken.png"):
        aug(IMAGES["brick"], np.random.default_rng(0))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"anomaly_source": []}, "empty list"),
        ({"anomaly_source": [np.zeros((8, 8), dtype=np.uint8)]}, r"anomaly_source\[0\]"),
        ({"anomaly_source": [np.zeros((8, 8, 3), dtype=np.float64)]}, "uint8"),
        ({"anomaly_source": np.zeros((8, 8, 3), dtype=np.uint8)}, "wrap it"),
        ({"p_anomaly": 1.5}, "p_anomaly"),
        ({"beta_range": (0.9, 0.1)}, "beta_range"),
        ({"ops": ("gamma_contrast", "blur")}, "unknown photometric op"),
        ({"num_ops": 11}, "num_ops"),
    ],
)
def test_draem_bad_config(kwargs, match):
    with pytest.raises(InputError, match=match):
        DraemAugmenter(**kwargs)


@pytest.mark.parametrize("name", sorted(PHOTOMETRIC_OPS))
def test_photometric_ops(name):
    image = IMAGES["astronaut"]
    op = PHOTOMETRIC_OPS[name]
    out, params = op(image, np.random.default_rng(1))
    again, _ = op(image, np.random.default_rng(1))
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert np.array_equal(out, again)
    assert params["name"] == name
    json.dumps(params)
    changed = [not np.array_equal(op(image, np.random.default_rng(s))[0], image) for s in range(6)]
    assert any(changed), f"{name} never changed the image"


def test_blend_anomaly_validates_sizes():
    image = IMAGES["brick"]
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[10:20, 10:20] = True
    out = blend_anomaly(image, 255 - image, mask, 1.0)
    assert np.array_equal(out[mask], 255 - image[mask]) and np.array_equal(out[~mask], image[~mask])
    with pytest.raises(InputError, match="mask must be a bool array of the image size"):
        blend_anomaly(image, image, mask[:-1], 0.5)
    with pytest.raises(InputError, match="mask must be a bool array"):
        blend_anomaly(image, image, mask.astype(np.uint8), 0.5)
    with pytest.raises(InputError, match="source shape"):
        blend_anomaly(image, image[:-1], mask, 0.5)


# --- CutPaste


def test_cutpaste_area_and_aspect_bounds():
    image = IMAGES["brick"]
    h, w = image.shape[:2]
    aug = CutPaste()
    aspects = []
    for seed in range(60):
        result = aug(image, np.random.default_rng(seed))
        ph, pw = result.params["patch_size"]
        # The mask is exactly the pasted rectangle.
        assert result.mask.sum() == ph * pw
        ys, xs = np.nonzero(result.mask)
        assert ys.max() - ys.min() + 1 == ph and xs.max() - xs.min() + 1 == pw
        # Area ratio in [0.02, 0.15] up to rounding each side to whole pixels.
        slack = (ph + pw + 1) / (h * w)
        assert 0.02 - slack <= result.mask.mean() <= 0.15 + slack
        assert 0.3 <= result.params["aspect_ratio"] <= 3.3
        aspects.append(result.params["aspect_ratio"])
        assert result.label == "cutpaste"
    assert min(aspects) < 0.7 and max(aspects) > 1.5  # both tall and wide patches occur


def test_cutpaste_colour_jitter_defaults_and_bounds():
    aug = CutPaste()
    assert (aug.brightness, aug.contrast, aug.saturation, aug.hue) == (0.1, 0.1, 0.1, 0.1)
    jitter = aug(IMAGES["astronaut"], np.random.default_rng(0)).params["jitter"]
    for key in ("brightness", "contrast", "saturation"):
        assert 0.9 <= jitter[key] <= 1.1
    assert -0.1 <= jitter["hue"] <= 0.1
    assert sorted(jitter["order"]) == ["brightness", "contrast", "hue", "saturation"]
    with pytest.raises(InputError):
        CutPaste(area_ratio=(0.2, 0.1))
    with pytest.raises(InputError):
        CutPaste(hue=0.7)


def test_scar_is_thin_rotated_and_scaled():
    aug = CutPasteScar()
    for image in (IMAGES["brick"], IMAGES["astronaut"]):
        scale = min(image.shape[:2]) / 256
        for seed in range(30):
            result = aug(image, np.random.default_rng(seed))
            ph, pw = result.params["patch_size"]
            assert round(2 * scale) <= pw <= round(16 * scale) + 1
            assert round(10 * scale) <= ph <= round(25 * scale) + 1
            assert -45 <= result.params["angle"] <= 45
            # Nearest-neighbour rotation keeps the area close to the patch's; the mask is one piece.
            assert abs(int(result.mask.sum()) - ph * pw) <= 0.35 * ph * pw + 4
            assert cv2.connectedComponents(result.mask.astype(np.uint8))[0] == 2
    # reference_size scales the paper's pixel ranges with the image size.
    big = np.ascontiguousarray(np.tile(IMAGES["brick"], (3, 3, 1))[:512, :512])
    sizes = [CutPasteScar()(big, np.random.default_rng(s)).params["patch_size"][0] for s in range(20)]
    assert max(sizes) > 25 and min(sizes) >= 20
    fixed = [
        CutPasteScar(reference_size=None)(big, np.random.default_rng(s)).params["patch_size"][0]
        for s in range(20)
    ]
    assert 10 <= min(fixed) and max(fixed) <= 25


def test_cutpaste3way_labels():
    image = IMAGES["astronaut"]
    aug = CutPaste3Way()
    labels = {}
    for seed in range(45):
        result = aug(image, np.random.default_rng(seed))
        _check_result(result, image)
        assert result.params["augmenter"] == "cutpaste3way"
        labels[result.label] = result.params["class_index"]
    assert labels == {"normal": 0, "cutpaste": 1, "scar": 2}
    with pytest.raises(InputError):
        CutPaste3Way(probabilities=(0.5, 0.5, 0.5))
    only_scar = CutPaste3Way(probabilities=(0.0, 0.0, 1.0))
    assert {only_scar(image, np.random.default_rng(s)).label for s in range(5)} == {"scar"}


def test_params_are_plain_json_types():
    image = IMAGES["brick"]
    for factory in FACTORIES.values():
        params = factory()(image, np.random.default_rng(4)).params
        decoded = json.loads(json.dumps(params, allow_nan=False))  # strict JSON: no NaN / inf
        assert decoded == params  # no numpy scalars / tuples hiding in the params


def test_perlin_blend_sources_and_params():
    image = IMAGES["brick"]
    noise = PerlinBlend()(image, np.random.default_rng(0))
    assert noise.has_anomaly and noise.params["source"] == "noise"
    changed = (noise.image != image).any(axis=2)
    assert not changed[~noise.mask].any() and changed[noise.mask].mean() > 0.3
    shade = PerlinBlend(source="shade", shade_range=(0.3, 0.3), beta_range=(0.0, 0.0))(image, np.random.default_rng(0))
    inside = shade.image[shade.mask].astype(float).mean()
    assert inside == pytest.approx(0.3 * image[shade.mask].astype(float).mean(), rel=0.05)
    with pytest.raises(InputError, match="source"):
        PerlinBlend(source="dtd")
