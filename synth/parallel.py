"""Spreading per-sample work over processes on one machine (workers) and over launched processes (shards).

- **Workers** (:func:`ordered_map`): a pool of forked processes that computes items in any order and hands the
  results back in input order, so the caller appends manifest rows exactly as a one-process loop would.
- **Shards** (:func:`current_shard`): under ``accelerate launch`` (or torchrun) every launched process takes the
  items ``i`` with ``i % count == index``; accelerate's state provides the barrier. A plain run is shard 0 of 1
  and never imports accelerate.

Results must not depend on which process made them: every item draws from its own seeded generator.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class Shard:
    """This process's share of the items: those with ``i % count == index``."""

    index: int = 0
    count: int = 1
    _barrier: Callable[[], None] | None = None

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def owns(self, item_index: int) -> bool:
        return item_index % self.count == self.index

    def wait_for_everyone(self) -> None:
        if self._barrier is not None:
            self._barrier()


def current_shard() -> Shard:
    """Shard ``RANK`` of ``WORLD_SIZE`` when launched by accelerate / torchrun with 2+ processes, else 0 of 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Shard()
    import torch
    from accelerate import PartialState

    # Without cpu=True accelerate treats a launch on a machine without GPUs as a single process.
    state = PartialState(cpu=not torch.cuda.is_available())
    return Shard(state.process_index, state.num_processes, state.wait_for_everyone)


def default_workers() -> int:
    """All cores this process may use, divided among the launched processes that share this machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // max(1, local_processes))


def can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


# The function of the running ordered_map: set before the pool forks, so workers inherit it (closures included)
# and only items and results cross process boundaries.
_FUNCTION: Callable[[Any], Any] | None = None


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when its parent dies, so a killed run leaves no orphan writing files."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def _call_inherited(item: Any) -> Any:
    assert _FUNCTION is not None
    return _FUNCTION(item)


def ordered_map(function: Callable[[ItemT], ResultT], items: Iterable[ItemT], workers: int) -> Iterator[ResultT]:
    """``map(function, items)`` on ``workers`` forked processes, results in input order.

    ``function`` and the state it reads are inherited by fork (nothing is pickled but items and results), so it
    may be a closure over generators that cannot be pickled; one ordered_map at a time per process. One worker,
    or a platform without fork, runs in this process.
    A failure in a worker re-raises here at its item; the items after it are cancelled.
    """
    items = list(items)
    # A process that has imported torch (the pipelines, a test session) may hold OpenMP threads a forked child
    # would wait on forever: the full test suite hung there. Such callers run in-process; the CLI imports no torch.
    if workers <= 1 or len(items) <= 1 or not can_fork() or "torch" in sys.modules:
        yield from map(function, items)
        return
    import cv2

    global _FUNCTION
    _FUNCTION = function
    # OpenCV's thread pool does not survive a fork (a child that uses it waits forever on threads it lacks), and
    # N workers on N cores gain nothing from it: the parent drops to one thread while its children are forked.
    cv2_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    executor = ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=multiprocessing.get_context("fork"),
                                   initializer=_die_with_parent)
    try:
        yield from executor.map(_call_inherited, items)
    except BaseException:
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        cv2.setNumThreads(cv2_threads)
    executor.shutdown(wait=True)
