"""The reference-parity table (scripts/bench_vs_anomalib.py): every model gets a row, the verdict, resumption.

Anomalib itself is not installed here; these check the table logic on hand-made cells.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench_vs_anomalib as bva  # noqa: E402


def args(**overrides: object) -> argparse.Namespace:
    values = {"data": Path("data"), "models": list(bva.MODELS), "train": 50, "good": 25, "defect": 25,
              "image_size": 128, "seeds": 3}
    values.update(overrides)
    return argparse.Namespace(**values)


def cell(model: str, side: str, image: float, pixel: float | None, std: float = 0.0) -> dict:
    return {"model": model, "side": side, "image_auroc": image, "image_auroc_std": std, "pixel_auroc": pixel,
            "pixel_auroc_std": std if pixel is not None else None, "aupro": pixel, "aupro_std": None,
            "fit_s": 1.0, "predict_ips": 10.0, "peak_rss_mb": 1000.0, "seeds": 3, "train": 50, "test": 50,
            "image_size": 128, "budget": bva.BUDGET.get(model, {}),
            "load": {"load_average_max": 1.5, "quiet": True}}


def test_every_model_has_an_adapter_or_a_reason() -> None:
    assert len(bva.MODELS) == 21
    for name in bva.MODELS:
        assert (name in bva.ADAPTERS) != (name in bva.NOT_COMPARABLE), name
        if name in bva.NOT_COMPARABLE:
            assert bva.NOT_COMPARABLE[name].startswith("not comparable offline: ")


def test_verdict_flags_worse_only_beyond_two_points_and_the_seed_spread() -> None:
    theirs = cell("stfpm", "anomalib", 0.80, 0.90)
    assert "worse (image)" in bva.verdict(cell("stfpm", "ours", 0.75, 0.90), theirs)
    assert "worse" not in bva.verdict(cell("stfpm", "ours", 0.79, 0.89), theirs)  # within 2 points
    # 5 points down but the two sides' seeds spread by 5 points each: not established
    assert "worse" not in bva.verdict(cell("stfpm", "ours", 0.75, 0.90, std=0.05), cell("stfpm", "anomalib", 0.80,
                                                                                        0.90, std=0.05))
    assert "worse (pixel)" in bva.verdict(cell("stfpm", "ours", 0.80, 0.80), theirs)
    assert bva.verdict(cell("dfkde", "ours", 0.5, None), cell("dfkde", "anomalib", 0.5, None)).endswith("n/a")


def test_table_has_a_row_for_every_model_in_table_order() -> None:
    cells = {("padim", "ours"): cell("padim", "ours", 0.8, 0.7),
             ("padim", "anomalib"): {"model": "padim", "side": "anomalib", "error": "RuntimeError: boom"}}
    table = bva.markdown(cells, args(models=["stfpm", "padim", "dinomaly"]))
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert [row.split(" | ")[0] for row in rows] == ["| padim", "| padim", "| stfpm", "| stfpm", "| dinomaly"]
    assert "failed: RuntimeError: boom" in rows[1]
    assert "not run yet" in rows[2]
    assert bva.NOT_COMPARABLE["dinomaly"] in rows[4]


def test_a_cell_reruns_when_its_settings_changed(tmp_path: Path) -> None:
    path = tmp_path / "stfpm__ours.json"
    assert not bva._finished(path, args())
    path.write_text(json.dumps(cell("stfpm", "ours", 0.8, 0.7)), encoding="utf-8")
    assert bva._finished(path, args())
    assert not bva._finished(path, args(seeds=5))
    assert not bva._finished(path, args(image_size=256))
    path.write_text(json.dumps({"model": "stfpm", "side": "ours", "error": "x"}), encoding="utf-8")
    assert bva._finished(path, args())  # an error row stays until its file is deleted
