"""Few-shot ControlNet inpainting: training (accelerate, checkpoints, resume, seeds) and generation end to end.

Everything runs on a tiny random SD inpainting model (synth.diffusion.tiny) at 64x64 on the CPU: it proves the
plumbing (shapes, masks honoured, determinism, resume), not image quality.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from synth.core.errors import ConfigError, InputError, WeightsUnavailableError  # noqa: E402
from synth.core.io import list_images, read_image  # noqa: E402
from synth.diffusion.controlnet import (  # noqa: E402
    AugmentConfig,
    TrainingPair,
    augment_pair,
    controlnet_from_inpaint_unet,
    load_train_config,
    load_training_pairs,
    train_controlnet,
)
from synth.diffusion.pipeline_controlnet_inpaint import build_controlnet_generator  # noqa: E402
from synth.diffusion.run_state import read_loss_log  # noqa: E402

HUB_ID = "stabilityai/stable-diffusion-2-inpainting"


def _config(data: Path, out: Path, model: Path, **overrides):
    values = {"data": data, "out": out, "pretrained": str(model), "resolution": 64, "train_steps": 4,
              "batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1e-3, "checkpoint_every": 100,
              "seed": 0, "augment": {"rotate90": True}}
    values.update(overrides)
    return load_train_config(None, values)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def _assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def trained(brick_set, tiny_inpaint_model, tmp_path_factory) -> Path:
    """An uninterrupted 4-step run (2 micro-steps of 2 samples each per step)."""
    out = tmp_path_factory.mktemp("controlnet_run") / "straight"
    train_controlnet(_config(brick_set.root, out, tiny_inpaint_model), progress=False)
    return out


def test_controlnet_built_from_inpaint_unet(tiny_inpaint_model):
    import torch

    from synth.diffusion.components import load_inpaint_components

    unet = load_inpaint_components(tiny_inpaint_model).unet
    controlnet = controlnet_from_inpaint_unet(unet)
    assert controlnet.config.in_channels == 4 and unet.config.in_channels == 9
    # conv_in: the kernels of the 4 latent channels of the 9-channel inpainting UNet.
    assert torch.equal(controlnet.conv_in.weight, unet.conv_in.weight[:, :4])
    down = unet.down_blocks.state_dict()
    for key, value in controlnet.down_blocks.state_dict().items():
        assert torch.equal(value, down[key]), key
    # Zero convolutions: the untrained ControlNet adds nothing to the UNet.
    assert all(float(block.weight.detach().abs().sum()) == 0.0 for block in controlnet.controlnet_down_blocks)


def test_training_loss_finite_and_weights_change(trained, tiny_inpaint_model):
    losses = read_loss_log(trained)
    assert [row["step"] for row in losses] == [1, 2, 3, 4]
    assert all(np.isfinite(row["loss"]) and row["loss"] > 0 for row in losses)
    weights = _weights(trained / "controlnet")
    # The zero convolutions start at exactly 0: training moved them.
    zero_conv = [k for k in weights if k.startswith("controlnet_down_blocks.") and k.endswith(".weight")]
    assert zero_conv and any(float(weights[k].abs().sum()) > 0 for k in zero_conv)
    assert float(weights["controlnet_mid_block.weight"].abs().sum()) > 0
    assert (trained / "checkpoints" / "step_4").is_dir()
    assert (trained / "train_config.json").is_file()


def test_resume_equals_uninterrupted_and_same_seed(trained, brick_set, tiny_inpaint_model, tmp_path):
    # "Killed" after 2 steps (a run with train_steps=2 leaves its checkpoint), then the same command with 4 steps.
    out = tmp_path / "resumed"
    train_controlnet(_config(brick_set.root, out, tiny_inpaint_model, train_steps=2), progress=False)
    assert (out / "checkpoints" / "step_2").is_dir()
    train_controlnet(_config(brick_set.root, out, tiny_inpaint_model, train_steps=4), progress=False)
    _assert_same_weights(_weights(out / "controlnet"), _weights(trained / "controlnet"))
    assert [row["step"] for row in read_loss_log(out)] == [1, 2, 3, 4]
    assert read_loss_log(out) == read_loss_log(trained)

    # Finished: the same command again is a no-op (the weights file is not rewritten).
    weights_file = out / "controlnet" / "diffusion_pytorch_model.safetensors"
    before = weights_file.stat().st_mtime_ns
    start = time.perf_counter()
    train_controlnet(_config(brick_set.root, out, tiny_inpaint_model, train_steps=4), progress=False)
    assert weights_file.stat().st_mtime_ns == before
    assert time.perf_counter() - start < 2.0

    # Other settings into the same folder: a clear error naming the changed key.
    with pytest.raises(InputError, match="learning_rate"):
        train_controlnet(_config(brick_set.root, out, tiny_inpaint_model, learning_rate=1e-4), progress=False)
    with pytest.raises(InputError, match="holds a ControlNet trained for 4 steps, more than train_steps=3"):
        train_controlnet(_config(brick_set.root, out, tiny_inpaint_model, train_steps=3), progress=False)


def test_same_seed_same_weights_other_seed_differs(trained, brick_set, tiny_inpaint_model, tmp_path):
    import torch

    again = train_controlnet(_config(brick_set.root, tmp_path / "again", tiny_inpaint_model), progress=False)
    _assert_same_weights(_weights(again), _weights(trained / "controlnet"))
    other = train_controlnet(_config(brick_set.root, tmp_path / "other", tiny_inpaint_model, seed=1), progress=False)
    a, b = _weights(other), _weights(trained / "controlnet")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def _generator(trained: Path, brick_set, **params):
    values = {"controlnet": str(trained), "num_inference_steps": 2, "guidance_scale": 2.0}
    values.update(params)
    return build_controlnet_generator(values, brick_set.root / "ground_truth", brick_set.root / "test",
                                      foreground="texture")


def test_generation_end_to_end(trained, brick_set):
    gen = _generator(trained, brick_set)
    normal = read_image(list_images(brick_set.root / "train" / "good")[0])
    result = gen(normal, np.random.default_rng(0))
    assert result.image.shape == normal.shape and result.image.dtype == np.uint8
    assert result.mask.shape == normal.shape[:2] and result.mask.dtype == bool and result.mask.any()
    # Pixels outside the mask are exactly the input; inside, the diffusion model painted something new.
    assert np.array_equal(result.image[~result.mask], normal[~result.mask])
    assert not np.array_equal(result.image[result.mask], normal[result.mask])
    assert result.defect_class in ("spot", "scratch")
    assert result.params["prompt"] == f"a photo of a {result.defect_class}"
    assert result.params["num_inference_steps"] == 2 and isinstance(result.params["diffusion_seed"], int)

    same = gen(normal, np.random.default_rng(0))
    assert np.array_equal(same.image, result.image) and np.array_equal(same.mask, result.mask)
    assert same.params == result.params
    other = gen(normal, np.random.default_rng(1))
    assert not np.array_equal(other.image, result.image)


def test_generator_plugs_into_synth_generate(trained, brick_set, tmp_path, monkeypatch):
    import synth.generate
    from synth.config import GenerateConfig
    from synth.core.defect_set import read_defect_set

    gen = _generator(trained, brick_set)
    # Until `--method controlnet` is wired into build_generator, route a paste config to this generator.
    monkeypatch.setattr(synth.generate, "build_generator", lambda cfg, skipped=None: gen)
    cfg = GenerateConfig(normal=brick_set.root / "train" / "good", out=tmp_path / "set", method="paste", n=2,
                         masks=brick_set.root / "ground_truth", copy_normals=False, preview=0)
    report = synth.generate.generate(cfg, progress=False)
    dataset = read_defect_set(report.dataset.root)
    defects = dataset.select(anomalous=True)
    assert len(defects) == 2 and {s.defect_class for s in defects} <= {"spot", "scratch"}
    assert all(s.params["prompt"].startswith("a photo of a ") and "placement" in s.params for s in defects)


def test_generation_non_square_image_and_ddim(trained, brick_set):
    gen = _generator(trained, brick_set, scheduler="ddim", guidance_scale=1.0, resolution=32,
                     placement={"scale": [0.3, 0.5]})
    normal = read_image(list_images(brick_set.root / "train" / "good")[1])[:40, :]
    result = gen(normal, np.random.default_rng(3))
    assert result.image.shape == (40, 64, 3) and result.mask.shape == (40, 64)
    assert np.array_equal(result.image[~result.mask], normal[~result.mask])
    assert result.params["resolution"] == 32 and result.params["scheduler"] == "ddim"


def test_augment_keeps_image_and_mask_aligned():
    mask = np.zeros((64, 64), bool)
    mask[10:30, 40:44] = True
    mask[12, 20:40] = True
    image = np.where(mask[:, :, None], 255, 0).astype(np.uint8).repeat(3, axis=2)
    pair = TrainingPair(image, mask, "scratch", "memory")
    augment = AugmentConfig(hflip=True, vflip=True, rotate90=True, crop_scale=(0.5, 0.5))
    for seed in range(20):
        # resolution = crop side: no resampling, so alignment must be exact.
        out, shape, touched = augment_pair(pair, np.random.default_rng(seed), 32, augment)
        assert out.shape == (32, 32, 3) and shape.any()
        assert np.array_equal(out[:, :, 0] == 255, shape) and np.array_equal(shape, touched)
    a = augment_pair(pair, np.random.default_rng(5), 48, augment)
    b = augment_pair(pair, np.random.default_rng(5), 48, augment)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_training_pairs_from_masks_and_defects_and_shots(brick_set, tmp_path):
    cfg = load_train_config(None, {"masks": brick_set.root / "ground_truth", "defects": brick_set.root / "test",
                                   "out": tmp_path / "o", "shots": 3})
    pairs = load_training_pairs(cfg)
    assert sorted(p.defect_class for p in pairs) == ["scratch"] * 3 + ["spot"] * 3
    assert all(p.image.shape[:2] == p.mask.shape and p.mask.any() for p in pairs)


def test_offline_hub_id_fails_fast_naming_it(brick_set, trained, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match=HUB_ID):
        train_controlnet(load_train_config(None, {"data": brick_set.root, "out": tmp_path / "o", "resolution": 64,
                                                  "train_steps": 1}), progress=False)
    with pytest.raises(WeightsUnavailableError, match=HUB_ID):
        _generator(trained, brick_set, pretrained=HUB_ID)
    assert time.perf_counter() - start < 10.0


def test_bad_config_values_name_the_key(brick_set, tmp_path, trained):
    base = {"data": brick_set.root, "out": tmp_path / "o"}
    with pytest.raises(ConfigError, match="resolution"):
        load_train_config(None, {**base, "resolution": 60})
    with pytest.raises(ConfigError, match="prompt_template"):
        load_train_config(None, {**base, "prompt_template": "a photo of a {object}"})
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_train_config(None, {**base, "mixed_precision": "fp8"})
    with pytest.raises(ConfigError, match="crop_scale"):
        load_train_config(None, {**base, "augment": {"crop_scale": [0.0, 1.0]}})
    with pytest.raises(ConfigError, match="learing_rate"):
        load_train_config(None, {**base, "learing_rate": 1e-4})
    with pytest.raises(ConfigError, match="masks"):
        load_train_config(None, {"out": tmp_path / "o"})
    with pytest.raises(ConfigError, match="num_inference_steps"):
        _generator(trained, brick_set, num_inference_steps=0)
    with pytest.raises(ConfigError, match="sceduler"):
        _generator(trained, brick_set, sceduler="ddim")


def test_set_without_defects_and_missing_controlnet_are_input_errors(brick_set, trained, tiny_inpaint_model,
                                                                     tmp_path):
    normal_only = tmp_path / "normal_only"
    (normal_only / "train" / "good").mkdir(parents=True)
    for path in list_images(brick_set.root / "train" / "good")[:2]:
        shutil.copy(path, normal_only / "train" / "good" / path.name)
    with pytest.raises(InputError, match="no anomalous sample"):
        train_controlnet(_config(normal_only, tmp_path / "o", tiny_inpaint_model), progress=False)
    missing = tmp_path / "no_such_run"
    with pytest.raises(InputError, match="no_such_run"):
        _generator(missing, brick_set)
    with pytest.raises(InputError, match="--masks"):
        build_controlnet_generator({"controlnet": str(trained)}, None)
