"""The quiet-machine rule every benchmark in ``scripts/`` follows.

A speed ratio measured beside other work is not a property of the code (the README once published 605x for a
20.6x ratio measured under load), so every benchmark records the 1-minute load average before it starts and
every few seconds while it runs, and marks its results:

- **quiet**: the load at the start is at most the core count (nothing else was running), and it never rises above
  the core count + 1 during the run (the benchmark itself may keep every core busy, plus its coordinating
  process);
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


class LoadWatch:
    """Samples ``os.getloadavg()[0]`` at entry, every ``every`` seconds on a daemon thread, and at exit."""

    def __init__(self, cores: int | None = None, every: float = SAMPLE_SECONDS,
                 settle: float = SETTLE_SECONDS) -> None:
        self.cores = cores or len(os.sched_getaffinity(0))
        self.every = every
        self.settle = settle
        self.settled_s = 0.0
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
        self._thread = threading.Thread(target=self._run, name="load-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    @property
    def quiet(self) -> bool:
        if not self.samples:
            raise RuntimeError("LoadWatch has no samples: use it as a context manager around the measurements.")
        return self.samples[0] <= self.cores and max(self.samples) <= self.cores + 1

    def record(self) -> dict:
        """The fields every results JSON carries."""
        return {"quiet": self.quiet, "cores": self.cores, "load_average_at_start": self.samples[0],
                "load_average_min": min(self.samples), "load_average_max": max(self.samples),
                "load_average_samples": len(self.samples), "waited_for_quiet_s": self.settled_s,
                "quiet_rule": f"start <= {self.cores} cores and max <= {self.cores + 1}"}

    def status_line(self) -> str:
        """One line for the top of a results Markdown file."""
        status = "quiet" if self.quiet else "LOADED (other work beside the run): not for publication"
        return (f"Run: {status}; 1-minute load average {self.samples[0]:.2f} at the start, "
                f"{min(self.samples):.2f}-{max(self.samples):.2f} during, on {self.cores} cores.")
