"""CSM semantic guidance: fusion attention, decoupled cross-attention processors, training and generation.

Everything runs on a tiny random SD inpainting model (synth.diffusion.tiny) and a tiny random open_clip ViT (the
WinCLIP tests' model-config JSON approach: ViT width 64, patch 8 at 64 px -> an 8x8 patch grid, 32-d embeddings) at
64x64 on the CPU: it proves the plumbing (attention prior, exactness at scale 0, only adapter weights train, resume,
determinism, masks honoured), not image quality.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")
pytest.importorskip("open_clip")

import torch  # noqa: E402

from synth.core.errors import ConfigError, InputError, WeightsUnavailableError  # noqa: E402
from synth.core.io import list_images, read_image  # noqa: E402
from synth.diffusion.csm import (  # noqa: E402
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ClipFeatures,
    CrossModalSemanticModule,
    CSMAdapter,
    load_adapter,
    load_clip_encoder,
    mask_patch_weights,
)
from synth.diffusion.pipeline_csm import build_csm_generator  # noqa: E402
from synth.diffusion.run_state import read_loss_log  # noqa: E402
from synth.diffusion.train_csm import load_train_config, train_csm  # noqa: E402

SIZE = 64
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("clip") / "csm-test-tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return str(path)


def _config(data: Path, out: Path, model: Path, clip: str, **overrides):
    values = {"data": data, "out": out, "pretrained": str(model), "clip_model": clip, "clip_pretrained": "random",
              "resolution": SIZE, "train_steps": 3, "batch_size": 2, "gradient_accumulation_steps": 1,
              "learning_rate": 1e-3, "checkpoint_every": 100, "seed": 0, "fusion_heads": 4,
              "guidance_dropout": 0.25}
    values.update(overrides)
    return load_train_config(None, values)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / ADAPTER_WEIGHTS))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trained(brick_set, tiny_inpaint_model, tiny_clip, tmp_path_factory) -> Path:
    """An uninterrupted 3-step run."""
    out = tmp_path_factory.mktemp("csm_run") / "straight"
    train_csm(_config(brick_set.root, out, tiny_inpaint_model, tiny_clip), progress=False)
    return out


# ----- fusion ---------------------------------------------------------------------------------------------------


def _features(batch: int, length: int, dim: int, seed: int, grid=None) -> ClipFeatures:
    g = torch.Generator().manual_seed(seed)
    return ClipFeatures(torch.randn(batch, length, dim, generator=g), torch.randn(batch, dim, generator=g),
                        torch.ones(batch, length, dtype=torch.bool), grid)


@pytest.mark.parametrize("mask_prior", [1.0, 0.0])
def test_fusion_attention_concentrates_on_the_reference_mask(mask_prior):
    torch.manual_seed(0)
    fusion = CrossModalSemanticModule(32, 24, num_tokens=3, num_heads=4, mask_prior=mask_prior,
                                      mask_background=0.1)
    image = _features(2, 64, 32, 1, grid=(8, 8))
    target, ref_text = _features(2, 7, 32, 2), _features(2, 5, 32, 3)
    mask = torch.zeros(2, 1, SIZE, SIZE)
    mask[0, :, 8:32, 16:40] = 1  # 3x3 patches of 64
    mask[1, :, 40:56, 0:64] = 1  # 2 rows of patches
    out = fusion(target, image, ref_text, mask)
    assert out.tokens.shape == (2, 3, 24)
    inside = mask_patch_weights(mask, (8, 8)).view(2, 8, 8) > 0
    attention = out.patch_attention  # (B, queries, 8, 8)
    share = (attention * inside[:, None]).sum(dim=(2, 3)) / attention.sum(dim=(2, 3))
    per_in = (attention * inside[:, None]).sum(dim=(2, 3)) / inside.sum(dim=(1, 2))[:, None]
    per_out = (attention * ~inside[:, None]).sum(dim=(2, 3)) / (~inside).sum(dim=(1, 2))[:, None]
    if mask_prior > 0:
        # ASEA prior: ~90 % of the attention on the patches lies on the defect, for every query and both sizes.
        assert share.min() > 0.8
        assert (per_in / per_out).min() > 20
    else:
        # Without the prior the random features spread attention about evenly: the mask gets its area share.
        area = inside.float().mean(dim=(1, 2))[:, None]
        assert (share - area).abs().max() < 0.1


def test_fusion_ignores_text_padding_and_handles_an_empty_mask():
    torch.manual_seed(0)
    fusion = CrossModalSemanticModule(32, 16, num_tokens=2, num_heads=4)
    image, target = _features(1, 64, 32, 1, grid=(8, 8)), _features(1, 6, 32, 2)
    ref_text = _features(1, 5, 32, 3)
    ref_text.valid[:, 3:] = False
    out = fusion(target, image, ref_text, torch.zeros(1, 1, SIZE, SIZE))
    assert torch.all(out.attention[..., -2:] == 0)  # padded reference-text tokens get no weight
    assert torch.isfinite(out.tokens).all()
    uniform = fusion(target, image, ref_text, None)
    torch.testing.assert_close(out.tokens, uniform.tokens)  # empty mask = no prior


# ----- processors -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def components(tiny_inpaint_model):
    from synth.diffusion.components import load_inpaint_components

    return load_inpaint_components(tiny_inpaint_model)


def _unet_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 9, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 32, 32, generator=g),
            torch.randn(2, 4, 32, generator=g))


def test_processors_exact_at_scale_zero_and_guiding_above(components):
    unet = components.unet
    sample, t, text, tokens = _unet_inputs()
    with torch.no_grad():
        reference = unet(sample, t, encoder_hidden_states=text).sample
        torch.manual_seed(0)
        adapter = CSMAdapter.for_unet(unet, clip_dim=32, num_tokens=4, fusion_heads=4)
        assert len(adapter.processors) == 4  # down 1 + mid 1 + up 2 cross-attention layers of the tiny UNet
        for (name, _, _), proc in zip(adapter.config.layers, adapter.processors, strict=True):
            attn = unet.get_submodule(name[: -len(".processor")])
            assert torch.equal(proc.to_k_ip.weight, attn.to_k.weight)
            assert torch.equal(proc.to_v_ip.weight, attn.to_v.weight)
        adapter.install(unet)
        try:
            without_tokens = unet(sample, t, encoder_hidden_states=text).sample
            with adapter.guidance(tokens, scale=0.0):
                at_zero = unet(sample, t, encoder_hidden_states=text).sample
            with adapter.guidance(tokens, scale=1.0):
                guided = unet(sample, t, encoder_hidden_states=text).sample
            with adapter.guidance(tokens[:1], scale=1.0):  # CFG batch: [uncond, cond] -> zeros for uncond
                cfg_batch = unet(sample, t, encoder_hidden_states=text).sample
        finally:
            adapter.remove(unet)
        restored = unet(sample, t, encoder_hidden_states=text).sample
    assert torch.equal(without_tokens, reference)
    assert torch.equal(at_zero, reference)
    assert (guided - reference).abs().max() > 1e-4
    # Zero tokens add exactly nothing: the unconditional half equals the unguided UNet (to float rounding).
    torch.testing.assert_close(cfg_batch[:1], reference[:1], rtol=0, atol=1e-6)
    assert (cfg_batch[1:] - reference[1:]).abs().max() > 1e-4
    assert torch.equal(restored, reference)
    assert all(type(p).__name__ != "CSMAttnProcessor" for p in unet.attn_processors.values())


def test_adapter_refuses_another_unet(components):
    torch.manual_seed(0)
    adapter = CSMAdapter.for_unet(components.unet, clip_dim=32, num_tokens=2, fusion_heads=4)
    adapter.config.layers[0][1] = 999
    with pytest.raises(InputError, match="another UNet"):
        adapter.install(components.unet)


# ----- training -------------------------------------------------------------------------------------------------


def test_training_changes_only_the_adapter(trained, tiny_inpaint_model):
    from synth.diffusion.components import load_inpaint_components

    assert (trained / ADAPTER_WEIGHTS).is_file() and (trained / ADAPTER_CONFIG).is_file()
    log = read_loss_log(trained)
    assert [row["step"] for row in log] == [1, 2, 3]
    assert all(np.isfinite(row["loss"]) and row["loss"] > 0 for row in log)
    loaded = load_adapter(trained)
    meta = loaded.metadata
    assert meta["classes"] == ["scratch", "spot"] and meta["resolution"] == SIZE
    # Changed from the initialisation: k/v started as copies of the UNet's to_k/to_v.
    unet = load_inpaint_components(tiny_inpaint_model).unet
    first = loaded.adapter.config.layers[0][0][: -len(".processor")]
    assert not torch.equal(loaded.adapter.processors[0].to_k_ip.weight, unet.get_submodule(first).to_k.weight)
    torch.manual_seed(0)
    fresh = CSMAdapter.for_unet(unet, clip_dim=32, num_tokens=4, fusion_heads=4)
    assert not torch.equal(loaded.adapter.fusion.proj.weight, fresh.fusion.proj.weight)
    # The frozen UNet on disk is untouched and the training run saved nothing but the adapter.
    checkpoint = trained / "checkpoints" / "step_3"
    saved = [p.name for p in checkpoint.iterdir()]
    assert "model.safetensors" in saved
    from safetensors.torch import load_file

    keys = load_file(str(checkpoint / "model.safetensors")).keys()
    assert keys and all(k.startswith("adapter.") for k in keys)


def test_training_leaves_the_unet_unchanged(brick_set, tiny_inpaint_model, tiny_clip, tmp_path, monkeypatch):
    """The in-memory UNet used for training keeps every original weight; only adapter tensors get gradients."""
    from synth.diffusion import components as components_module

    captured = {}
    original = components_module.load_inpaint_components

    def capture(pretrained):
        parts = original(pretrained)
        captured["unet"] = parts.unet
        captured["before"] = {k: v.clone() for k, v in parts.unet.state_dict().items()}
        return parts

    monkeypatch.setattr(components_module, "load_inpaint_components", capture)
    train_csm(_config(brick_set.root, tmp_path / "run", tiny_inpaint_model, tiny_clip, train_steps=2),
              progress=False)
    after = captured["unet"].state_dict()
    assert captured["before"].keys() == after.keys()  # the adapter was removed again
    assert all(torch.equal(v, after[k]) for k, v in captured["before"].items())
    assert not any(p.requires_grad for p in captured["unet"].parameters())


def test_resume_equals_uninterrupted_and_seeds_decide(trained, brick_set, tiny_inpaint_model, tiny_clip,
                                                      tmp_path):
    out = tmp_path / "resumed"
    train_csm(_config(brick_set.root, out, tiny_inpaint_model, tiny_clip, train_steps=2, checkpoint_every=1),
              progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1", "step_2"]
    train_csm(_config(brick_set.root, out, tiny_inpaint_model, tiny_clip, checkpoint_every=1), progress=False)
    assert _same(_weights(out), _weights(trained))
    assert [r["loss"] for r in read_loss_log(out)] == [r["loss"] for r in read_loss_log(trained)]
    # Same seed, new folder: the same weights; another seed: other weights.
    again = tmp_path / "again"
    train_csm(_config(brick_set.root, again, tiny_inpaint_model, tiny_clip), progress=False)
    assert _same(_weights(again), _weights(trained))
    other = tmp_path / "other_seed"
    train_csm(_config(brick_set.root, other, tiny_inpaint_model, tiny_clip, seed=1), progress=False)
    assert not _same(_weights(other), _weights(trained))


def test_finished_run_is_a_noop_and_other_settings_are_refused(trained, brick_set, tiny_inpaint_model, tiny_clip):
    before = (trained / ADAPTER_WEIGHTS).stat().st_mtime_ns
    train_csm(_config(brick_set.root, trained, tiny_inpaint_model, tiny_clip), progress=False)
    assert (trained / ADAPTER_WEIGHTS).stat().st_mtime_ns == before
    with pytest.raises(InputError, match="other settings.*num_tokens"):
        train_csm(_config(brick_set.root, trained, tiny_inpaint_model, tiny_clip, num_tokens=2), progress=False)
    with pytest.raises(InputError, match="holds an adapter trained for 3 steps, more than train_steps=2"):
        train_csm(_config(brick_set.root, trained, tiny_inpaint_model, tiny_clip, train_steps=2), progress=False)


# ----- generation -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def controlnet_run(tiny_inpaint_model, tmp_path_factory) -> Path:
    """A small ControlNet (4 latent input channels, mask condition) saved like synth train-controlnet does."""
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    controlnet = ControlNetModel(
        in_channels=4, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        layers_per_block=1, cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
        conditioning_embedding_out_channels=(8, 8, 16, 16),
    )
    with torch.no_grad():  # non-zero output convolutions, so the control really changes the result
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0, 0.05)
    run = tmp_path_factory.mktemp("controlnet_run")
    controlnet.save_pretrained(str(run / "controlnet"))
    return run


def _params(trained: Path, **extra) -> dict:
    return {"adapter": str(trained), "num_inference_steps": 2, "guidance_scale": 2.0, **extra}


@pytest.fixture(scope="module")
def normal(brick_set) -> np.ndarray:
    return read_image(list_images(brick_set.root / "train" / "good")[0])


@pytest.mark.parametrize("with_controlnet", [False, True])
def test_generation_end_to_end(trained, brick_set, controlnet_run, normal, with_controlnet):
    extra = {"controlnet": str(controlnet_run)} if with_controlnet else {}
    gen = build_csm_generator(_params(trained, **extra), brick_set.root / "ground_truth", brick_set.root / "test")
    assert type(gen.pipeline).__name__ == ("StableDiffusionControlNetInpaintPipeline" if with_controlnet
                                           else "StableDiffusionInpaintPipeline")
    start = time.perf_counter()
    first = gen(normal, np.random.default_rng(7))
    elapsed = time.perf_counter() - start
    second = gen(normal, np.random.default_rng(7))
    third = gen(normal, np.random.default_rng(8))
    assert first.image.shape == normal.shape and first.image.dtype == np.uint8
    assert first.mask.shape == normal.shape[:2] and first.mask.dtype == bool and first.mask.any()
    assert first.defect_class in ("scratch", "spot")
    np.testing.assert_array_equal(first.image[~first.mask], normal[~first.mask])  # outside the mask: unchanged
    assert np.any(first.image[first.mask] != normal[first.mask])
    np.testing.assert_array_equal(first.image, second.image)  # same rng seed, same sample
    np.testing.assert_array_equal(first.mask, second.mask)
    assert not np.array_equal(first.image, third.image)
    assert first.params["prompt"] == f"a photo of a {first.defect_class}"
    assert first.params["reference"].startswith(str(brick_set.root))
    assert (first.params["controlnet"] is not None) == with_controlnet
    json.dumps(first.params)  # manifest rows must serialise
    assert elapsed < 10


def test_guidance_changes_the_generation(trained, brick_set, normal):
    gen = build_csm_generator(_params(trained, defect_class="spot", references=str(brick_set.root)),
                              brick_set.root / "ground_truth", None)
    guided = gen(normal, np.random.default_rng(3))
    assert guided.defect_class == "spot" and guided.params["reference"].split("/")[-2] == "spot"
    gen.adapter.scale = 0.0
    plain = gen(normal, np.random.default_rng(3))
    np.testing.assert_array_equal(plain.mask, guided.mask)
    assert not np.array_equal(plain.image, guided.image)


def test_generation_input_errors(trained, brick_set, tmp_path):
    masks = brick_set.root / "ground_truth"
    with pytest.raises(InputError, match="--masks"):
        build_csm_generator(_params(trained), None, None)
    with pytest.raises(InputError, match="reference defect images"):
        build_csm_generator(_params(trained), masks, None)
    with pytest.raises(InputError, match="no trained CSM adapter"):
        build_csm_generator(_params(tmp_path / "nothing"), masks, brick_set.root / "test")
    with pytest.raises(InputError, match=r"class\(es\) \['crack'\]"):
        build_csm_generator(_params(trained, defect_class="crack"), masks, brick_set.root / "test")


# ----- config and errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value"), [
    ("num_tokens", 0), ("adapter_scale", 0), ("mask_background", 0), ("guidance_dropout", 1.0),
    ("resolution", 60), ("prompt_template", "a photo"), ("mixed_precision", "fp8"), ("no_such_key", 1),
])
def test_bad_train_config_names_the_key(key, value, tmp_path):
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        load_train_config(None, {"data": tmp_path, "out": tmp_path / "out", key: value})


@pytest.mark.parametrize(("key", "value"), [
    ("adapter_scale", -1), ("num_inference_steps", 0), ("scheduler", "euler"), ("reference_template", "{x}"),
    ("unknown", 3),
])
def test_bad_generate_params_name_the_key(key, value, tmp_path):
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        build_csm_generator({"adapter": str(tmp_path), key: value}, tmp_path, tmp_path)


def test_shipped_configs_validate():
    from synth.core.config import read_yaml, validate_config
    from synth.diffusion.pipeline_csm import CSMGenerateConfig

    root = Path(__file__).resolve().parent.parent / "configs"
    train = load_train_config(root / "train_csm.yaml")
    assert train.clip_model == "ViT-B-16" and train.clip_pretrained == "laion2b_s34b_b88k"
    generate = read_yaml(root / "generate_csm.yaml")
    assert generate["method"] == "csm"
    validate_config(CSMGenerateConfig, generate["method_params"])


def test_fusion_heads_must_divide_the_clip_width(brick_set, tiny_inpaint_model, tiny_clip, tmp_path):
    with pytest.raises(InputError, match="fusion_heads=5"):
        train_csm(_config(brick_set.root, tmp_path / "run", tiny_inpaint_model, tiny_clip, fusion_heads=5),
                  progress=False)


def test_offline_clip_tag_fails_fast_with_one_clear_error(monkeypatch):
    from open_clip.pretrained import get_pretrained_cfg

    from synth.core.clip_weights import cached_clip_checkpoint

    if cached_clip_checkpoint(get_pretrained_cfg("ViT-B-16", "laion2b_s34b_b88k")) is not None:
        pytest.skip("the real ViT-B-16 weights are cached here; the offline error cannot occur")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError,
                       match=r"'ViT-B-16'.*'laion2b_s34b_b88k'.*clip_checkpoint=/path/open_clip_model.safetensors"):
        load_clip_encoder()  # the defaults: the real hub weights
    assert time.perf_counter() - start < 10


def test_clip_loading_errors_and_local_checkpoint(tiny_clip, tmp_path):
    with pytest.raises(InputError, match="known tags"):
        load_clip_encoder("ViT-B-16", "no-such-tag")
    with pytest.raises(InputError, match="not an open_clip model"):
        load_clip_encoder("ViT-Q-99", "random")
    with pytest.raises(InputError, match="clip_checkpoint.*not found"):
        load_clip_encoder(tiny_clip, "random", tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    source = load_clip_encoder(tiny_clip, "random", seed=3)
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    from_file = load_clip_encoder(tiny_clip, "random", path, seed=9)
    reference = source.model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in from_file.model.state_dict().items())
    features = from_file.encode_image(torch.rand(2, 3, 48, 48))  # resized to the CLIP input size
    assert features.tokens.shape == (2, 64, 32) and features.grid == (8, 8)
    text = from_file.encode_text(["a photo of a scratch"])
    assert text.tokens.shape == (1, 32, 32) and 2 < int(text.valid.sum()) < 32
