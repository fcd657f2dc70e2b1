"""The one generator contract: the registry that synth generate, the config, the transforms and the detectors read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

import synth.generators as generators
from synth.config import GenerateConfig
from synth.core.config import validate_config
from synth.core.errors import ConfigError, InputError
from synth.core.io import write_image
from synth.generate import generate
from synth.generators import (
    GeneratedDefect,
    generator_names,
    get_generator,
    make_generator,
    register_generator,
    transform_generator_names,
)
from synth.transforms import SyntheticAnomalyV2

BUILT_IN = ("perlin", "draem", "cutpaste", "scar", "cutpaste3way", "paste", "controlnet", "csm")


@pytest.fixture(scope="module")
def brick() -> np.ndarray:
    gray = data.brick()[:96, :96]
    return np.repeat(gray[:, :, None], 3, axis=2)


def _one_exemplar(brick: np.ndarray) -> list:
    mask = np.zeros(brick.shape[:2], bool)
    mask[40:52, 30:70] = True
    return [(brick, mask, "scratch")]


def test_every_built_in_generator_is_registered_in_order():
    assert generator_names() == BUILT_IN
    assert transform_generator_names() == sorted(BUILT_IN[:6])
    assert {n for n in BUILT_IN if get_generator(n).needs_masks} == {"paste", "controlnet", "csm"}
    assert {n for n in BUILT_IN if get_generator(n).single_process} == {"controlnet", "csm"}


@pytest.mark.parametrize("name", BUILT_IN[:6])
def test_named_generators_return_the_one_result_type_reproducibly(name, brick):
    kwargs = {"exemplars": _one_exemplar(brick)} if name == "paste" else {}
    generator = make_generator(name, **kwargs)
    first, second = (generator(brick.copy(), np.random.default_rng(3)) for _ in range(2))
    assert isinstance(first, GeneratedDefect)
    assert first.image.shape == brick.shape and first.image.dtype == np.uint8
    assert first.mask.shape == brick.shape[:2] and first.mask.dtype == bool
    assert first.label == first.defect_class and isinstance(first.defect_class, str)
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.mask, second.mask)
    if name != "cutpaste3way":  # 3-way may draw its "normal" class
        assert first.has_anomaly and first.mask.any()


def test_diffusion_generators_refuse_to_build_by_name_and_unknown_names_list_the_choices():
    with pytest.raises(InputError, match="runs only in `synth generate`"):
        make_generator("csm")
    with pytest.raises(InputError, match=r"unknown generator 'nope'; choose one of \['cutpaste'"):
        make_generator("nope")
    with pytest.raises(ConfigError, match=r"key 'method': unknown generate method; choose one of \['perlin'"):
        validate_config(GenerateConfig, {"normal": "n", "out": "o", "method": "nope"})


def test_registering_a_name_twice_with_other_builders_is_an_error():
    spec = get_generator("perlin")
    assert register_generator("perlin", from_config=spec.from_config, from_kwargs=spec.from_kwargs) == spec
    with pytest.raises(TypeError, match="registered twice"):
        register_generator("perlin", from_config=lambda cfg, skipped: None)


def test_a_newly_registered_generator_works_in_the_config_generate_and_the_transforms(tmp_path, brick, monkeypatch):
    def stripe(image: np.ndarray, rng: np.random.Generator) -> GeneratedDefect:
        mask = np.zeros(image.shape[:2], bool)
        row = int(rng.integers(0, image.shape[0] - 4))
        mask[row:row + 4] = True
        out = image.copy()
        out[mask] = 255
        return GeneratedDefect(out, mask, "stripe", {"row": row})

    monkeypatch.setitem(generators._REGISTRY, "stripe",
                        generators.GeneratorSpec("stripe", from_config=lambda cfg, skipped: stripe,
                                                 from_kwargs=lambda: stripe))
    normal = tmp_path / "normal"
    for i in range(2):
        write_image(normal / f"n{i}.png", brick)
    cfg = validate_config(GenerateConfig, {"normal": str(normal), "out": str(tmp_path / "out"), "method": "stripe",
                                           "n": 3, "workers": 1})
    report = generate(cfg, progress=False)
    samples = report.dataset.select(anomalous=True)
    assert [s.defect_class for s in samples] == ["stripe"] * 3
    assert all(report.dataset.load_mask(s).sum() == 4 * brick.shape[1] for s in samples)

    image, mask = SyntheticAnomalyV2("stripe", p=1.0, seed=0)(torch.from_numpy(brick).permute(2, 0, 1))
    assert int(mask.sum()) == 4 * brick.shape[1] and int(image.max()) == 255
