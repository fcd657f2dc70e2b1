"""The quiet-machine rule of the benchmarks (scripts/quiet_run.py): which runs may be published."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from quiet_run import LoadWatch  # noqa: E402


def watched(samples: list[float], cores: int = 2) -> LoadWatch:
    watch = LoadWatch(cores=cores, settle=0)
    watch.samples = samples
    return watch


@pytest.mark.parametrize(("samples", "quiet"), [
    ([0.8, 2.2, 2.9, 1.5], True),    # the benchmark's own workers and coordinator: up to cores + 1
    ([2.5, 2.0, 1.0], False),        # something else was running when it started
    ([0.5, 3.4, 2.0], False),        # something joined during the run
    ([2.0, 3.0], True),              # the bounds themselves are quiet
])
def test_quiet_rule(samples: list[float], quiet: bool) -> None:
    watch = watched(samples)
    assert watch.quiet is quiet
    record = watch.record()
    assert record["quiet"] is quiet and record["load_average_at_start"] == samples[0]
    assert record["load_average_max"] == max(samples) and record["load_average_samples"] == len(samples)
    assert watch.status_line().startswith("Run: quiet;" if quiet else "Run: LOADED")


def test_samples_at_entry_during_and_exit() -> None:
    with LoadWatch(every=0.01, settle=0) as watch:
        assert len(watch.samples) == 1
        while len(watch.samples) < 3:  # the background thread adds samples while the block runs
            time.sleep(0.005)
    count = len(watch.samples)
    assert count >= 4  # entry, at least two periodic, exit
    assert watch._thread is not None and not watch._thread.is_alive()
    assert len(watch.samples) == count  # nothing is added after exit


def test_no_samples_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="context manager"):
        _ = LoadWatch().quiet


def test_waits_for_the_load_to_settle_then_measures(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run right after another waits (up to ``settle`` s) for the load average to fall to the core count."""
    import quiet_run

    loads = iter([5.0, 5.0, 1.0])  # busy, busy, then quiet: two waits, then the first sample
    monkeypatch.setattr(quiet_run.os, "getloadavg", lambda: (next(loads, 1.0), 0.0, 0.0))
    # The machine's real CPU counters would make this test depend on whatever else runs beside it (CI's own
    # processes did): a constant counter means "nothing else ran", which is the case this test is about.
    monkeypatch.setattr(quiet_run, "busy_cpu_seconds", lambda: 0.0)
    with LoadWatch(cores=2, every=0.05, settle=10) as watch:
        assert watch.samples == [1.0]
    assert 0.05 <= watch.settled_s < 10 and watch.quiet


def test_gives_up_waiting_and_marks_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import quiet_run

    monkeypatch.setattr(quiet_run.os, "getloadavg", lambda: (6.0, 0.0, 0.0))
    with LoadWatch(cores=2, every=0.05, settle=0.2) as watch:
        pass
    assert watch.settled_s >= 0.2 and not watch.quiet


@pytest.mark.parametrize(("others", "quiet"), [(0.1, True), (0.6, False)])
def test_other_processes_decide_not_the_benchmarks_own_load(others: float, quiet: bool) -> None:
    """A benchmark that oversubscribes the cores itself (load 3.6 on 2 cores) is quiet when nothing else ran."""
    watch = watched([0.5, 3.6, 2.0])
    watch.others_cores = others
    assert watch.quiet is quiet
    assert watch.record()["other_processes_cores"] == others
    assert f"other processes used {others:.2f} cores" in watch.status_line()


def test_a_child_process_counts_as_the_benchmarks_own_cpu() -> None:
    import subprocess

    with LoadWatch(every=0.05, settle=0) as watch:
        subprocess.run([sys.executable, "-c", "sum(i * i for i in range(3_000_000))"], check=True)
    assert watch.others_cores is not None and watch.others_cores >= 0.0
