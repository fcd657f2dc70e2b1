"""Dinomaly's optimiser and learning-rate schedule: StableAdamW (AMSGrad) with warm-up + cosine decay.

StableAdamW (Wortsman et al., "Stable and low-precision training for large-scale vision-language models",
NeurIPS 2023) is AdamW with per-tensor *update clipping*: when the root mean square of ``g / denom`` (the
gradient over Adam's second-moment denominator) exceeds ``clip_threshold``, the step of that tensor is scaled
down by that factor, which prevents the loss spikes Adam gets when the second moment is stale. Dinomaly trains
with it (lr 2e-3, betas (0.9, 0.999), weight decay 1e-4, AMSGrad, eps 1e-10).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class StableAdamW(torch.optim.Optimizer):
    """AdamW with decoupled weight decay, optional AMSGrad and per-tensor update clipping (see module doc)."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, clip_threshold: float = 1.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or clip_threshold <= 0:
            raise ValueError("lr, eps and weight_decay must be >= 0 and clip_threshold > 0")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "amsgrad": amsgrad, "clip_threshold": clip_threshold})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch's Optimizer.step signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                step = state["step"]
                param.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay (AdamW)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                second = exp_avg_sq
                if group["amsgrad"]:
                    torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
                    second = state["max_exp_avg_sq"]
                denom = (second.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
                # Update clipping: RMS of the un-momentum'd normalised update, per tensor.
                rms = float((grad / denom).pow(2).mean().sqrt())
                scale = max(1.0, rms / group["clip_threshold"])
                param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step) / scale)
        return loss


def warm_cosine_lr(step: int, total: int, base: float, final: float, warmup: int) -> float:
    """Learning rate at 0-based ``step`` of ``total``: linear warm-up over ``warmup`` steps to ``base``, then a
    cosine decay from ``base`` to ``final`` at the last step."""
    if step < warmup:
        return base * (step + 1) / warmup
    span = max(total - warmup - 1, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))
