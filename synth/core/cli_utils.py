"""Shared CLI plumbing: logging set-up and turning user errors into one clear line and exit status 2."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from synth.core.errors import PixelVisionError


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors, no progress bars")


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
            handlers: dict[str, Callable[[argparse.Namespace], int | None]]) -> int:
    """Parse ``argv`` and dispatch to ``handlers[args.command]``; user errors exit 2 with one message."""
    args = parser.parse_args(argv)
    if getattr(args, "command", None) is None:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(levelname)s: %(message)s")
    try:
        return int(handlers[args.command](args) or 0)
    except PixelVisionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
