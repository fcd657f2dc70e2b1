"""The detector contract, checked for every registered model (``detect.list_models()``).

Per model, with a short seeded config (``CONTRACT[name].config``, image_size 64, seed 0): one fit in process and
one through ``detect fit`` with the same options. The CLI-fitted model, loaded with ``detect.load``, must predict
exactly what the in-process model predicts (seeding, the CLI and the round trip in two fits), and both fits must
have the same training histories. The in-process model is also saved and loaded (identical scores, maps, labels,
config and calibration), and the CLI model runs ``detect predict`` and ``detect eval``. Bad option values raise a
ConfigError naming the key (``CONTRACT[name].bad``), unknown option names a ConfigError too.

What is specific to a model (learning bars, losses, structure, the maths of its parts, real-data tests) stays in
tests/test_model_<name>.py. A new model must get an entry here: test_every_registered_model_is_in_the_contract.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import numpy as np
import pytest
import yaml
from helpers import WINCLIP_TINY_CLIP

import detect
import detect.runner
from detect.cli import main as detect_main
from synth.core.errors import ConfigError

SIZE = 64
TINY_CLIP = "<tiny-clip>"  # stands for the path of the WinCLIP tiny random CLIP config, written by a fixture
DINOMALY_TINY = {"pretrained": False, "encoder_kwargs": {"embed_dim": 64, "depth": 4, "num_heads": 2, "patch_size": 8},
                 "encoder_layers": [0, 1, 2, 3]}


@dataclass(frozen=True)
class Contract:
    """config: the short seeded options of both fits (``image_size`` and ``seed`` are added). bad: ``(key, value)``
    pairs, each a ConfigError naming ``key`` when given alone with ``bad_base``, or ``(key, value, base)`` with its
    own base options instead. anomalies: fit on the defect set's labeled defects too (``--anomalies``).
    same: detector attributes (besides the ``*history*`` ones and ``loss_terms``) equal after both fits.
    eval_auroc: the least image AUROC of ``detect eval``. own_file: why the fitted checks live in the model's
    own test file instead (the bad values are still checked here)."""

    config: dict[str, Any] = field(default_factory=dict)
    bad: list[tuple] = field(default_factory=list)
    bad_base: dict[str, Any] = field(default_factory=dict)
    anomalies: bool = False
    same: tuple[str, ...] = ()
    eval_auroc: float = 0.0
    own_file: str | None = None


CONTRACT: dict[str, Contract] = {
    # Autoencoder: augment=True, so the seeded augmentation is covered too.
    "autoencoder": Contract(
        config={"epochs": 2, "batch_size": 2, "width": 16, "lr": 1e-3, "augment": True},
        bad=[("epochs", 0), ("lr", 0.0), ("width", 0), ("latent_dim", 0), ("bottleneck", "vae"), ("loss", "l1"),
             ("ssim_weight", -1.0), ("map_mode", "max"), ("score_mode", "mean"), ("topk_percent", 0.0),
             ("blur_sigma", -1.0), ("weight_decay", -1.0), ("image_size", 60)]),
    "cfa": Contract(
        config={"epochs": 2},
        bad=[("epochs", 0), ("lr", 0.0), ("weight_decay", -1.0), ("gamma_c", 0), ("gamma_d", 0), ("k_nearest", 0),
             ("j_repulsion", -1), ("radius", -0.1), ("alpha", -0.1), ("layers", []),
             ("gamma_d", 10_000)]),  # more than the backbone's channels
    "cflow": Contract(
        config={"epochs": 2},
        bad=[("epochs", 0), ("lr", -1.0), ("coupling_blocks", 0), ("clamp", 0.0), ("condition_vector", 130),
             ("fiber_batch_size", 1), ("layers", []), ("permute_soft", "no"), ("actnorm_init", 1),
             ("blur_sigma", 99.0)]),
    "csflow": Contract(
        config={"hidden_channels": 32, "batch_size": 4, "epochs": 2, "lr": 2e-3},
        bad=[("epochs", 0), ("lr", 0.0), ("layers", [2, 3]), ("layers", []), ("n_scales", 1),
             ("n_coupling_blocks", 0), ("hidden_channels", 0), ("clamp", 0.0), ("feature_pool", 2),
             ("weight_decay", -1.0), ("adam_eps", 0.0), ("clip_grad_norm", 0.0), ("blur_sigma", -1.0),
             ("n_scales", 4, {"image_size": 64})]),  # the 1/8 scale would be 8 px
    # The memory models cross-fit their threshold: 2 folds here (8 by default, checked in test_calibration.py).
    "dfkde": Contract(
        config={"layers": [2], "calibration_folds": 2},
        bad=[("feature_scaling", "minmax"), ("n_components", 0), ("max_training_points", 1)]),
    "dfm": Contract(
        config={"pooling_kernel": 1, "calibration_folds": 2},
        bad=[("pca_level", 1.5), ("score_type", "mahalanobis"), ("pooling_kernel", 0)]),
    "dinomaly": Contract(
        config={**DINOMALY_TINY, "epochs": 2, "batch_size": 8},
        bad_base={"image_size": SIZE, **DINOMALY_TINY},
        bad=[("epochs", 0), ("lr", 0.0), ("final_lr", 1.0),
             ("encoder", "no_such_vit", {"image_size": SIZE, "pretrained": False}),
             ("encoder", "resnet18", {"image_size": SIZE, "pretrained": False}),
             ("encoder_layers", []), ("encoder_layers", [3, 1]), ("encoder_layers", [0, 9]), ("num_groups", 0),
             ("num_groups", 5), ("encoder_size", -14), ("bottleneck_dropout", 1.0), ("hard_mining_p", 1.0),
             ("hard_mining_factor", 2.0), ("topk_ratio", 0.0), ("blur_sigma", -1.0),
             ("encoder_kwargs", {"depth": "x"}), ("clip_grad_norm", 0.0), ("warmup_fraction", 1.0)]),
    "draem": Contract(
        config={"epochs": 2, "batch_size": 4, "reconstructive_width": 8, "discriminative_width": 8},
        bad=[("epochs", 0), ("lr", 0.0), ("reconstructive_width", 0), ("discriminative_width", 1.5),
             ("p_anomaly", 1.5), ("beta_range", [0.8, 0.2]), ("beta_range", [0.0]), ("real_anomaly_ratio", -0.1),
             ("score_window", 4), ("score_window", 0), ("anomaly_source", "")]),
    # DSR: one epoch per stage (all three stages run).
    "dsr": Contract(
        config={"batch_size": 2, "embedding_dim": 16, "num_embeddings": 64, "num_hiddens": 32,
                "num_residual_hiddens": 16, "segmentation_width": 8, "vq_epochs": 1, "epochs": 1,
                "upsampling_epochs": 1},
        bad=[("image_size", 48), ("image_size", 96 + 8), ("embedding_dim", 2), ("num_embeddings", 8),
             ("num_residual_layers", -1), ("vq_epochs", 0), ("epochs", 0), ("upsampling_epochs", 0), ("vq_lr", 0.0),
             ("lr", 0.0), ("upsampling_lr", -1.0), ("commitment_cost", -0.1), ("ema_decay", 1.0),
             ("vq_augment", 1.5), ("p_anomaly", 0.0), ("anomaly_strength", 0.05), ("anomaly_strength", 1.5),
             ("anomaly_source", ""), ("score_kernel", 4), ("segmentation_width", 0)]),
    # EfficientAD: teacher_epochs 0 (a random teacher: plumbing only); the seeded teacher distillation is checked
    # in test_model_efficientad.py. Even so the student/autoencoder find the brick defects (eval AUROC >= 0.7).
    "efficientad": Contract(
        config={"epochs": 2, "teacher_epochs": 0, "pool_size": 4}, eval_auroc=0.7,
        bad=[("model_size", "large"), ("image_size", 32), ("epochs", 0), ("lr", 0.0), ("teacher_epochs", -1),
             ("teacher_lr", 0.0), ("pool_size", 0), ("train_batch_size", 0), ("p_hard", 1.0),
             ("weight_decay", -1.0), ("blur_sigma", -1.0), ("layers", []), ("distillation_images", "")]),
    "fastflow": Contract(
        config={"epochs": 2},
        bad=[("epochs", 0), ("lr", 0.0), ("weight_decay", -1.0), ("flow_steps", 0), ("hidden_ratio", 0.0),
             ("clamp", 0.0), ("layers", []), ("layers", [3, 1]), ("blur_sigma", -1.0), ("conv3x3_only", "yes")]),
    "fre": Contract(
        config={"epochs": 2},
        bad=[("epochs", 0), ("lr", 0.0), ("pooling", 0), ("latent_dim", 0), ("score_mode", "mean"),
             ("blur_sigma", -1.0), ("layers", [2, 3]), ("layers", []),
             # At 64 px layer 3 is 112 x 4 x 4: pooling at most 4; with pooling 2, latent_dim at most 448.
             ("latent_dim", 449, {"image_size": SIZE, "pretrained": False}),
             ("pooling", 5, {"image_size": SIZE, "pretrained": False})]),
    "ganomaly": Contract(
        config={"epochs": 2, "batch_size": 4, "width": 16},
        bad=[("epochs", 0), ("lr", 0.0), ("latent_dim", 0), ("width", 0), ("extra_layers", -1), ("w_adv", -1.0),
             ("w_con", -1.0), ("w_enc", -1.0), ("beta1", 1.0), ("beta2", -0.1), ("d_reinit_threshold", -1.0),
             ("score_mode", "pixel"), ("blur_sigma", -1.0), ("image_size", 36)]),
    "padim": Contract(
        config={"blur_sigma": 1.0, "calibration_folds": 2},
        bad=[("covariance_eps", 0.0),
             ("n_features", 500, {"image_size": SIZE})]),  # more than the 176 channels of layers 1-3
    "patchcore": Contract(
        config={"calibration_folds": 2},
        bad=[("feature_dim", 0), ("coreset_ratio", 0.0), ("coreset_ratio", 1.5), ("projection_dim", 0),
             ("num_neighbors", 0), ("max_patches", 0), ("layers", []), ("image_size", 60)]),
    "reverse_distillation": Contract(
        config={"epochs": 2, "blur_sigma": 1.0},
        bad=[("epochs", 0), ("lr", 0.0), ("beta1", 1.0), ("beta2", -0.1), ("ocbe_blocks", 0),
             ("decoder_blocks", [3, 4]), ("decoder_blocks", [1, 0, 1]), ("flatten_loss", "yes"),
             ("map_mode", "max"), ("blur_sigma", -1.0), ("layers", [1, 2]), ("layers", [3, 2, 1]),
             ("layers", [1, 2, 4], {"pretrained": False})]),  # consecutive stages only
    "stfpm": Contract(
        config={"epochs": 2, "batch_size": 4},
        bad=[("epochs", 0), ("lr", 0.0), ("optimizer", "rmsprop"), ("momentum", 1.0), ("weight_decay", -1.0),
             ("map_mode", "max"), ("blur_sigma", -1.0), ("layers", []), ("layers", [3, 1])]),
    # SuperSimpleNet: supervised (every labeled defect of the set joins training, as `--anomalies` passes them);
    # its unsupervised training is covered by test_model_supersimplenet.py.
    "supersimplenet": Contract(
        config={"epochs": 1, "upscale": 1, "hidden_dim": 64}, anomalies=True,
        bad=[("epochs", 0), ("lr", 0.0), ("seg_lr", -1.0), ("cls_lr", 0.0), ("lr_gamma", 0.0), ("upscale", 0),
             ("pool_size", 2), ("hidden_dim", 0), ("noise_std", 0.0), ("noise_scale", -1.0),
             ("anomaly_probability", 0.0), ("perlin_threshold", 1.5), ("stop_grad", "yes"),
             ("clip_grad_norm", -1.0), ("flips", 1), ("truncation", -0.1), ("focal_gamma", -1.0),
             ("blur_sigma", -1.0), ("score_mode", "mean"), ("layers", []), ("layers", [3, 2]), ("steps", 0)]),
    "uflow": Contract(
        config={"epochs": 2},
        bad=[("epochs", 0), ("lr", 0.0), ("flow_steps", 0), ("clamp", -1.0), ("layers", [1, 3]), ("nfa_window", 0),
             ("nfa_probability", 1.0), ("use_nfa_threshold", "yes"), ("weight_decay", -0.1), ("hidden_ratio", 0.0),
             ("image_size", 72)]),  # the stride-16 map of 72 px is 5x5, not half of the stride-8 map's 9x9
    "uninet": Contract(
        config={"epochs": 2, "batch_size": 4, "decoder_blocks": [1, 1, 1], "bottleneck_blocks": 1,
                "blur_sigma": 1.0},
        bad=[("epochs", 0), ("lr", 0.0), ("lr_teacher", -1.0), ("temperature", 0.0), ("lambda_weight", 1.5),
             ("margin", -0.1), ("dfs", "always"), ("bottleneck_blocks", 0), ("decoder_blocks", [3, 4]),
             ("negatives", ["mixup"]), ("negatives", "draem"), ("negative_ratio", 0.0), ("alpha", 0.0),
             ("beta", 2.0), ("blur_sigma", -1.0), ("layers", [1, 2]), ("target_teacher", "yes"),
             ("layers", [1, 2, 4], {"pretrained": False})]),  # consecutive stages only
    # VLM-AD asks a vision-language server: its fits need the scripted oracle server of test_model_vlm_ad.py (and
    # an API key that must never be written or logged), so its round trip, same-seed and CLI tests live there.
    "vlm_ad": Contract(
        own_file="needs the scripted oracle VLM server and API-key checks of test_model_vlm_ad.py",
        bad=[("backend", "llama"), ("base_url", "ftp://x"), ("timeout", 0), ("max_retries", -1), ("k_shot", 9),
             ("fallback_score", 1.5), ("image_detail", "huge"), ("workers", 0), ("defect_types", [""]),
             ("dtype", "int8"), ("device", "tpu"), ("temperature", 3.0), ("max_tokens", 4),
             ("retry_backoff", -1.0)]),
    # WinCLIP+: the tiny random open_clip model (helpers.WINCLIP_TINY_CLIP), 2 reference shots.
    "winclip": Contract(
        config={"clip_model": TINY_CLIP, "pretrained": "random", "k_shot": 2, "defect_types": ["scratch", "crack"],
                "object_name": "brick"},
        same=("reference_shots",),
        bad=[("k_shot", -1), ("k_shot", 1.5), ("scales", []), ("scales", [3, 2]), ("scales", [0, 2]),
             ("object_name", ""), ("defect_types", "scratch"), ("defect_types", [""]),
             ("zero_shot_image_score", "max"), ("blur_sigma", -1.0), ("clip_model", ""), ("pretrained", 3),
             ("scales", [2, 9], {"image_size": SIZE, "clip_model": TINY_CLIP, "pretrained": "random", "seed": 0,
                                 "batch_size": 16})]),  # windows larger than the 8x8 patch grid
}
FITTED = sorted(name for name, contract in CONTRACT.items() if contract.own_file is None)


def _winclip_cli(loaded: detect.Detector) -> None:
    assert loaded.config.defect_types == ["scratch", "crack"]
    assert loaded.model.state_dict()["reference_windows_0"].shape == (2 * 49, 32)  # 2 shots x 7x7 windows of 2x2


CLI_CHECKS: dict[str, Callable[[detect.Detector], None]] = {"winclip": _winclip_cli}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("clip") / "winclip-test-tiny.json"
    path.write_text(json.dumps(WINCLIP_TINY_CLIP))
    return str(path)


def resolve(options: dict[str, Any], tiny_clip: str) -> dict[str, Any]:
    return {k: tiny_clip if v == TINY_CLIP else v for k, v in options.items()}


def set_arguments(options: dict[str, Any]) -> list[str]:
    """``--set key=value`` for every option but image_size, each value as YAML that reads back as itself."""
    out = []
    for key, value in options.items():
        if key == "image_size":
            continue
        text = json.dumps(value)  # JSON is YAML (no float here needs an exponent, which YAML 1.1 reads as text)
        if yaml.safe_load(text) != value:
            raise ValueError(f"{key}={text} does not read back as {value!r}")
        out += ["--set", f"{key}={text}"]
    return out


def histories(detector: detect.Detector, same: tuple[str, ...]) -> dict[str, Any]:
    """What a fit records: every ``*history*`` attribute, ``loss_terms`` and the contract's ``same`` attributes."""
    return {k: v for k, v in vars(detector).items() if "history" in k or k == "loss_terms" or k in same}


@dataclass
class Run:
    name: str
    in_process: detect.Detector
    cli: detect.Detector  # the detector `detect fit` trained (caught on its way out of detect.runner.fit_model)
    cli_rc: int
    out: Any  # the CLI's model folder
    prediction: detect.Prediction  # the in-process model on the test split


@pytest.fixture(scope="module", params=FITTED)
def run(request, brick_set, test_split, tiny_clip, tmp_path_factory) -> Run:
    """Per model: one fit in process, one through the CLI, same options (tests are grouped by model)."""
    name = request.param
    contract = CONTRACT[name]
    options = resolve({"image_size": SIZE, "seed": 0, **contract.config}, tiny_clip)
    anomalies = brick_set.root if contract.anomalies else None
    in_process = detect.create(name, **options).fit(brick_set.root, anomalies=anomalies, progress=False)
    out = tmp_path_factory.mktemp(f"contract_{name}") / "model"
    caught = []
    fit_model = detect.runner.fit_model

    def catch(*args, **kwargs):
        caught.append(fit_model(*args, **kwargs))
        return caught[-1]

    argv = ["fit", "-q", "--model", name, "--data", str(brick_set.root), "--out", str(out),
            "--image-size", str(SIZE), *set_arguments(options)]
    if anomalies is not None:
        argv += ["--anomalies", str(anomalies)]
    with mock.patch.object(detect.runner, "fit_model", catch):
        rc = detect_main(argv)
    return Run(name, in_process, caught[0] if caught else None, rc, out, in_process.predict(test_split[0]))


def assert_same_prediction(before: detect.Prediction, after: detect.Prediction) -> None:
    np.testing.assert_array_equal(before.scores, after.scores)
    np.testing.assert_array_equal(before.anomaly_maps, after.anomaly_maps)
    np.testing.assert_array_equal(before.labels, after.labels)
    if before.masks is not None or after.masks is not None:
        np.testing.assert_array_equal(before.masks, after.masks)


# ----- the table ----------------------------------------------------------------------------------------------------
def test_every_registered_model_is_in_the_contract():
    assert set(CONTRACT) == set(detect.list_models())
    assert all(c.bad for c in CONTRACT.values())  # every model names the key of a bad value


# ----- config errors ----------------------------------------------------------------------------------------------
# (name, key, value, base options or None for the contract's bad_base)
BAD = [(name, entry[0], entry[1], entry[2] if len(entry) > 2 else None)
       for name in sorted(CONTRACT) for entry in CONTRACT[name].bad]


@pytest.mark.parametrize(("name", "key", "value", "base"), BAD, ids=[f"{e[0]}-{e[1]}={e[2]!r}"[:60] for e in BAD])
def test_bad_value_names_the_key(name, key, value, base, tiny_clip):
    options = resolve(CONTRACT[name].bad_base if base is None else base, tiny_clip)
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        detect.create(name, **{**options, key: value})


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_unknown_option_is_a_config_error(name):
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['no_such_option'\]"):
        detect.create(name, no_such_option=1)


# ----- fitted: seeding, CLI, round trip ----------------------------------------------------------------------------
def test_cli_fit_equals_the_in_process_fit(run, test_split):
    """Same options and seed: `detect fit` trains the same model as ``create(...).fit`` (same histories), and the
    saved, loaded model predicts exactly what the in-process one does."""
    assert run.cli_rc == 0 and run.cli is not None
    contract = CONTRACT[run.name]
    expected = histories(run.in_process, contract.same)
    assert histories(run.cli, contract.same) == expected
    assert all(len(v) > 0 for k, v in expected.items() if k == "history")
    loaded = detect.load(run.out)
    assert loaded.name == run.name and isinstance(loaded, type(run.in_process))
    assert_same_prediction(run.prediction, loaded.predict(test_split[0]))
    if run.name in CLI_CHECKS:
        CLI_CHECKS[run.name](loaded)


def test_save_load_round_trip(run, test_split, tmp_path):
    fitted = run.in_process
    folder = fitted.save(tmp_path / run.name)
    assert json.loads((folder / "config.json").read_text())["model"] == run.name
    loaded = detect.load(folder)
    assert isinstance(loaded, type(fitted)) and loaded.config == fitted.config
    assert loaded.calibration == fitted.calibration and loaded.calibration is not None
    after = loaded.predict(test_split[0])
    assert run.prediction.labels is not None  # calibrated
    assert_same_prediction(run.prediction, after)


def test_cli_predict_and_eval(run, brick_set, test_split, tmp_path):
    images = [str(p) for p in test_split[0][:3]]
    assert detect_main(["predict", "-q", "--model-dir", str(run.out), *images, "--out", str(tmp_path / "pred")]) == 0
    assert len((tmp_path / "pred" / "scores.csv").read_text().splitlines()) == 1 + len(images)  # header + 1 a row
    assert detect_main(["eval", "-q", "--model-dir", str(run.out), "--data", str(brick_set.root),
                        "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["model"] == run.name and np.isfinite(metrics["image_auroc"])
    assert CONTRACT[run.name].eval_auroc <= metrics["image_auroc"] <= 1.0
