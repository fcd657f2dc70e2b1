"""The one training loop of trainable detectors: seeded shuffling, progress bar, early stop, loss history.

A model supplies ``step(batch) -> loss`` (and optionally an extra per-epoch hook); the loop handles the
optimiser step, gradient clipping, mini-batching of a pre-loaded tensor (or of several aligned tensors),
and stops early when the epoch loss has not improved by ``min_delta`` (relative) for ``patience`` epochs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm


@dataclass
class TrainingConfig:
    """Config fields of trainable detectors (mixed into their Config dataclasses).

    epochs: maximum number of passes over the training images.
    lr: learning rate of the optimiser (Adam unless the model says otherwise).
    patience: stop after this many epochs without a relative loss improvement of ``min_delta``
        (0 disables early stopping).
    """

    epochs: int = 20
    lr: float = 1e-3
    patience: int = 0
    min_delta: float = 1e-3


def check_training_config(config: TrainingConfig) -> None:
    """Validate the TrainingConfig fields of a DetectorConfig (call from its __post_init__)."""
    config.check(config.epochs >= 1, "epochs", ">= 1")
    config.check(config.lr > 0, "lr", "> 0")
    config.check(config.patience >= 0, "patience", ">= 0")
    config.check(config.min_delta >= 0, "min_delta", ">= 0")


def train_loop(
    step: Callable[..., torch.Tensor],
    data: torch.Tensor | Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    progress: bool = True,
    desc: str = "train",
    patience: int = 0,
    min_delta: float = 1e-3,
    clip_grad_norm: float | None = None,
    parameters: Sequence[torch.nn.Parameter] | None = None,
    on_epoch_end: Callable[[int, float], None] | None = None,
    drop_last: bool = False,
) -> list[float]:
    """Run ``epochs`` passes of ``step`` over shuffled mini-batches of ``data``; returns mean loss per epoch.

    ``data`` is one tensor (``step(batch)``) or a sequence of aligned tensors (``step(*batches)``).
    Shuffling uses its own ``torch.Generator`` seeded with ``seed``: same seed, same batches.
    """
    tensors = [data] if isinstance(data, torch.Tensor) else list(data)
    count = tensors[0].shape[0]
    if count == 0:
        raise ValueError("no training samples")
    generator = torch.Generator().manual_seed(seed)
    history: list[float] = []
    best = float("inf")
    stale = 0
    params = list(parameters) if parameters is not None else [
        p for group in optimizer.param_groups for p in group["params"]]
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress)
    for epoch in bar:
        order = torch.randperm(count, generator=generator)
        total, batches = 0.0, 0
        for start in range(0, count, batch_size):
            index = order[start:start + batch_size]
            if drop_last and len(index) < batch_size and count >= batch_size:
                continue
            loss = step(*(t[index] for t in tensors))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
            optimizer.step()
            total += float(loss.detach())
            batches += 1
        epoch_loss = total / max(batches, 1)
        history.append(epoch_loss)
        bar.set_postfix(loss=f"{epoch_loss:.4g}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, epoch_loss)
        if patience:
            if epoch_loss < best * (1 - min_delta) if best > 0 else epoch_loss < best - min_delta:
                best, stale = epoch_loss, 0
            else:
                stale += 1
                if stale >= patience:
                    break
    bar.close()
    return history
