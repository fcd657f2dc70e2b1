"""Synthetic anomalies as drop-in transforms for external training pipelines.

- :class:`SyntheticAnomaly`: an albumentations ``DualTransform``. Use it inside ``A.Compose`` with any other
  transforms; it takes ``image`` (and optionally ``mask``) and returns the augmented image and the defect
  mask (OR-ed into the incoming mask, so real labels are kept). With ``A.Compose(..., seed=S)`` the output is
  reproducible, because the transform draws from albumentations' seeded ``random_generator``.
- :class:`SyntheticAnomalyV2`: the same for torchvision-v2 style pipelines: a ``torch.nn.Module`` called with
  an image tensor (C, H, W; uint8 or float in [0, 1]) and an optional mask, returning ``(image, mask)``.

``generator`` is any name of the generator registry that builds by name
(:func:`synth.generators.transform_generator_names`: ``"perlin"``, ``"draem"``, ``"cutpaste"``, ``"scar"``,
``"cutpaste3way"``, ``"paste"``: real defect masks deformed and placed by
:class:`synth.placement.MaskGuidedPlacer`) or a callable ``(image, rng) -> result`` with ``.image`` and ``.mask``.

``"paste"`` takes ``exemplars=[...]`` (:class:`~synth.placement.DefectExemplar` objects, ``(image, mask)`` or
``(image, mask, class)`` tuples; ``image`` may be None, grey or RGB, ``mask`` bool or 0/255) and/or
``masks=DIR`` (with optional ``defects=DIR``, the layout of ``synth generate --masks/--defects``); every other
keyword goes to :class:`~synth.placement.MaskGuidedPlacer` (``blend_mode``, ``position``, ``harmonize``, ...).
When a defect cannot be placed (:class:`~synth.placement.PlacementError`, e.g. an image smaller than the
foreground needs) the image passes through unchanged with an empty mask, so one awkward crop does not stop a
training loop; ``params["placement_failed"]`` holds the reason. Bad exemplars still raise
:class:`~synth.core.errors.InputError` when the transform is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import albumentations as A
import numpy as np
import torch

from synth.core.errors import InputError
from synth.core.io import ensure_rgb_uint8
from synth.generators import make_generator


def make_augmenter(generator: str | Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
    """A generator from a registered name (with its keyword arguments, :func:`synth.generators.make_generator`)
    or a ready callable.

    ``"paste"`` keywords: ``exemplars`` (list of DefectExemplar / ``(image, mask[, class])``), ``masks`` and
    ``defects`` (folders, as for ``synth generate``), the rest for :class:`~synth.placement.MaskGuidedPlacer`.
    """
    if callable(generator):
        return generator
    return make_generator(generator, **kwargs)


class SyntheticAnomaly(A.DualTransform):
    """albumentations transform adding one synthetic defect with probability ``p``.

    Args:
        generator: augmenter name or callable (see module docstring).
        generator_kwargs: constructor arguments for a named augmenter.
        p: probability of applying the transform (albumentations semantics).
    """

    def __init__(self, generator: str | Callable[..., Any] = "perlin", generator_kwargs: dict[str, Any] | None = None,
                 p: float = 0.5):
        super().__init__(p=p)
        self.generator = generator
        self.generator_kwargs = dict(generator_kwargs or {})
        self._augmenter = make_augmenter(generator, **self.generator_kwargs)

    @property
    def targets_as_params(self) -> list[str]:
        return ["image"]

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        image = data["image"]
        squeeze = image.ndim == 3 and image.shape[2] == 1
        rgb = ensure_rgb_uint8(image, source="SyntheticAnomaly input")
        result = self._augmenter(rgb, self.random_generator)
        out = result.image
        if image.ndim == 2 or squeeze:
            out = out.mean(axis=2).round().astype(np.uint8)
            out = out[:, :, None] if squeeze else out
        return {"anomaly_image": out, "anomaly_mask": result.mask}

    def apply(self, img: np.ndarray, anomaly_image: np.ndarray, **params: Any) -> np.ndarray:
        if img.dtype != np.uint8:
            raise InputError("SyntheticAnomaly expects uint8 images; place it before A.Normalize / ToFloat.")
        return anomaly_image

    def apply_to_mask(self, mask: np.ndarray, anomaly_mask: np.ndarray, **params: Any) -> np.ndarray:
        if mask.shape[:2] != anomaly_mask.shape:
            raise InputError(f"mask {mask.shape[:2]} and image {anomaly_mask.shape} sizes differ.")
        defect = anomaly_mask if mask.ndim == 2 else anomaly_mask[:, :, None]
        if mask.dtype == bool:
            return mask | defect
        return np.where(defect, np.array(255 if mask.dtype == np.uint8 and mask.max(initial=0) > 1 else 1,
                                          dtype=mask.dtype), mask)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("generator", "generator_kwargs")


class SyntheticAnomalyV2(torch.nn.Module):
    """torchvision-v2 style transform: ``(image, mask=None) -> (image, mask)``.

    image: tensor (C, H, W), uint8 or float in [0, 1] (C = 1 or 3); returned in the same dtype.
    mask: optional tensor (H, W) or (1, H, W); the defect is OR-ed into it. Without one, a new bool mask.
    seed: seeds the transform's own generator (independent of torch's global RNG).
    """

    def __init__(self, generator: str | Callable[..., Any] = "perlin", p: float = 0.5, seed: int | None = None,
                 **generator_kwargs: Any):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise InputError(f"p={p} must be in [0, 1].")
        self.p = p
        self.rng = np.random.default_rng(seed)
        self._augmenter = make_augmenter(generator, **generator_kwargs)

    def forward(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise InputError(f"expected an image tensor (C, H, W) with C = 1 or 3, got shape {tuple(image.shape)}.")
        height, width = image.shape[1:]
        if mask is None:
            mask = torch.zeros((height, width), dtype=torch.bool)
        if mask.shape[-2:] != (height, width):
            raise InputError(f"mask {tuple(mask.shape)} does not match image {tuple(image.shape)}.")
        if self.rng.random() >= self.p:
            return image, mask
        is_float = image.is_floating_point()
        array = image.detach().cpu()
        array = (array.clamp(0, 1) * 255).round().to(torch.uint8) if is_float else array
        rgb = array.permute(1, 2, 0).numpy()
        result = self._augmenter(ensure_rgb_uint8(rgb), self.rng)
        out = torch.from_numpy(result.image).permute(2, 0, 1)
        if image.shape[0] == 1:
            out = out.float().mean(0, keepdim=True).round().to(torch.uint8)
        out = out.to(image.dtype) / 255.0 if is_float else out
        defect = torch.from_numpy(result.mask).reshape(mask.shape)
        new_mask = (mask.bool() | defect).to(mask.dtype) if mask.dtype == torch.bool else torch.where(
            defect, torch.ones_like(mask) * (255 if mask.dtype == torch.uint8 and mask.max() > 1 else 1), mask)
        return out.to(image.device), new_mask
