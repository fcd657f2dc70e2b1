"""Markdown tables of a decision-table run (``pipelines run`` with a ``decision:`` section), for the README.

    python scripts/decision_tables.py runs/decision_magnetic_tile/results.json \
        --out scripts/results/decision_magnetic_tile/tables.md

Prints (and with ``--out`` writes) one table per metric (rows: arms, columns: k, mean ± std over repeats), the
verdicts (real+synthetic vs real, gain vs the larger seed spread), the leak check and the stage's run time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipelines.decision import ARM_SET, K_FREE_ARMS, decision_table

METRICS = {
    "classification": [("mean_accuracy", "mean per-class accuracy")],
    "detection": [("image_auroc", "image AUROC"), ("image_fpr", "FPR at the detector's own threshold"),
                  ("image_recall", "recall at that threshold"), ("image_f1", "F1 at that threshold"),
                  ("pixel_ap", "pixel AP (segmentation)"), ("aupro", "AUPRO (segmentation)")],
}


def _verdict_line(verdict: dict) -> str:
    head = f"- {verdict['task']} ({verdict['metric']}), k = {verdict['k']}: best arm {verdict['best_arm']} " \
           f"{verdict['best']:.3f}"
    if "gain" not in verdict:
        return head
    outcome = ("pays" if verdict["synthetic_pays"] else "loses" if verdict["synthetic_loses"]
               else "within the seed spread")
    return (f"{head}; real+synthetic {verdict['real_plus_synthetic']:.3f} vs real {verdict['real']:.3f}: "
            f"gain {verdict['gain']:+.3f}, spread {verdict['spread']:.3f} -> {outcome}")


def tables_markdown(result: dict) -> str:
    """The markdown block for one ``results.json`` of a run with the decision stage."""
    summary = result["decision"]
    parts = [f"Data `{summary['data']}`, classes {', '.join(summary['classes'])}; k = {summary['shots']}, "
             f"{summary['repeats']} repeats; decision stage {summary['elapsed_s']:.0f} s "
             f"(stage status: {result['stages']['decision']['status']}). Leak check: {summary['leak_check']}."]
    for task in summary["tasks"]:
        for metric, label in METRICS[task]:
            parts.append(f"**{task}: {label}**\n\n{decision_table(summary, metric)}")
    # One row per synthetic set and k (real+synthetic trains on the synthetic arm's set; generic has no k).
    realism = {(ARM_SET[r["arm"]], "any" if r["arm"] in K_FREE_ARMS else r["k"]): r for r in summary["rows"]
               if r["task"] == summary["tasks"][-1] and "kid_mean" in r}
    if realism:
        lines = ["| set | k | KID | IC-LPIPS |", "|---|---|---|---|"]
        lines += [f"| {name} | {k} | {r['kid_mean']:.4f} ± {r['kid_mean_std'] or 0:.4f} | {r['ic_lpips']:.3f} |"
                  for (name, k), r in realism.items()]
        parts.append("**realism of the synthetic sets** (vs the evaluation defects; measured, never used)\n\n"
                     + "\n".join(lines))
    parts.append("**verdicts**\n\n" + "\n".join(_verdict_line(v) for v in summary["verdicts"]))
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results.json of the run")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args(argv)
    text = tables_markdown(json.loads(args.results.read_text(encoding="utf-8")))
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
