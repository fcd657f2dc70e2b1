"""``pipelines``: the closed loop generate -> filter -> train -> evaluate -> report.

The ``run CONFIG`` subcommand arrives with the pipelines themselves; until then this CLI only reports its
version, so no subcommand exists that does not do its job.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from synth import __version__
from synth.cli_utils import run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipelines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pixelvision {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv, {})


if __name__ == "__main__":
    raise SystemExit(main())
