"""``pipelines``: the closed loop generate -> filter -> few-shot detection / classification -> realism -> report.

Subcommand ``run CONFIG`` runs the stages a pipeline config enables (see configs/pipeline_toy.yaml) and writes
OUT/report.html (self-contained) and OUT/results.json. Finished stages are cached under OUT/stages/ by a hash of
their settings: rerunning the same command reuses them, a changed section recomputes only what depends on it.

Subcommand ``demo`` runs the decision table (configs/demo_decision.yaml) on a small set it makes from bundled
photos, end to end in about two minutes on a CPU, and prints where the report is.

Example:
    pipelines demo --out demo_out
    synth toyset --out toy && pipelines run configs/pipeline_toy.yaml
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from synth import __version__
from synth.core.cli_utils import add_common_arguments, run_cli
from synth.core.errors import InputError

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo_decision.yaml"


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.run import load_pipeline_config, run_pipeline

    overrides = {"out": args.out, "seed": args.seed, "data": args.data, "name": args.name}
    loaded = load_pipeline_config(args.config, overrides)
    result = run_pipeline(loaded, progress=not args.quiet)
    print(result["report"])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.run import load_pipeline_config, run_pipeline
    from synth.toyset import make_texture_defect_set

    out = args.out.resolve()
    if out.exists() and not out.is_dir():  # before anything is made: the demo writes only under --out
        raise InputError(f"{out}: output path exists and is a file; choose a folder (--out DIR).")
    data = out / "data"
    if not (data / "manifest.jsonl").is_file():
        # 48 normal gravel crops (24 train, 24 test), 13 planted defects per class: k up to 3 leaves 10 to evaluate.
        make_texture_defect_set(data, texture="gravel", size=64, n_train=24, n_test_good=24, n_test_per_class=13,
                                seed=0)
    loaded = load_pipeline_config(DEMO_CONFIG, {"out": out, "data": data, "seed": args.seed})
    result = run_pipeline(loaded, progress=not args.quiet)
    for verdict in (result.get("decision") or {}).get("verdicts", []):
        if "gain" in verdict:
            print(f"{verdict['task']:>14} k={verdict['k']}: best arm {verdict['best_arm']:<16} "
                  f"real+synthetic - real = {verdict['gain']:+.3f} (seed spread {verdict['spread']:.3f})")
    print(f"report: {result['report']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipelines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pixelvision {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run a pipeline config and write report.html + results.json",
                         description="Run the stages of a pipeline config; prints the path of report.html.")
    run.add_argument("config", type=Path, help="pipeline YAML (configs/pipeline_*.yaml)")
    run.add_argument("--out", type=Path, help="output folder (overrides the config's 'out')")
    run.add_argument("--data", type=Path, help="MVTec-layout data folder (overrides the config's 'data')")
    run.add_argument("--name", help="run name shown in the report (overrides the config's 'name')")
    run.add_argument("--seed", type=int, help="top-level seed (overrides the config's 'seed')")
    add_common_arguments(run)
    demo = sub.add_parser("demo", help="the decision table end to end on bundled photos (about two minutes)",
                          description="Make a small defect set from bundled photos, run the decision table on it "
                                      "and print where report.html is.")
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    demo.add_argument("--seed", type=int, help="top-level seed (default: the config's)")
    add_common_arguments(demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv, {"run": cmd_run, "demo": cmd_demo})


if __name__ == "__main__":
    raise SystemExit(main())
