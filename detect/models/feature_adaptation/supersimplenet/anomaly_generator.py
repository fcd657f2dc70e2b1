"""SuperSimpleNet's training-time anomalies, made in feature space: Gaussian noise inside binarised Perlin masks.

Paper (Sec. 3.3) and reference code: the adapted features of a batch are duplicated; for each of the 2B copies a
Perlin mask is drawn at feature resolution and kept with probability 1/2 (else the copy gets no synthetic
anomaly); inside the kept mask N(0, 0.015^2) noise is added to every channel. In the supervised setting the mask
excludes the real defect (no overlap with the ground truth), and the targets become mask = GT OR Perlin mask,
label = GT label OR (Perlin mask non-empty).

The Perlin masks are synth's (:func:`synth.masks.perlin_mask`, the DRAEM generator: lattice scales 2**k per axis,
threshold on sqrt(2)-scaled noise), without rotation as in SuperSimpleNet's generator. The reference code draws
2**0..2**5 cells on the feature map's next power of two (64 for 256-pixel inputs); at least two feature
positions per cell are kept here (``max_scale_exp``), which gives exactly the reference scales at 256 pixels
and avoids degenerate, lattice-aligned noise on the small feature maps of small inputs.
"""

from __future__ import annotations

import numpy as np
import torch

from synth.masks import perlin_mask


def max_scale_exp(height: int, width: int, limit: int = 6) -> int:
    """Exclusive upper bound of the Perlin lattice exponent: cells per axis <= side / 2, and at most 2**(limit-1)."""
    side = max(min(height, width) // 2, 1)
    return max(1, min(limit, side.bit_length()))


def perlin_masks(count: int, height: int, width: int, rng: np.random.Generator, *, threshold: float,
                 probability: float = 0.5) -> torch.Tensor:
    """(count, 1, height, width) float masks: each a synth Perlin mask with ``probability``, else all zero."""
    top = max_scale_exp(height, width)
    out = torch.zeros(count, 1, height, width)
    for i in range(count):
        if rng.random() < probability:
            mask = perlin_mask((height, width), rng, threshold=threshold, rotate=False, min_scale_exp=0,
                               max_scale_exp=top)
            out[i, 0] = torch.from_numpy(mask.astype(np.float32))
    return out


def add_feature_anomalies(features: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                          *, rng: np.random.Generator, generator: torch.Generator, noise_std: float,
                          threshold: float, probability: float = 0.5
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Duplicate the batch and add masked Gaussian noise to the features (paper's anomaly generation module).

    features: adapted features (B, C, h, w); masks: ground truth at feature resolution (B, 1, h, w), zeros for
    normal images; labels: (B,) 0/1; valid: (B,) bool, False for anomalies given without a mask.
    Returns (perturbed (2B, C, h, w), masks (2B, 1, h, w), labels (2B,), valid (2B,)).
    """
    batch, channels, height, width = features.shape
    features = torch.cat([features, features])
    masks = torch.cat([masks, masks])
    labels = torch.cat([labels, labels])
    valid = torch.cat([valid, valid])
    noise = torch.randn((2 * batch, channels, height, width), generator=generator) * noise_std
    noise_mask = perlin_masks(2 * batch, height, width, rng, threshold=threshold, probability=probability)
    noise_mask = noise_mask * (1.0 - masks)  # never on top of a real defect (supervised case)
    masks = torch.maximum(masks, noise_mask)
    labels = torch.maximum(labels, noise_mask.flatten(1).amax(dim=1))
    return features + noise.to(features) * noise_mask.to(features), masks, labels, valid
