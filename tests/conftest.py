"""Shared fixtures: the real-texture toy defect set and the path to the real magnetic-tile data."""

from __future__ import annotations

from pathlib import Path

import pytest

from synth.toyset import make_texture_defect_set

REPO = Path(__file__).resolve().parent.parent
MAGNETIC_TILE = REPO.parent / "shared" / "data" / "magnetic-tile"


@pytest.fixture(scope="session")
def brick_set(tmp_path_factory):
    """Brick crops 64x64: 16 train/good, 8 test/good, 8 spot + 8 scratch planted defects."""
    return make_texture_defect_set(tmp_path_factory.mktemp("brick_set"), texture="brick", seed=0)


@pytest.fixture(scope="session")
def test_split_at(brick_set):
    """``split(size)``: the brick_set test split (paths, labels, masks at ``size``), built once per size."""
    from helpers import split_of

    cache: dict[int, tuple] = {}

    def split(size: int = 64) -> tuple:
        if size not in cache:
            cache[size] = split_of(brick_set, size)
        return cache[size]

    return split


@pytest.fixture(scope="session")
def test_split(test_split_at):
    """The brick_set test split at 64 px: 24 image paths, their labels, (24, 64, 64) masks."""
    return test_split_at(64)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    small tensors run as fast on one thread, numbers do not depend on the core count (float reductions do), and a
    busy 2-core machine does not stall on oversubscribed OpenMP threads."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def magnetic_tile() -> Path:
    if not MAGNETIC_TILE.is_dir():
        pytest.skip("../shared/data/magnetic-tile is absent")
    return MAGNETIC_TILE


@pytest.fixture(scope="session")
def tiny_inpaint_model(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion inpainting model in diffusers' folder layout (loads like a real one)."""
    pytest.importorskip("diffusers")
    from synth.diffusion.tiny import write_tiny_inpaint_model

    return write_tiny_inpaint_model(tmp_path_factory.mktemp("tiny_sd_inpaint") / "model", seed=0)
