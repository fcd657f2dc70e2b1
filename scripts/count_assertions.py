"""A pytest plugin that counts the assertions a test run passes (``assert`` statements in test modules and
conftest, each time one is executed), to compare two versions of the suite.

    PYTHONPATH=scripts python -B -m pytest -p count_assertions -o enable_assertion_pass_hook=true
    (ASSERTION_COUNT_FILE=path writes the count there as JSON; it is printed at the end either way)

``-B`` (or deleting ``tests/__pycache__``) matters: assertions are rewritten for the hook only when a test module
is compiled again. ``pytest.raises`` and ``np.testing`` checks are not ``assert`` statements and are not counted.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest

_passed: Counter[str] = Counter()


def pytest_assertion_pass(item: pytest.Item, lineno: int, orig: str, expl: str) -> None:
    _passed[item.nodeid.split("::")[0]] += 1


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    total = sum(_passed.values())
    terminalreporter.write_line(f"assertions passed: {total} in {len(_passed)} test files")
    target = os.environ.get("ASSERTION_COUNT_FILE")
    if target:
        with open(target, "w", encoding="utf-8") as handle:
            json.dump({"total": total, "per_file": dict(sorted(_passed.items()))}, handle, indent=1)
