"""``pipelines run``: the report (fake results), stage caching (stage functions swapped), config errors, end to end."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from pipelines import run as run_module
from pipelines.cli import main
from pipelines.report import SECTIONS, redact, redact_text, write_report
from pipelines.run import derive_seed, load_pipeline_config, plan_stages, run_pipeline
from synth.core.errors import ConfigError

# The decision section is drawn only when that stage ran (these results have none).
DRAWN = [s for s in SECTIONS if s != "decision"]

REPO = Path(__file__).resolve().parent.parent
HF_TOKEN = "hf_" + "A1b2C3d4E5f6G7h8I9j0K1l2"
SK_KEY = "sk-" + "proj0123456789abcdefghij"


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------

def _fake_result(brick_set, with_everything: bool = True) -> dict:
    config = {"name": "fake", "seed": 3, "data": str(brick_set.root), "out": "x",
              "generate": {"method": "draem", "n": 4, "method_params": {"api_key": SK_KEY}},
              "filter": {"embedder": "dinov2", "hub_token": HF_TOKEN}}
    text = yaml.safe_dump(config, sort_keys=False) + f"note: uses {HF_TOKEN} inline\n"
    result = {
        "name": "fake <pipeline>", "data": str(brick_set.root), "out": "x", "config_source": "fake.yaml",
        "config_text": text, "config": config, "seeds": {"seed": 3, "stages": {"generate": {"seed": 11,
                                                                                             "from": "derived"}}},
        "stages": {"generate": {"status": "ran", "hash": "abc", "elapsed_s": 1.0, "seed": 11},
                   "fewshot": {"status": "not run"}},
        "synthetic_sets": {"toy planted": str(brick_set.root)},
        "report_options": {"samples": 4},
    }
    if not with_everything:
        return result
    shots = [1, 2, "all"]
    rows, roc = [], {}
    for model in ("patchcore", "draem"):
        for synthetic in ("none", "threshold"):
            for i, k in enumerate(shots):
                rows.append({"model": model, "k": k, "k_images": 16 if k == "all" else k, "synthetic": synthetic,
                             "image_auroc": 0.6 + 0.1 * i, "pixel_auroc": None if model == "draem" else 0.7,
                             "image_f1": 0.5 + 0.05 * i, "threshold": 0.3, "fit_s": 0.1, "seed": 5})
                roc[f"{model}|{synthetic}|k={k}"] = {"fpr": [0, 0.5, 1], "tpr": [0, 0.8, 1]}
    result["fewshot"] = {"kind": "fewshot", "shots": shots, "rows": rows, "roc": roc, "synthetic_set": None,
                         "config": {}, "test_counts": {"good": 8, "scratch": 8, "spot": 8}}
    result["classification"] = {
        "kind": "classification", "classes": ["scratch", "spot"],
        "split": {"scratch": {"generation": ["a"], "test": ["b", "c"]}, "spot": {"generation": ["d"], "test": ["e"]}},
        "methods": {"synthetic:paste": {"per_class": {"scratch": 1.0, "spot": 0.5}, "mean_accuracy": 0.75,
                                        "overall_accuracy": 0.8, "confusion": [[2, 0], [1, 1]], "n_train": 8},
                    "real_only": {"per_class": {"scratch": 0.5, "spot": 0.5}, "mean_accuracy": 0.5,
                                  "overall_accuracy": 0.5, "confusion": [[1, 1], [1, 1]], "n_train": 2}},
        "generated_sets": {}, "seeds": {"seed": 1}, "config": {}}
    result["realism"] = {"reference": "all real test defects", "options": {"backbone": "lite0"},
                         "sets": {"toy planted": {"kid_mean": 0.0123, "kid_std": 0.001, "ic_lpips": 0.3,
                                                  "ic_lpips_clusters": 2, "n_real": 4, "n_generated": 4,
                                                  "crop_to_mask": True}}}
    return result


def test_report_has_every_section_embeds_images_and_redacts_secrets(tmp_path, brick_set):
    path = write_report(_fake_result(brick_set), tmp_path)
    page = path.read_text(encoding="utf-8")
    for section in DRAWN:
        assert f"<section id='{section}'>" in page
    # samples grid, few-shot curves, ROC grid, confusion matrices: four inline PNGs, no file references.
    assert page.count("src='data:image/png;base64,") == 4
    links = re.findall(r"(?:src|href)\s*=\s*['\"]([^'\"]*)['\"]", page)
    assert len(links) == 4 + len(DRAWN)
    assert all(link.startswith(("data:image/png;base64,", "#")) for link in links), "only data URIs and anchors"
    assert not re.search(r"(?:src|href)\s*=\s*[^'\"\s]", page)  # no unquoted ones
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page).lower()
    assert "http" not in text and "<script" not in text and "<link" not in text and "url(" not in text
    assert "fake &lt;pipeline&gt;" in page and "fake <pipeline>" not in page  # escaped
    results = json.loads((tmp_path / "results.json").read_text())
    for text in (page, json.dumps(results)):
        assert HF_TOKEN not in text and SK_KEY not in text
        assert "***" in text
    assert results["classification"]["methods"]["synthetic:paste"]["mean_accuracy"] == 0.75
    assert len(results["fewshot"]["rows"]) == 12
    fewshot = page.split("<section id='fewshot'>")[1].split("</section>")[0]
    assert "not run" not in fewshot
    assert "every test image defective gives image F1 0.800" in fewshot  # 2 * 16 / (2 * 16 + 8)


def test_report_marks_missing_stages_not_run(tmp_path, brick_set):
    page = write_report(_fake_result(brick_set, with_everything=False), tmp_path).read_text()
    for section in ("fewshot", "roc", "classification", "realism"):
        body = page.split(f"<section id='{section}'>")[1].split("</section>")[0]
        assert "not run" in body, section
    assert page.count("data:image/png;base64,") == 1  # only the sample grid


def test_redaction_rules():
    assert redact({"API_KEY": "x", "nested": [{"hub_token": "y", "client_secret": "z", "keep": 3}]}) == \
        {"API_KEY": "***", "nested": [{"hub_token": "***", "client_secret": "***", "keep": 3}]}
    assert redact({"path": f"/a/{HF_TOKEN}/b"}) == {"path": "/a/***/b"}
    text = redact_text(f"name: x\n  openai_api_key: {SK_KEY}\n- token: abc\nseed: 1\n")
    assert SK_KEY not in text and "abc" not in text and "name: x" in text and "seed: 1" in text


# --------------------------------------------------------------------------------------------------
# stage plan, caching and config errors (stage functions swapped for counters)
# --------------------------------------------------------------------------------------------------

def _config(tmp_path: Path, data: Path, **sections) -> dict:
    base = {"name": "cache", "seed": 7, "data": str(data), "out": str(tmp_path / "out"),
            "generate": {"method": "perlin", "n": 4}, "filter": {"embedder": "lite0", "stage1_ratio": 0.5},
            "classification": {"n_per_class": 3, "steps": 1, "image_size": 32}, "realism": True}
    base.update(sections)
    return base


@pytest.fixture
def counting_stages(monkeypatch):
    calls: dict[str, int] = {}

    def fake(name):
        def stage(ctx):
            calls[name] = calls.get(name, 0) + 1
            assert ctx.plan.dir.is_dir()
            assert set(ctx.deps) == set(ctx.plan.deps)
            out = {"stage": name, "seed": ctx.plan.seed, "deps": {k: v.get("stage") for k, v in ctx.deps.items()}}
            if name in ("generate", "filter"):
                out.update(set=str(ctx.plan.dir / "set"), method="perlin")
            units = ctx.plan.dir / "work" / "units"
            out["units_found"] = sorted(p.name for p in units.glob("*.json")) if units.is_dir() else []
            units.mkdir(parents=True, exist_ok=True)
            (units / f"{ctx.plan.hash[:12]}.json").write_text("{}")
            return out
        return stage

    for name, stage in run_module.STAGE_DEFINITIONS.items():
        monkeypatch.setitem(run_module.STAGE_DEFINITIONS, name, replace(stage, run=fake(name)))
    return calls


def test_each_stage_is_defined_beside_its_module():
    """The stage table maps each name to the module whose PIPELINE_STAGES defines it (its function lives
    there too); a swapped stage can be deleted back to its definition; an unknown name is refused."""
    import importlib

    table = run_module.STAGE_DEFINITIONS
    assert list(table) == list(run_module.STAGES[:-1])
    for name, module_name in table._modules.items():
        module = importlib.import_module(module_name)
        assert table[name] is module.PIPELINE_STAGES[name]
        assert table[name].run.__module__ == module_name, name
    swapped = replace(table["decision"], warm=False)
    table["decision"] = swapped
    try:
        assert table["decision"] is swapped
    finally:
        del table["decision"]
    assert table["decision"].warm is True
    with pytest.raises(KeyError, match="not a pipeline stage"):
        table["bogus"] = swapped


def test_loading_a_config_imports_only_the_section_stages(tmp_path, brick_set, monkeypatch):
    """Validating a config needs the section models only: the realism stage (torch, timm) is not imported."""
    fresh = run_module.StageTable(run_module.STAGE_DEFINITIONS._modules)
    monkeypatch.setattr(run_module, "STAGE_DEFINITIONS", fresh)
    load_pipeline_config(data=_config(tmp_path, brick_set.root))
    assert set(fresh._stages) == {"generate", "filter", "classification"}


def _hashes(config: dict) -> dict[str, str]:
    return {p.name: p.hash for p in plan_stages(load_pipeline_config(data=config))}


def test_hash_changes_propagate_downstream_only(tmp_path, brick_set):
    config = _config(tmp_path, brick_set.root)
    base = _hashes(config)
    assert list(base) == ["generate", "filter", "classification", "realism"]
    assert base == _hashes(config)  # deterministic

    changed = _hashes(_config(tmp_path, brick_set.root, generate={"method": "perlin", "n": 5}))
    assert {s for s in base if base[s] != changed[s]} == {"generate", "filter", "realism"}
    changed = _hashes(_config(tmp_path, brick_set.root, classification={"n_per_class": 4, "steps": 1,
                                                                         "image_size": 32}))
    assert {s for s in base if base[s] != changed[s]} == {"classification", "realism"}
    changed = _hashes({**config, "seed": 8})
    assert all(base[s] != changed[s] for s in base)
    # Output folder and report options are not part of any stage.
    assert _hashes({**config, "report": {"samples": 2}}) == base


def test_data_change_invalidates_stages(tmp_path, brick_set):
    data = tmp_path / "data"
    shutil.copytree(brick_set.root, data)
    config = _config(tmp_path, data)
    before = _hashes(config)
    extra = next((data / "test" / "spot").iterdir())
    shutil.copy(extra, data / "test" / "spot" / "copy_of_one.png")
    after = _hashes(config)
    # The generator only reads train/good; every stage that reads the real defects recomputes.
    assert {s for s in before if before[s] != after[s]} == {"filter", "classification", "realism"}
    shutil.copy(next((data / "train" / "good").iterdir()), data / "train" / "good" / "copy_of_one.png")
    assert all(before[s] != h for s, h in _hashes(config).items())


def test_fewshot_gets_the_shared_set_only_when_it_asks_for_none_of_its_own(tmp_path, brick_set):
    base = {"data": str(brick_set.root), "out": str(tmp_path / "o"), "generate": {"n": 4}, "realism": True}

    def deps(fewshot: dict, **extra) -> dict[str, list[str]]:
        plans = plan_stages(load_pipeline_config(data={**base, "fewshot": fewshot, **extra}))
        return {p.name: sorted(p.deps) for p in plans}

    shared = deps({"models": ["patchcore"]})
    assert shared["fewshot"] == ["generate"] and shared["realism"] == ["generate"]
    # Its own set (per shot subset, or a named one, or none at all): no dependency on the shared set.
    own = deps({"models": ["patchcore"], "synthetic_from": "shots"})
    assert own["fewshot"] == []
    assert deps({"models": ["patchcore"], "synthetic_set": None})["fewshot"] == []
    assert deps({"models": ["patchcore"], "synthetic": ["none"]})["fewshot"] == []
    # Without a generate section the few-shot stage makes its own set, which the realism stage measures.
    alone = deps({"models": ["patchcore"]}, generate=None)
    assert alone == {"fewshot": [], "realism": ["fewshot"]}
    loaded = load_pipeline_config(data={**base, "fewshot": {"models": ["patchcore"]}})
    assert str(loaded.sections["fewshot"].synthetic_set) == "__pipeline_stage__"  # filled in when the stage runs


def test_rerun_reuses_and_changes_recompute_affected_stages(tmp_path, brick_set, counting_stages, capsys):
    config = _config(tmp_path, brick_set.root)
    result = run_pipeline(load_pipeline_config(data=config), progress=True)
    assert counting_stages == {"generate": 1, "filter": 1, "classification": 1, "realism": 1}
    assert {s["status"] for s in result["stages"].values()} == {"ran", "not run"}
    assert result["stages"]["fewshot"] == {"status": "not run"}
    assert result["realism"]["deps"] == {"filter": "filter", "classification": "classification"}
    assert result["generate"]["seed"] == derive_seed(7, "generate")
    done = sorted(p.parent.name for p in (tmp_path / "out" / "stages").glob("*/done.json"))
    assert [d.rsplit("-", 1)[0] for d in done] == ["classification", "filter", "generate", "realism"]
    assert all(len(d.rsplit("-", 1)[1]) == 12 for d in done)
    assert Path(result["report"]).is_file()
    capsys.readouterr()

    result = run_pipeline(load_pipeline_config(data=config), progress=True)
    assert counting_stages == {"generate": 1, "filter": 1, "classification": 1, "realism": 1}
    assert all(result["stages"][s]["status"] == "reused" for s in ("generate", "filter", "classification"))
    assert capsys.readouterr().err.count("reused") == 4

    run_pipeline(load_pipeline_config(data=_config(tmp_path, brick_set.root, generate={"method": "perlin", "n": 5})),
                 progress=False)
    assert counting_stages == {"generate": 2, "filter": 2, "classification": 1, "realism": 2}
    assert capsys.readouterr().err == ""  # progress=False prints nothing

    # Going back to the first settings finds their finished stages again.
    run_pipeline(load_pipeline_config(data=config), progress=False)
    assert counting_stages == {"generate": 2, "filter": 2, "classification": 1, "realism": 2}


def test_changed_section_starts_from_the_previous_finished_units(tmp_path, brick_set, counting_stages, capsys):
    config = _config(tmp_path, brick_set.root, filter=None, realism=False)
    first = run_pipeline(load_pipeline_config(data=config), progress=False)
    assert first["classification"]["units_found"] == []
    changed = _config(tmp_path, brick_set.root, filter=None, realism=False,
                      classification={"n_per_class": 4, "steps": 1, "image_size": 32})
    second = run_pipeline(load_pipeline_config(data=changed), progress=True)
    # The classification pipeline finds the first run's units in its new folder (and decides by key what fits).
    assert second["classification"]["units_found"] == [f"{first['stages']['classification']['hash']}.json"]
    assert "copied in" in capsys.readouterr().err
    assert second["stages"]["generate"]["status"] == "reused"
    assert counting_stages == {"generate": 1, "classification": 2}


def test_killed_stage_reruns(tmp_path, brick_set, counting_stages, monkeypatch):
    config = _config(tmp_path, brick_set.root, filter=None, classification=None, realism=False)

    def crash(ctx):
        raise KeyboardInterrupt

    original = run_module.STAGE_DEFINITIONS["generate"]
    monkeypatch.setitem(run_module.STAGE_DEFINITIONS, "generate", replace(original, run=crash))
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(load_pipeline_config(data=config), progress=False)
    assert not list((tmp_path / "out" / "stages").glob("*/done.json"))
    monkeypatch.setitem(run_module.STAGE_DEFINITIONS, "generate", original)
    result = run_pipeline(load_pipeline_config(data=config), progress=False)
    assert result["stages"]["generate"]["status"] == "ran" and counting_stages == {"generate": 1}


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.mark.parametrize(("change", "named"), [
    ({"classification": {"n_per_clas": 3}}, "classification.n_per_clas"),
    ({"classification": {"n_per_class": -1}}, "classification.n_per_class"),
    ({"classification": {"data": "elsewhere"}}, "classification.data"),
    ({"genrate": {"n": 3}}, "genrate"),
    ({"generate": {"method": "paste"}}, "generate.masks"),
    ({"realism": {"max_images": 1}}, "realism.max_images"),
])
def test_bad_config_exits_2_naming_the_key(tmp_path, brick_set, capsys, change, named):
    config = {"data": str(brick_set.root), "out": str(tmp_path / "out"), **change}
    code = main(["run", str(_write(tmp_path / "bad.yaml", config)), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"'{named}'" in err and "bad.yaml" in err
    assert "Traceback" not in err


def test_missing_data_key_and_file(tmp_path, capsys):
    assert main(["run", str(_write(tmp_path / "c.yaml", {"out": "x"}))]) == 2
    assert "key 'data'" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="filter"):
        load_pipeline_config(data={"data": ".", "out": "o", "filter": {"embedder": "lite0"}})


# --------------------------------------------------------------------------------------------------
# end to end on the brick toy set with tiny budgets
# --------------------------------------------------------------------------------------------------

def test_end_to_end_toy_config(tmp_path, brick_set, capsys):
    pytest.importorskip("pipelines.fewshot")
    config = yaml.safe_load((REPO / "configs" / "pipeline_toy.yaml").read_text())
    config.update(data=str(brick_set.root), out=str(tmp_path / "run"))
    config_path = _write(tmp_path / "toy.yaml", config)
    started, cpu_started = time.perf_counter(), time.process_time()
    assert main(["run", str(config_path), "--quiet"]) == 0
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    out = capsys.readouterr().out.strip().splitlines()
    report = Path(out[-1])
    assert report == tmp_path / "run" / "report.html" and report.is_file()
    # CPU seconds of this process: what the pipeline costs, whatever else the machine is running.
    assert cpu < 60, f"toy pipeline took {cpu:.1f} CPU s ({wall:.1f} s wall)"

    page = report.read_text(encoding="utf-8")
    for section in DRAWN:
        body = page.split(f"<section id='{section}'>")[1].split("</section>")[0]
        assert "not run" not in body and "could not be drawn" not in body, section
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    stages = ("generate", "filter", "fewshot", "classification", "realism")
    assert {s: results["stages"][s]["status"] for s in stages} == dict.fromkeys(stages, "ran")
    # Every stage's record has exactly the fields its typed result declares (what the report reads).
    from pipelines.classification import ClassificationResult
    from pipelines.fewshot import FewShotResult
    from pipelines.realism import RealismResult
    from pipelines.run import RunResult
    from pipelines.synthetic_stages import FilterResult, GenerateResult

    typed = {"generate": GenerateResult, "filter": FilterResult, "fewshot": FewShotResult,
             "classification": ClassificationResult, "realism": RealismResult}
    for stage, declared in typed.items():
        assert set(results[stage]) == set(declared.__annotations__), stage
    assert set(results) == set(RunResult.__annotations__) - {"report"}
    # The few-shot stage got the filtered shared set, and the report shows it and the classification sets.
    assert results["fewshot"]["synthetic_set"] == results["filter"]["set"]
    assert set(results["synthetic_sets"]) == {"filter:draem", "classification:synthetic:paste",
                                              "classification:crop_paste"}
    assert page.count("data:image/png;base64,") == 3 + 1 + 1 + 1  # 3 sample grids, curves, ROC, confusion
    rows = results["fewshot"]["rows"]
    assert {(r["model"], r["synthetic"]) for r in rows if r.get("skipped")} == {("patchcore", "train")}
    done = [r for r in rows if not r.get("skipped")]
    assert len(done) == 15 and not any(r.get("error") for r in rows)
    assert all(0.0 <= r["image_auroc"] <= 1.0 and 0.0 <= r["pixel_auroc"] <= 1.0 for r in done)
    # PatchCore on planted spots/scratches: far above chance (0.5) even from one normal image.
    assert min(r["image_auroc"] for r in done if r["model"] == "patchcore") > 0.8
    methods = results["classification"]["methods"]
    # Two planted classes (spot: dark ellipse, scratch: bright line): chance is 0.5.
    synthetic = next(v for k, v in methods.items() if k.startswith("synthetic:"))
    assert synthetic["mean_accuracy"] > 0.5
    for metrics in results["realism"]["sets"].values():
        assert metrics["kid_mean"] == pytest.approx(metrics["kid_mean"])  # a number, not NaN/None
        assert metrics["ic_lpips"] >= 0

    # Same command again: nothing recomputed, same numbers.
    assert main(["run", str(config_path)]) == 0
    err = capsys.readouterr().err
    assert err.count("reused") == 5 and "running" not in err
    again = json.loads((tmp_path / "run" / "results.json").read_text())
    assert again["classification"]["methods"] == methods and again["fewshot"]["rows"] == rows


# --------------------------------------------------------------------------------------------------
# scripts/run_real_benchmark.sh
# --------------------------------------------------------------------------------------------------

SCRIPT = REPO / "scripts" / "run_real_benchmark.sh"


def test_benchmark_script_usage_errors(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 2 and "usage:" in done.stderr
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "not an MVTec-layout folder" in done.stderr


def test_benchmark_script_runs_a_config_on_any_folder(tmp_path, brick_set):
    # A cheap template (generate + report) stands in for the magnetic-tile settings.
    template = _write(tmp_path / "template.yaml", {"name": "t", "data": "x", "out": "y",
                                                   "generate": {"method": "cutpaste", "n": 3},
                                                   "classification": {"n_per_class": 2}})
    data = tmp_path / "one_class"
    shutil.copytree(brick_set.root, data, ignore=shutil.ignore_patterns("scratch*", "manifest.jsonl"))
    env = {**os.environ, "PIPELINE_CONFIG": str(template), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(SCRIPT), str(data), str(tmp_path / "bench")], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"report: {tmp_path / 'bench' / 'report.html'}" in done.stdout
    assert "classification needs 2, switched off" in done.stderr  # only 'spot' is left
    config = yaml.safe_load((tmp_path / "bench" / "benchmark_config.yaml").read_text())
    assert config["data"] == str(data) and config["name"] == "one_class" and config["classification"] is None
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert results["stages"]["generate"]["status"] == "ran" and results["generate"]["defect_samples"] == 3
