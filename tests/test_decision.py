"""The k-shot decision table (pipelines.decision) on the toy texture set, with tiny budgets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pipelines import decision as dt
from pipelines.run import load_pipeline_config, run_pipeline
from synth.core.defect_set import read_defect_set
from synth.core.errors import ConfigError, InputError
from synth.toyset import make_texture_defect_set

SHOTS = [1, 2]
TINY = {
    "shots": SHOTS, "repeats": 1, "normals": 12, "n_per_class": 8, "image_size": 64,
    "classifier": {"steps": 12, "batch_size": 8},
    "detector_options": {"steps": 16, "batch_size": 8, "hidden_dim": 16, "upscale": 1},
    "filter": {"embedder": "lite0", "image_size": 64},
    "realism": True, "realism_max_images": 6,
}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("decision") / "toy"
    make_texture_defect_set(root, texture="gravel", size=64, n_train=16, n_test_good=6, n_test_per_class=5, seed=3)
    return root


@pytest.fixture(scope="module")
def run(toy, tmp_path_factory):
    """One pipeline run with only the decision stage; returns (results.json dict, output folder)."""
    out = tmp_path_factory.mktemp("decision_run")
    loaded = load_pipeline_config(data={"name": "toy-decision", "data": str(toy), "out": str(out),
                                        "decision": dict(TINY)})
    run_pipeline(loaded, progress=False)
    return json.loads((out / "results.json").read_text()), out


def _digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def test_table_has_every_arm_task_k_and_repeat(run):
    result, out = run
    summary = result["decision"]
    assert set(summary) == set(dt.DecisionResult.__annotations__)  # the typed result the report reads
    assert summary["tasks"] == ["classification", "detection"]
    cells = {(c["task"], c["arm"], c["k"], c["repeat"]) for c in summary["cells"]}
    expected = {("classification", a, k, 0) for a in dt.CLASSIFICATION_ARMS for k in SHOTS}
    expected |= {("detection", a, k, 0) for a in dt.ARMS for k in SHOTS}
    assert cells == expected
    rows = {(r["task"], r["arm"], r["k"]) for r in summary["rows"]}
    assert rows == {c[:3] for c in expected}
    for cell in summary["cells"]:
        metrics = cell["result"]
        if cell["task"] == "classification":
            assert 0.0 <= metrics["mean_accuracy"] <= 1.0 and metrics["n_eval"] == 2 * (5 - max(SHOTS))
        else:
            for key in ("image_auroc", "image_fpr", "image_recall", "image_f1", "pixel_ap", "aupro"):
                assert metrics[key] is not None and 0.0 <= metrics[key] <= 1.0, (cell["arm"], key)
        if cell["arm"] in dt.ARM_SET:
            assert cell["realism"] is not None and cell["realism"]["kid_mean"] is not None
    # k-free arms are fitted once and shown at every k
    generic = [c["result"] for c in summary["cells"] if c["arm"] == "generic"]
    assert generic[0] == generic[1]
    assert [v["k"] for v in summary["verdicts"] if v["task"] == "classification"] == SHOTS
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.index("<section id='decision'>") < page.index("<section id='summary'>")
    assert "could not be drawn" not in page.split("<section id='decision'>")[1].split("</section>")[0]
    assert "<details>" in page.split("<section id='config'>")[1]


def test_held_out_images_never_reach_generation(run, toy):
    """Fingerprints of every file generation could read vs the evaluation images: disjoint."""
    result, out = run
    summary = result["decision"]
    assert summary["leak_check"]["shared"] == 0 and summary["leak_check"]["evaluation_images"] > 0
    dataset = read_defect_set(toy)
    work = next((out / "stages").glob("decision-*")) / "work"
    pool_size = max(SHOTS)
    split = dt.split_pool(dataset, [c for c in dataset.defect_classes if c != "good"], pool_size,
                          summary["config"]["seed"])
    held = {_digest(dataset.image_path(s)) for _pool, rest in split.values() for s in rest}
    held |= {_digest(dataset.image_path(s)) for s in dataset.select(split="test", defect_class="good")}
    read_by_generation = [p for sub in ("exemplars", "known", "normals") for p in work.rglob(f"{sub}/**/*")
                          if p.is_file() and p.suffix == ".png"]
    assert len(read_by_generation) >= 2 * sum(SHOTS) + 12
    assert not held & {_digest(p) for p in read_by_generation}
    # every synthetic image was made on one of the repeat's training normals
    normals = {p.name for p in (work / "r0" / "normals").iterdir()}
    for set_dir in work.glob("r0/k*/synthetic/set"):
        for sample in read_defect_set(set_dir).select(anomalous=True):
            assert Path(sample.source_image).name in normals


def test_real_plus_synthetic_differs_from_real_only(run):
    cells = run[0]["decision"]["cells"]
    for task in ("classification", "detection"):
        for k in SHOTS:
            real = next(c["result"] for c in cells if (c["task"], c["arm"], c["k"]) == (task, "real", k))
            mixed = next(c["result"] for c in cells if (c["task"], c["arm"], c["k"]) == (task, "real+synthetic", k))
            assert mixed["n_real"] == real["n_real"] > 0
            if task == "classification":
                assert real["n_synthetic"] == 0 and mixed["n_synthetic"] > 0
                assert mixed["synthetic_weight"] < 1.0  # real and synthetic each get half the batches
                # The models differ (at these tiny budgets both may still predict the same labels).
                assert mixed["true_class_probability"] != real["true_class_probability"]
            else:
                assert mixed["n_anomalies"] > real["n_anomalies"]
                assert mixed["image_auroc"] != real["image_auroc"] or mixed["pixel_ap"] != real["pixel_ap"]


def test_rerun_reuses_every_cell(toy, run, monkeypatch):
    result, out = run
    work = next((out / "stages").glob("decision-*")) / "work"

    def refit(*_args, **_kwargs):
        raise AssertionError("a finished cell was fitted again")

    monkeypatch.setattr(dt, "_classification_cell", refit)
    monkeypatch.setattr(dt, "_detection_cell", refit)
    cfg = dt.DecisionConfig(data=toy, seed=result["decision"]["config"]["seed"], **TINY)
    again = dt.run_decision(cfg, work, progress=False)
    assert again["rows"] == result["decision"]["rows"]


def test_known_defects_are_nested_and_evaluation_is_the_same_for_every_k(toy):
    dataset = read_defect_set(toy)
    classes = ["scratch", "spot"]
    split = dt.split_pool(dataset, classes, 3, seed=7)
    again = dt.split_pool(dataset, classes, 3, seed=7)
    assert {c: [s.image for s in p] for c, (p, _) in split.items()} == \
        {c: [s.image for s in p] for c, (p, _) in again.items()}
    for pool, rest in split.values():
        assert len(pool) == 3 and len(rest) == 2 and not {s.image for s in pool} & {s.image for s in rest}
    other = dt.split_pool(dataset, classes, 3, seed=8)
    assert any([s.image for s in split[c][0]] != [s.image for s in other[c][0]] for c in classes)
    with pytest.raises(InputError, match="need at least 6"):
        dt.split_pool(dataset, classes, 5, seed=0)


def test_bad_settings_name_the_key(toy, tmp_path):
    with pytest.raises(ConfigError, match="decision.detector"):
        load_pipeline_config(data={"data": str(toy), "out": str(tmp_path), "decision": {"detector": "padim"}})
    with pytest.raises(ConfigError, match="decision.shots"):
        load_pipeline_config(data={"data": str(toy), "out": str(tmp_path), "decision": {"shots": [0, 3]}})
    with pytest.raises(ConfigError, match="decision.data"):
        load_pipeline_config(data={"data": str(toy), "out": str(tmp_path), "decision": {"data": str(toy)}})


def test_pipelines_demo_runs_the_table_end_to_end(tmp_path, monkeypatch, capsys):
    """`pipelines demo` (README command 1): makes its data, runs the decision stage, prints the report path.
    The bundled config is swapped for a smaller one of the same shape to keep the test short."""
    import yaml

    from pipelines import cli

    config = yaml.safe_load(cli.DEMO_CONFIG.read_text())
    config["decision"].update(shots=[1], repeats=1, arms=["normals_only", "real", "real+synthetic"],
                              realism=False, classifier={"steps": 8, "batch_size": 8},
                              detector_options={"steps": 8, "batch_size": 8, "hidden_dim": 16, "upscale": 1})
    small = tmp_path / "demo.yaml"
    small.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(cli, "DEMO_CONFIG", small)
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    report = tmp_path / "demo" / "report.html"
    assert f"report: {report}" in printed and report.is_file()
    assert "classification k=1: best arm" in printed and "detection k=1" in printed
    assert (tmp_path / "demo" / "data" / "manifest.jsonl").is_file()


def test_crop_paste_skips_known_defects_with_empty_masks(tmp_path):
    """A known defect whose mask is empty (magnetic tile has such images) has nothing to crop: that class gets no
    crop & paste samples and the others still do, instead of the whole table stopping."""
    import numpy as np

    from synth.core.io import write_image

    normal, defect = tmp_path / "normal.png", tmp_path / "defect.png"
    write_image(normal, np.full((32, 32, 3), 120, np.uint8))
    write_image(defect, np.full((32, 32, 3), 20, np.uint8))
    spot = np.zeros((32, 32), bool)
    spot[10:14, 10:14] = True
    known = dt._Known({"spot": [(defect, spot)], "blank": [(defect, np.zeros((32, 32), bool))]})
    rep = dt._Repeat(index=0, seed=0, normals=[normal], normal_dir=tmp_path, pool={}, eval_images=[],
                     eval_labels=np.zeros(0, bool), eval_classes=[], eval_masks=[])
    cfg = dt.DecisionConfig(data=tmp_path, n_per_class=3)
    made = dt._crop_paste_set(cfg, known, rep, 1, tmp_path / "set")
    samples = made.select(anomalous=True)
    assert sorted({s.defect_class for s in samples}) == ["spot"] and len(samples) == 3
    assert all(made.load_mask(s).sum() == 16 for s in samples)
