"""The learned generators through the command line: train-controlnet / train-csm, then synth generate with them.

Tiny random Stable Diffusion and CLIP models stand in for the real checkpoints (same loading path); what is
checked is the plumbing a user runs: flags, --set, resumable outputs, labeled sets with masks honoured.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("open_clip")

from synth.cli import main  # noqa: E402
from synth.core.defect_set import read_defect_set  # noqa: E402

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def _check_generated(out, normal_dir, n):
    dataset = read_defect_set(out)
    defects = [s for s in dataset if s.is_anomalous]
    assert len(defects) == n
    for sample in defects:
        image = dataset.load_image(sample)
        mask = dataset.load_mask(sample, image.shape[:2]) > 0
        assert mask.any() and sample.defect_class in ("spot", "scratch")
        from synth.core.io import read_image

        source = read_image(sample.source_image)
        assert np.array_equal(image[~mask], source[~mask]), "pixels outside the mask must be the normal image's"
    return dataset


def test_train_controlnet_then_generate_with_it(brick_set, tiny_inpaint_model, tmp_path, capsys):
    run = tmp_path / "cn"
    args = ["train-controlnet", "--data", str(brick_set.root), "--out", str(run), "--pretrained",
            str(tiny_inpaint_model), "--resolution", "64", "--train-steps", "2", "--batch-size", "2",
            "--set", "checkpoint_every=1", "--quiet"]
    assert main(args) == 0
    assert (run / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    assert main(args) == 0  # a finished run is a no-op
    assert main([*args[:-1], "--learning-rate", "0.5", "--quiet"]) == 2
    assert "learning_rate" in capsys.readouterr().err

    out = tmp_path / "gen"
    gen = ["generate", "--method", "controlnet", "--normal", str(brick_set.root / "train" / "good"), "--masks",
           str(brick_set.root / "ground_truth"), "--n", "2", "--out", str(out), "--seed", "0",
           "--set", f"controlnet={run}", "--set", "num_inference_steps=2", "--set", "guidance_scale=1.0", "--quiet"]
    assert main(gen) == 0
    dataset = _check_generated(out, brick_set.root / "train" / "good", 2)
    params = [s.params for s in dataset if s.is_anomalous]
    assert all(p["prompt"].startswith("a photo of a ") for p in params)


def test_train_csm_then_generate_with_it(brick_set, tiny_inpaint_model, tmp_path):
    clip = tmp_path / "cli-tiny-clip.json"
    clip.write_text(json.dumps(TINY_CLIP))
    run = tmp_path / "csm"
    args = ["train-csm", "--data", str(brick_set.root), "--out", str(run), "--pretrained", str(tiny_inpaint_model),
            "--clip-model", str(clip), "--clip-pretrained", "random", "--resolution", "64", "--train-steps", "2",
            "--batch-size", "2", "--set", "fusion_heads=4", "--quiet"]
    assert main(args) == 0
    assert (run / "csm_adapter.safetensors").is_file()

    out = tmp_path / "gen"
    gen = ["generate", "--method", "csm", "--normal", str(brick_set.root / "train" / "good"), "--masks",
           str(brick_set.root / "ground_truth"), "--defects", str(brick_set.root / "test"), "--n", "2", "--out",
           str(out), "--seed", "0", "--set", f"adapter={run}", "--set", "num_inference_steps=2",
           "--set", "guidance_scale=1.0", "--quiet"]
    assert main(gen) == 0
    _check_generated(out, brick_set.root / "train" / "good", 2)


def test_generate_set_values_must_be_key_value(brick_set, tmp_path, capsys):
    code = main(["generate", "--method", "perlin", "--normal", str(brick_set.root / "train" / "good"), "--n", "1",
                 "--out", str(tmp_path / "x"), "--set", "no_equals_sign", "--quiet"])
    assert code == 2 and "KEY=VALUE" in capsys.readouterr().err
