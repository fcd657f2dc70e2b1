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

# Frozen features of the training images are cached when they take at most this much memory.
FEATURE_CACHE_BYTES = 2 * 1024**3
Features = torch.Tensor | list[torch.Tensor]


class FrozenFeatures:
    """A frozen network's features of rows of ``pixels``, computed once (in batches of ``batch_size``, in order)
    and kept when all of them fit in ``budget`` bytes, else recomputed for every request.

    ``compute`` maps an image batch to a tensor or to a list of tensors (one per stage); ``self(index)`` gives the
    same for ``pixels[index]``. Trained heads on frozen backbones (flows, CFA, SuperSimpleNet) train on these.
    """

    def __init__(self, compute: Callable[[torch.Tensor], Features], pixels: torch.Tensor, batch_size: int,
                 budget: int = FEATURE_CACHE_BYTES) -> None:
        self.compute, self.pixels = compute, pixels
        self.first = compute(pixels[:1])
        parts = self.first if isinstance(self.first, list | tuple) else [self.first]
        per_image = sum(part.numel() * part.element_size() for part in parts)
        self.cache: Features | None = None
        if len(pixels) * per_image <= budget:
            chunks = [compute(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)]
            self.cache = ([torch.cat(stage) for stage in zip(*chunks, strict=True)]
                          if isinstance(self.first, list | tuple) else torch.cat(chunks))

    @property
    def cached(self) -> bool:
        return self.cache is not None

    def __call__(self, index: torch.Tensor) -> Features:
        if self.cache is None:
            return self.compute(self.pixels[index])
        return [stage[index] for stage in self.cache] if isinstance(self.cache, list) else self.cache[index]


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
