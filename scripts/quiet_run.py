"""The quiet-machine rule every benchmark in ``scripts/`` follows.

A speed ratio measured beside other work is not a property of the code (the README once published 605x for a
20.6x ratio measured under load), so every benchmark records the 1-minute load average before it starts and
every few seconds while it runs, and marks its results:

- **quiet**: the load at the start is at most the core count (nothing else was running), and during the run other
  processes used at most ``OTHERS_LIMIT`` cores on average: the machine's busy CPU time (``/proc/stat`` through
  psutil) minus this benchmark's own (its process and every child it waited for, ``os.times``). The load
  average cannot tell the two apart: a benchmark whose own threads oversubscribe the cores (a model on every
  core while overlays encode beside it) pushes it above the core count with nothing else running. Without
  psutil the fallback is the load average: at most cores + 1 during the run;
- **LOADED** otherwise: the results are written (for the record) but are not for publication.

On entry it first waits (up to ``SETTLE_SECONDS``) for the load to fall to the core count, so a benchmark run
right after another one is not marked loaded by work that has finished.

Use::

    from quiet_run import LoadWatch          # scripts/ is on sys.path when a script in it runs

    with LoadWatch() as watch:
        ...                                  # the measurements
    meta.update(watch.record())              # into the results JSON
    lines.insert(0, watch.status_line())     # first line of the results Markdown
"""

from __future__ import annotations

import os
import threading
import time
from types import TracebackType

SAMPLE_SECONDS = 5.0
# Before measuring, wait up to this long for the 1-minute average to fall to the core count: a benchmark that
# follows another (or a test run) would otherwise start "loaded" by work that has already finished.
SETTLE_SECONDS = 180.0
# Other processes' average CPU use (cores) a quiet run tolerates: shells, editors, the test of a file.
OTHERS_LIMIT = 0.25


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has been busy since boot (None without psutil)."""
    try:
        import psutil
    except ImportError:
        return None
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of every child process it has waited for (subprocesses, their workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class LoadWatch:
    """Samples ``os.getloadavg()[0]`` at entry, every ``every`` seconds on a daemon thread, and at exit."""

    def __init__(self, cores: int | None = None, every: float = SAMPLE_SECONDS,
                 settle: float = SETTLE_SECONDS) -> None:
        self.cores = cores or len(os.sched_getaffinity(0))
        self.every = every
        self.settle = settle
        self.settled_s = 0.0
        self.others_cores: float | None = None  # other processes' average CPU use during the run
        self._start: tuple[float, float | None, float] | None = None
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> float:
        load = round(os.getloadavg()[0], 2)
        self.samples.append(load)
        return load

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def __enter__(self) -> LoadWatch:
        start = time.monotonic()
        while os.getloadavg()[0] > self.cores and time.monotonic() - start < self.settle:
            time.sleep(min(self.every, self.settle))
        self.settled_s = round(time.monotonic() - start, 1)
        self.sample()
        self._start = (time.monotonic(), busy_cpu_seconds(), own_cpu_seconds())
        self._thread = threading.Thread(target=self._run, name="load-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        if self._start is not None and self._start[1] is not None:
            wall = max(time.monotonic() - self._start[0], 1e-9)
            busy = busy_cpu_seconds()
            assert busy is not None
            others = (busy - self._start[1]) - (own_cpu_seconds() - self._start[2])
            self.others_cores = round(max(others, 0.0) / wall, 3)

    @property
    def quiet(self) -> bool:
        if not self.samples:
            raise RuntimeError("LoadWatch has no samples: use it as a context manager around the measurements.")
        if self.others_cores is not None:
            return self.samples[0] <= self.cores and self.others_cores <= OTHERS_LIMIT
        return self.samples[0] <= self.cores and max(self.samples) <= self.cores + 1

    def record(self) -> dict:
        """The fields every results JSON carries."""
        return {"quiet": self.quiet, "cores": self.cores, "load_average_at_start": self.samples[0],
                "load_average_min": min(self.samples), "load_average_max": max(self.samples),
                "load_average_samples": len(self.samples), "waited_for_quiet_s": self.settled_s,
                "other_processes_cores": self.others_cores,
                "quiet_rule": (f"load at start <= {self.cores} and other processes <= {OTHERS_LIMIT} cores"
                               if self.others_cores is not None
                               else f"load at start <= {self.cores} and max <= {self.cores + 1}")}

    def status_line(self) -> str:
        """One line for the top of a results Markdown file."""
        status = "quiet" if self.quiet else "LOADED (other work beside the run): not for publication"
        others = "" if self.others_cores is None else f"; other processes used {self.others_cores:.2f} cores"
        return (f"Run: {status}; 1-minute load average {self.samples[0]:.2f} at the start, "
                f"{min(self.samples):.2f}-{max(self.samples):.2f} during, on {self.cores} cores{others}.")
