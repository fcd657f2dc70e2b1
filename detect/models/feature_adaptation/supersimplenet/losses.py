"""SuperSimpleNet losses (paper Sec. 3.5): L = L_trunc-l1(map) + L_focal(map) + L_focal(score).

The focal loss is the reference code's (from DeSTSeg): binary cross-entropy weighted by (1 - p_t)**gamma with
gamma 4 and no alpha balancing, averaged; computed here from logits for numerical stability. The truncated L1
loss pushes normal map logits below -th and anomalous ones above +th (th = 0.5) and stops pushing beyond; the
means over normal and over anomalous positions are added, so small anomalies weigh as much as the background.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 4.0) -> torch.Tensor:
    """Mean binary focal loss of ``logits`` against 0/1 ``targets`` (same shape)."""
    targets = targets.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    prob = torch.sigmoid(logits)
    p_t = prob * targets + (1 - prob) * (1 - targets)
    return (ce * (1 - p_t).pow(gamma)).mean()


def truncated_l1_loss(logits: torch.Tensor, targets: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """mean(max(0, x + th)) over normal positions + mean(max(0, th - x)) over anomalous positions."""
    loss = logits.new_zeros(())
    normal = logits[targets <= 0]
    anomalous = logits[targets > 0]
    if normal.numel():
        loss = loss + torch.clamp(normal + threshold, min=0).mean()
    if anomalous.numel():
        loss = loss + torch.clamp(threshold - anomalous, min=0).mean()
    return loss


def supersimplenet_loss(map_logits: torch.Tensor, score_logits: torch.Tensor, masks: torch.Tensor,
                        labels: torch.Tensor, valid: torch.Tensor | None = None, *, threshold: float = 0.5,
                        gamma: float = 4.0) -> torch.Tensor:
    """Total loss. ``valid`` (N,) marks images whose mask is known; the segmentation terms use only those
    (anomalies given with an image label only train the classification head)."""
    if valid is not None and not bool(valid.all()):
        map_logits, masks = map_logits[valid], masks[valid]
    seg = map_logits.new_zeros(())
    if map_logits.numel():
        seg = truncated_l1_loss(map_logits, masks, threshold) + focal_loss(map_logits, masks, gamma)
    return seg + focal_loss(score_logits, labels, gamma)
