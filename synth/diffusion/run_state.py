"""Bookkeeping shared by the learned generators' trainers: settings record, checkpoints, loss log, seeds.

A training run lives in one ``out`` folder: ``train_config.json`` (the settings; a rerun with other settings is
refused, except the ``RESUMABLE_KEYS``), ``checkpoints/step_N`` (accelerate ``save_state``, renamed into place only
when complete), ``train_log.jsonl`` (one loss row per step) and ``train_state.json`` (written last, when done).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from synth.core.errors import InputError
from synth.core.io import read_json_if_exists, write_text

CHECKPOINTS_DIR = "checkpoints"
CONFIG_RECORD = "train_config.json"
STATE_RECORD = "train_state.json"
LOSS_LOG = "train_log.jsonl"
logger = logging.getLogger(__name__)

RESUMABLE_KEYS = ("out", "train_steps", "checkpoint_every", "keep_checkpoints")


def stream_seed(*parts: int) -> int:
    """An independent seed per (run seed, micro step, process, purpose): resumes and processes never share streams."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint32)[0])


def check_same_settings(out: Path, record: dict[str, Any], what: str) -> None:
    """Refuse to continue a run in ``out`` that was trained with other settings (``what``: "a ControlNet")."""
    previous = read_json_if_exists(out / CONFIG_RECORD)
    if previous is None:
        return
    if not isinstance(previous, dict):
        raise InputError(f"{out / CONFIG_RECORD}: not a training record; use a new out folder.")
    changed = sorted(k for k in set(previous) | set(record)
                     if k not in RESUMABLE_KEYS and previous.get(k) != record.get(k))
    if changed:
        raise InputError(f"{out}: holds {what} trained with other settings ({', '.join(changed)}); use a new "
                         f"out folder, or delete this one to start over (only {', '.join(RESUMABLE_KEYS[1:])} may "
                         f"change between runs).")


def checkpoint_steps(out: Path) -> list[int]:
    """Steps of the complete checkpoints ``out/checkpoints/step_N``, ascending."""
    folder = out / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in folder.iterdir()
                  if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit())


def already_trained(out: Path, train_steps: int, result_exists: bool, what: str) -> bool:
    """True when ``out`` holds a finished run of exactly ``train_steps`` (nothing to do); a finished run of more
    steps is an error (``what``: "a ControlNet")."""
    state = read_json_if_exists(out / STATE_RECORD)
    if not (isinstance(state, dict) and result_exists):
        return False
    done = int(state.get("completed_steps", 0))
    if done > train_steps:
        raise InputError(f"{out}: holds {what} trained for {done} steps, more than train_steps={train_steps}; "
                         f"raise train_steps or use a new out folder.")
    if done == train_steps:
        logger.info("%s: already trained for %d steps; nothing to do", out, done)
    return done == train_steps


def resume_step(out: Path, train_steps: int) -> int:
    """The step to resume from (0: start); a checkpoint beyond ``train_steps`` is an error."""
    steps = checkpoint_steps(out)
    if steps and steps[-1] > train_steps:
        raise InputError(f"{out}: its newest checkpoint is step {steps[-1]}, beyond train_steps={train_steps}; "
                         f"raise train_steps to at least {steps[-1]} or use a new out folder.")
    return steps[-1] if steps else 0


def truncate_log(path: Path, step: int) -> None:
    """Drop loss rows past ``step`` (logged after the checkpoint a resume restarts from)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if isinstance(row, dict) and int(row.get("step", 0)) <= step:
            keep.append(line + "\n")
    write_text(path, "".join(keep))


def read_loss_log(out: str | Path) -> list[dict[str, float]]:
    """Rows ``{"step": n, "loss": x}`` of a training run's train_log.jsonl."""
    path = Path(out) / LOSS_LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@contextmanager
def quiet_accelerate() -> Iterator[None]:
    """accelerate logs every file of a checkpoint at INFO level, which garbles the progress bar."""
    log = logging.getLogger("accelerate")
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(level)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a completely written folder into place (a kill before this leaves only ``tmp`` behind)."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
