"""Method paste follows the statistics of the few real exemplars of a class.

- ``position="exemplar"``: where the exemplars sit (and which image border they touch) is reproduced.
- ``orientation="exemplar"``: the exemplars' principal-axis angles are kept (a Gaussian of the class bandwidth).
- ``harmonize=True``: a defect keeps its contrast *relative to its surface* on a brighter/darker part.
- ``normal_match: exemplar``: normal images resembling the exemplars' source images are preferred.
- ``"paste"`` works as an online transform (albumentations and torchvision-v2 style).

Images are crops of skimage's brick and gravel photos; defect masks are cv2-drawn shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from helpers import tree_digest
from skimage import data

from synth.cli import main as synth_main
from synth.context import context_weights, exemplar_descriptor, image_descriptor
from synth.core.defect_set import DefectSetWriter, read_defect_set
from synth.core.errors import InputError
from synth.core.io import write_image
from synth.placement import DefectExemplar, MaskGuidedPlacer, _axial_bandwidth, elongation, principal_axis_angle
from synth.transforms import SyntheticAnomaly, SyntheticAnomalyV2

FEATHER = 3


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.dstack([gray] * 3))


@pytest.fixture(scope="module")
def brick() -> np.ndarray:
    return _rgb(data.brick()[:120, :160])


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    return cv2.dilate(mask.astype(np.uint8), np.ones((2 * radius + 1,) * 2, np.uint8)).astype(bool)


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([(ys.mean() + 0.5) / mask.shape[0], (xs.mean() + 0.5) / mask.shape[1]])


def _box(shape: tuple[int, int], cy: int, x0: int, h: int = 10, w: int = 8) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[cy - h // 2 : cy + h // 2, x0 : x0 + w] = True
    return mask


# ------------------------------------------------------------------------------------------- position


def _placements(placer: MaskGuidedPlacer, image: np.ndarray, n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [placer(image, rng) for _ in range(n)]


@pytest.mark.parametrize("flip", [False, True])
def test_exemplar_position_keeps_defects_on_the_border_they_touch(brick, flip) -> None:
    # Edge chips: every exemplar touches the left border of its 64x80 image, at different heights.
    exemplars = [DefectExemplar(_box((64, 80), cy, 0), None, "chip", f"chip{cy}.png") for cy in (16, 30, 48)]
    kw = {"flip": flip, "foreground": "texture", "p_elastic": 0.0}
    uniform = _placements(MaskGuidedPlacer(exemplars, **kw), brick, 200)
    placed = _placements(MaskGuidedPlacer(exemplars, position="exemplar", **kw), brick, 200)
    left = np.mean([r.mask[:, 0].any() for r in placed])
    right = np.mean([r.mask[:, -1].any() for r in placed])
    uniform_border = np.mean([r.mask[:, 0].any() or r.mask[:, -1].any() for r in uniform])
    assert uniform_border < 0.1  # uniform placement almost never touches a side border
    assert left + right > 0.95
    if flip:  # a horizontal flip mirrors the chip onto the right border, about half the time
        assert 0.3 < left < 0.7
    else:
        assert left > 0.95
    params = placed[0].params
    assert params["position"] == "exemplar" and params["position_fallback"] is False
    assert len(params["target_centroid"]) == 2 and params["target_sides"] in (["left"], ["right"])
    assert json.loads(json.dumps(params)) == params


def test_exemplar_position_reproduces_the_mean_centroid(brick) -> None:
    # Central exemplars at normalised (y, x) ~ (0.30, 0.70), (0.38, 0.62), (0.45, 0.75).
    shape = (100, 120)
    exemplars = [
        DefectExemplar(_box(shape, round(cy * 100), round(cx * 120) - 4), None, "spot", f"s{i}.png")
        for i, (cy, cx) in enumerate([(0.30, 0.70), (0.38, 0.62), (0.45, 0.75)])
    ]
    expected = np.mean([_centroid(ex.mask) for ex in exemplars], axis=0)
    kw = {"flip": False, "foreground": "texture"}
    placed = np.mean([_centroid(r.mask) for r in _placements(MaskGuidedPlacer(exemplars, position="exemplar", **kw),
                                                               brick, 200)], axis=0)
    uniform = np.mean([_centroid(r.mask) for r in _placements(MaskGuidedPlacer(exemplars, **kw), brick, 200)], axis=0)
    assert np.abs(placed - expected).max() < 0.1
    assert np.abs(uniform - expected).max() > 0.1  # the check above is not met by chance


def test_single_exemplar_jitter_is_half_its_extent(brick) -> None:
    mask = _box((100, 100), 50, 40, h=20, w=10)  # extent 0.2 x 0.1 of its image -> std 0.1, 0.05
    placer = MaskGuidedPlacer([DefectExemplar(mask, None, "spot", "s.png")], position="exemplar",
                              foreground="texture", flip=False)
    result = placer(brick, np.random.default_rng(0))
    assert result.params["position_std"] == pytest.approx([0.1, 0.05])


def test_exemplar_position_off_the_object_falls_back_to_uniform() -> None:
    image = np.full((120, 160, 3), 205, np.uint8)
    obj = np.zeros((120, 160), np.uint8)
    cv2.ellipse(obj, (80, 60), (50, 35), 0, 0, 360, 1, -1)
    obj = obj.astype(bool)
    image[obj] = _rgb(data.gravel()[:120, :160])[obj]
    # The exemplar touches the left border of its image: the left border of this image is background.
    placer = MaskGuidedPlacer([DefectExemplar(_box((64, 80), 30, 0), None, "chip", "c.png")], position="exemplar",
                              foreground="object", flip=False)
    for seed in range(3):
        result = placer(image, np.random.default_rng(seed))
        assert result.params["position_fallback"] is True
        assert (result.mask & obj).sum() / result.mask.sum() > 0.9


# ---------------------------------------------------------------------------------------- orientation


def _bar(angle: float, shape: tuple[int, int] = (64, 80)) -> np.ndarray:
    canvas = np.zeros(shape, np.uint8)
    cv2.ellipse(canvas, (40, 32), (24, 4), angle, 0, 360, 1, -1)
    return canvas.astype(bool)


def _axis_from_horizontal(mask: np.ndarray) -> float:
    angle = principal_axis_angle(mask)
    return min(angle, 180.0 - angle)


@pytest.mark.parametrize("flip", [False, True])
def test_exemplar_orientation_keeps_horizontal_defects_horizontal(brick, flip) -> None:
    exemplars = [DefectExemplar(_bar(a), None, "scratch", f"s{a}.png") for a in (-3, 0, 2)]
    kw = {"flip": flip, "foreground": "texture"}
    placed = [_axis_from_horizontal(r.mask)
              for r in _placements(MaskGuidedPlacer(exemplars, orientation="exemplar", **kw), brick, 60)]
    random = [_axis_from_horizontal(r.mask) for r in _placements(MaskGuidedPlacer(exemplars, **kw), brick, 60)]
    assert max(placed) < 10.0 and np.median(placed) < 4.0
    assert np.median(random) > 20.0 and max(random) > 60.0


def test_orientation_bandwidth_is_recorded_and_zero_for_one_exemplar(brick) -> None:
    one = MaskGuidedPlacer([DefectExemplar(_bar(0), None, "scratch", "s.png")], orientation="exemplar",
                           flip=False, p_elastic=0.0, scale=(1, 1), foreground="texture")
    result = one(brick, np.random.default_rng(0))
    assert result.params["rotation_std"] == 0.0 and result.params["rotation"] == 0.0
    spread = MaskGuidedPlacer([DefectExemplar(_bar(a), None, "scratch", f"s{a}.png") for a in (-10, 0, 10, 175)],
                              orientation="exemplar", foreground="texture")
    std = spread(brick, np.random.default_rng(0)).params["rotation_std"]
    assert 1.0 < std < 10.0  # axial: 175 is -5, not a 175-degree outlier


def test_round_defects_do_not_widen_the_orientation_of_elongated_ones(brick) -> None:
    """Two horizontal bars and a disc at an arbitrary 'axis': the disc carries (almost) no orientation weight."""
    disc = np.zeros((96, 96), bool)
    disc[np.hypot(*np.mgrid[-48:48, -48:48]) < 12] = True
    disc[48, 60] = True  # a one-pixel bump gives the disc a defined but meaningless axis
    members = [DefectExemplar(_bar(0), None, "uneven", "a.png"), DefectExemplar(_bar(3), None, "uneven", "b.png"),
               DefectExemplar(disc, None, "uneven", "disc.png")]
    placer = MaskGuidedPlacer(members, orientation="exemplar", foreground="texture")
    std = placer(brick, np.random.default_rng(0)).params["rotation_std"]
    assert std < 5.0
    assert elongation(disc) < 0.1 < 0.9 < elongation(_bar(0))
    # unweighted, a round defect's arbitrary angle (here 60) would count as much as a bar
    assert _axial_bandwidth([0.0, 3.0, 60.0]) > 15.0 > 8.0 > _axial_bandwidth([0.0, 3.0, 60.0], [0.95, 0.95, 0.05])
    assert _axial_bandwidth([10.0, 80.0], [0.0, 0.0]) == 180.0  # only round defects: any rotation


def test_principal_axis_angle() -> None:
    assert _axis_from_horizontal(_bar(0)) < 1.0 and 0.0 <= principal_axis_angle(_bar(-20)) < 180.0
    assert principal_axis_angle(_bar(90)) == pytest.approx(90.0, abs=1.0)
    assert principal_axis_angle(_bar(30)) == pytest.approx(30.0, abs=1.5)  # cv2 angles turn x towards +y too


# ----------------------------------------------------------------------------------------- harmonize


def _ring(mask: np.ndarray) -> np.ndarray:
    return _dilate(mask, 10) & ~_dilate(mask, 5)  # outside the feather: the untouched surface


def _relative_contrast(image: np.ndarray, mask: np.ndarray) -> float:
    gray = image.astype(np.float64).mean(axis=2)
    return float(gray[mask].mean() / gray[_ring(mask)].mean())


@pytest.fixture(scope="module")
def dark_defect() -> tuple[DefectExemplar, float, np.ndarray]:
    """A spot 55 % darker than a dim gravel surface, its relative contrast, and a twice as bright normal."""
    gravel = data.gravel().astype(np.float32)
    source = _rgb(np.clip(gravel[:128, :160] * 0.35, 0, 255).astype(np.uint8))
    mask = np.zeros((128, 160), np.uint8)
    cv2.ellipse(mask, (80, 64), (20, 12), 25, 0, 360, 1, -1)
    mask = mask.astype(bool)
    image = source.copy()
    image[mask] = (image[mask] * 0.45).astype(np.uint8)
    bright = _rgb(np.clip(gravel[128:256, 160:320] * 0.7, 0, 255).astype(np.uint8))
    return DefectExemplar(mask, image, "spot", "spot.png"), _relative_contrast(image, mask), bright


def test_harmonize_keeps_the_relative_contrast_on_a_brighter_surface(dark_defect) -> None:
    exemplar, source_contrast, bright = dark_defect
    contrasts = {}
    for harmonize in (False, True):
        placer = MaskGuidedPlacer([exemplar], blend_mode="texture", harmonize=harmonize, foreground="texture")
        results = [placer(bright, np.random.default_rng(seed)) for seed in range(10)]
        contrasts[harmonize] = np.mean([_relative_contrast(r.image, r.mask) for r in results])
        for r in results:  # the label still covers every changed pixel
            outside = ~_dilate(r.mask, FEATHER)
            assert np.array_equal(r.image[outside], bright[outside])
    assert abs(contrasts[True] / source_contrast - 1) < 0.15
    assert abs(contrasts[False] / source_contrast - 1) > 0.15  # copied as is, the spot looks too faint
    gain = results[0].params["harmonize_gain"]
    assert 1.5 < gain < 3.0 and results[0].params["harmonize"] is True


def test_harmonize_alpha_matches_the_patch_and_poisson_is_unchanged(dark_defect) -> None:
    exemplar, source_contrast, bright = dark_defect
    errors = {}
    for harmonize in (False, True):
        placer = MaskGuidedPlacer([exemplar], blend_mode="alpha", harmonize=harmonize, foreground="texture")
        results = [placer(bright, np.random.default_rng(seed)) for seed in range(6)]
        errors[harmonize] = abs(np.mean([_relative_contrast(r.image, r.mask) for r in results]) - source_contrast)
        for r in results:
            outside = ~_dilate(r.mask, FEATHER)
            assert np.array_equal(r.image[outside], bright[outside])
    assert errors[True] < 0.5 * errors[False]  # the dim patch no longer sits as a dark stamp on the bright part
    assert len(results[0].params["harmonize_shift"]) == 3
    plain, harmonized = (MaskGuidedPlacer([exemplar], blend_mode="poisson", harmonize=h, foreground="texture")
                         (bright, np.random.default_rng(1)) for h in (False, True))
    assert np.array_equal(plain.image, harmonized.image) and harmonized.params["harmonize_gain"] == 1.0


def test_all_options_together_are_reproducible(dark_defect, brick) -> None:
    exemplar, _, _ = dark_defect
    placer = MaskGuidedPlacer([exemplar, exemplar], blend_mode="texture", position="exemplar",
                              orientation="exemplar", harmonize=True)
    a, b = (placer(brick, np.random.default_rng(4)) for _ in range(2))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.params == b.params
    assert json.loads(json.dumps(a.params)) == a.params


def test_bad_option_values_are_named() -> None:
    ex = [DefectExemplar(_bar(0), None, "scratch", "s.png")]
    with pytest.raises(InputError, match="position must be 'uniform' or 'exemplar'.*'centre'"):
        MaskGuidedPlacer(ex, position="centre")
    with pytest.raises(InputError, match="orientation must be"):
        MaskGuidedPlacer(ex, orientation="exemplars")
    with pytest.raises(InputError, match="harmonize"):
        MaskGuidedPlacer(ex, harmonize="yes")


# -------------------------------------------------------------------------------------- normal_match


def test_context_weights_prefer_similar_images() -> None:
    tall, wide = np.zeros((80, 40, 3), np.uint8), np.zeros((40, 80, 3), np.uint8)
    normals = np.stack([image_descriptor(tall), image_descriptor(wide)])
    weights = context_weights(normals, np.stack([image_descriptor(np.zeros((90, 45, 3), np.uint8))]))
    assert weights.sum() == pytest.approx(1.0) and weights[0] > 0.8
    # masks only: aspect and area are known, the grey levels are not and are ignored
    masks_only = exemplar_descriptor(DefectExemplar(np.ones((30, 60), bool)))
    assert np.isnan(masks_only[2:]).all()
    assert context_weights(normals, masks_only[None])[1] > 0.8
    flat = context_weights(np.stack([image_descriptor(tall)] * 3), masks_only[None])
    assert np.allclose(flat, 1 / 3)  # nothing tells the normals apart


@pytest.fixture(scope="module")
def context_inputs(tmp_path_factory) -> Path:
    """4 tall normals and their 4 transposes (wide, same grey levels); 8 spot exemplars cut from tall images.

    All are brick crops, so the exemplars' grey levels lie among the normals' and the weights spread over
    several tall normals (a draw that ignored the per-sample seed would then show up in the resume test).
    """
    root = tmp_path_factory.mktemp("context")
    rng = np.random.default_rng(0)
    brick = data.brick()
    for i in range(4):
        y, x = rng.integers(0, 400, size=2)
        tall = brick[y : y + 64, x : x + 32]
        write_image(root / "normal" / f"tall{i}.png", _rgb(tall))
        write_image(root / "normal" / f"wide{i}.png", _rgb(np.ascontiguousarray(tall.T)))
    for i in range(8):
        y, x = rng.integers(0, 400, size=2)
        image = _rgb(brick[y : y + 60, x : x + 30])
        mask = np.zeros((60, 30), np.uint8)
        cv2.circle(mask, (15, 30), 5, 1, -1)
        image[mask > 0] //= 2
        write_image(root / "defects" / "spot" / f"s{i}.png", image)
        write_image(root / "masks" / "spot" / f"s{i}.png", mask.astype(bool))
    return root


def _generate(inputs: Path, out: Path, *extra: str | int) -> int:
    return synth_main(["generate", "-q", "--normal", str(inputs / "normal"), "--masks", str(inputs / "masks"),
                       "--defects", str(inputs / "defects"), "--method", "paste", "--out", str(out),
                       *map(str, extra)])


def test_normal_match_prefers_normals_like_the_exemplar_images(context_inputs, tmp_path) -> None:
    def tall_fraction(out: Path) -> float:
        samples = read_defect_set(out).select(split="test")
        return np.mean([Path(s.source_image).name.startswith("tall") for s in samples])

    assert _generate(context_inputs, tmp_path / "match", "--n", 40, "--normal-match", "exemplar") == 0
    assert _generate(context_inputs, tmp_path / "any", "--n", 40) == 0
    assert tall_fraction(tmp_path / "match") > 0.9
    assert tall_fraction(tmp_path / "any") == 0.5  # the default cycles through every normal
    info = json.loads((tmp_path / "match" / "dataset_info.json").read_text())
    assert info["normal_match"]["mode"] == "exemplar" and info["normal_match"]["exemplars"] == 8
    assert info["normal_match"]["effective_normals"] > 2  # several tall normals, not one
    assert len({s.source_image for s in read_defect_set(tmp_path / "match").select(split="test")}) >= 3
    assert "normal_match" not in json.loads((tmp_path / "any" / "generate_config.json").read_text())


def test_normal_match_is_reproducible_and_resumes(context_inputs, tmp_path, monkeypatch) -> None:
    args = ("--n", 8, "--seed", 3, "--normal-match", "exemplar", "--blend", "texture")
    assert _generate(context_inputs, tmp_path / "a", *args) == 0
    assert _generate(context_inputs, tmp_path / "b", *args) == 0
    skip = lambda p: p.name == "report.html"  # noqa: E731 - names its own output folder
    reference = tree_digest(tmp_path / "a", skip=skip)
    assert reference == tree_digest(tmp_path / "b", skip=skip)

    # A crash after 3 generated samples (the writer dies on the 4th), then the same command again.
    original_record, calls = DefectSetWriter.record, {"n": 0}

    def crashing_record(self, sample):
        calls["n"] += sample.split == "test"
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated kill")
        return original_record(self, sample)

    monkeypatch.setattr(DefectSetWriter, "record", crashing_record)
    assert _generate(context_inputs, tmp_path / "resumed", *args) != 0  # the CLI reports the interruption
    monkeypatch.setattr(DefectSetWriter, "record", original_record)
    assert (tmp_path / "resumed" / "manifest.jsonl").read_text().count('"split": "test"') == 3
    assert _generate(context_inputs, tmp_path / "resumed", *args) == 0
    assert tree_digest(tmp_path / "resumed", skip=skip) == reference


def test_normal_match_needs_method_paste(context_inputs, tmp_path, capsys) -> None:
    code = synth_main(["generate", "-q", "--normal", str(context_inputs / "normal"), "--method", "perlin",
                       "--normal-match", "exemplar", "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "normal_match 'exemplar'" in err and "method 'paste'" in err and "'perlin'" in err


# ---------------------------------------------------------------------------------------- transforms


@pytest.fixture(scope="module")
def crack() -> tuple[np.ndarray, np.ndarray]:
    """Grey 64x64 gravel crop with a darkened line, and its 0/255 uint8 mask."""
    image = data.gravel()[:64, :64].copy()
    mask = np.zeros((64, 64), np.uint8)
    cv2.line(mask, (10, 20), (54, 44), 255, 3)
    image[mask > 0] //= 2
    return image, mask


def test_paste_inside_albumentations_compose(brick, crack) -> None:
    def run(seed: int, image: np.ndarray = brick) -> dict:
        pipeline = A.Compose([SyntheticAnomaly("paste", generator_kwargs={"exemplars": [(*crack, "crack")]},
                                               p=1.0)], seed=seed)
        return pipeline(image=image, mask=np.zeros(image.shape[:2], np.uint8))

    first, again, other = run(5), run(5), run(6)
    defect = first["mask"] > 0
    assert defect.any() and (first["image"][defect] != brick[defect]).any()
    assert np.array_equal(first["image"][~_dilate(defect, FEATHER)], brick[~_dilate(defect, FEATHER)])
    assert np.array_equal(first["image"], again["image"]) and np.array_equal(first["mask"], again["mask"])
    assert not np.array_equal(first["mask"], other["mask"])
    gray = run(5, np.ascontiguousarray(brick[:, :, 0]))
    assert gray["image"].shape == brick.shape[:2] and gray["mask"].any()


def test_paste_torchvision_style(brick, crack) -> None:
    image = torch.from_numpy(brick).permute(2, 0, 1).contiguous()
    exemplar = DefectExemplar(crack[1] > 0, _rgb(crack[0]), "crack", "crack.png")
    out, mask = SyntheticAnomalyV2("paste", p=1.0, seed=0, exemplars=[exemplar], blend_mode="texture")(image)
    assert out.dtype == torch.uint8 and mask.dtype == torch.bool and mask.any()
    assert not torch.equal(out, image)
    again, _ = SyntheticAnomalyV2("paste", p=1.0, seed=0, exemplars=[exemplar], blend_mode="texture")(image)
    assert torch.equal(out, again)
    gray = image[:1].float() / 255  # 1-channel float input comes back 1-channel float
    out_g, mask_g = SyntheticAnomalyV2("paste", p=1.0, seed=1, exemplars=[crack])(gray, torch.zeros(120, 160))
    assert out_g.shape == gray.shape and out_g.is_floating_point() and mask_g.any()


def test_paste_transform_from_folders(brick, crack, tmp_path) -> None:
    write_image(tmp_path / "masks" / "crack" / "c1.png", crack[1] > 0)
    write_image(tmp_path / "defects" / "crack" / "c1.png", _rgb(crack[0]))
    transform = SyntheticAnomaly("paste", generator_kwargs={"masks": tmp_path / "masks",
                                                            "defects": tmp_path / "defects",
                                                            "blend_mode": "poisson"}, p=1.0)
    out = A.Compose([transform], seed=0)(image=brick, mask=np.zeros(brick.shape[:2], np.uint8))
    assert out["mask"].any()


def test_paste_transform_errors_and_unplaceable_images(crack) -> None:
    with pytest.raises(InputError, match=r"exemplars\[1\].*empty"):
        SyntheticAnomaly("paste", generator_kwargs={"exemplars": [crack, (crack[0], np.zeros((64, 64), bool))]})
    with pytest.raises(InputError, match="needs real defects"):
        SyntheticAnomalyV2("paste")
    with pytest.raises(InputError, match="positon.*valid keywords: exemplars, masks, defects, .*position"):
        SyntheticAnomalyV2("paste", exemplars=[crack], positon="exemplar")
    # 16x16 image whose only foreground is a 4x4 object: the defect cannot go anywhere.
    tiny = np.full((16, 16, 3), 200, np.uint8)
    tiny[6:10, 6:10] = 40
    transform = SyntheticAnomaly("paste", generator_kwargs={"exemplars": [crack], "foreground": "object"}, p=1.0)
    out = A.Compose([transform], seed=0)(image=tiny, mask=np.zeros((16, 16), np.uint8))
    assert np.array_equal(out["image"], tiny) and not out["mask"].any()
