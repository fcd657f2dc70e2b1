"""Small helpers shared by test modules (importable as ``helpers``: pytest puts this folder on sys.path)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path


def tree_digest(root: Path, *, skip: Callable[[Path], bool] | None = None) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path (files for which ``skip`` is true left out)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not (skip and skip(p))}
