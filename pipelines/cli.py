"""``pipelines``: the closed loop generate -> filter -> few-shot detection / classification -> realism -> report.

Subcommand ``run CONFIG`` runs the stages a pipeline config enables (see configs/pipeline_toy.yaml) and writes
OUT/report.html (self-contained) and OUT/results.json. Finished stages are cached under OUT/stages/ by a hash of
their settings: rerunning the same command reuses them, a changed section recomputes only what depends on it.

Example:
    synth toyset --out toy && pipelines run configs/pipeline_toy.yaml
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from synth import __version__
from synth.cli_utils import add_common_arguments, run_cli


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.run import load_pipeline_config, run_pipeline

    overrides = {"out": args.out, "seed": args.seed, "data": args.data, "name": args.name}
    loaded = load_pipeline_config(args.config, overrides)
    result = run_pipeline(loaded, progress=not args.quiet)
    print(result["report"])
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv, {"run": cmd_run})


if __name__ == "__main__":
    raise SystemExit(main())
