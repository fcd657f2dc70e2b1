"""What both inpainting generators (ControlNet, CSM) share at generation time: the scheduler choice, the device
and precision, the mask-only placer, the region a pipeline repaints, and the exact composite back at the input
size. Training (``synth.diffusion.trainer``) uses the same latent region, so training and generation see the same
repainted area.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from synth.core.errors import InputError

if TYPE_CHECKING:
    import torch

    from synth.placement import MaskGuidedPlacer

SCHEDULERS = ("unipc", "ddim", "dpm", "ddpm")
# Placer params that describe the alpha paste the inpainting replaces: left out of the recorded placement.
PAINT_KEYS = ("blend_mode", "clone_mode", "feather")


def check_scheduler(name: str) -> str:
    if name not in SCHEDULERS:
        raise InputError(f"scheduler must be one of {SCHEDULERS}, got {name!r}")
    return name


def make_scheduler(name: str, config: Any) -> Any:
    """The diffusers scheduler ``name`` (one of SCHEDULERS) built from a model's scheduler config."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    classes = {"unipc": UniPCMultistepScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler,
               "ddpm": DDPMScheduler}
    return classes[check_scheduler(name)].from_config(config)


def device_and_dtype(device: str | None, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``device`` (default cuda when available, else cpu) and ``dtype`` ("auto": fp16 on cuda, else fp32)."""
    import torch

    chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        return chosen, torch.float16 if chosen.type == "cuda" else torch.float32
    return chosen, getattr(torch, dtype)


def mask_placer(exemplars: list[Any], foreground: str, placement: dict[str, Any] | None) -> MaskGuidedPlacer:
    """A placer of the exemplars' masks only (the pipeline paints the defect, so no background estimates)."""
    from synth.placement import DefectExemplar, MaskGuidedPlacer

    masks_only = [DefectExemplar(mask=ex.mask, defect_class=ex.defect_class, source=ex.source) for ex in exemplars]
    try:
        return MaskGuidedPlacer(masks_only, blend_mode="alpha", foreground=foreground, **(placement or {}))
    except TypeError as exc:
        raise InputError(f"method_params.placement: {exc}; see synth.placement.MaskGuidedPlacer for the "
                         f"options (scale, rotation, min_inside, ...).") from None


def latent_region(touched: torch.Tensor, vae_scale_factor: int) -> torch.Tensor:
    """(B, 1, H, W) touched mask -> (B, 1, H/f, W/f) latent mask: every latent cell the defect reaches.

    Nearest downsampling (what the pipeline does) would drop defects thinner than a latent cell; growing the
    region to whole cells guarantees every defect pixel is regenerated.
    """
    import torch.nn.functional as F

    return F.max_pool2d(touched.float(), kernel_size=vae_scale_factor)


def pixel_region(latent_mask: torch.Tensor, vae_scale_factor: int) -> torch.Tensor:
    """Latent mask back to pixels (block-constant), the region a pipeline with this mask repaints."""
    import torch.nn.functional as F

    return F.interpolate(latent_mask, scale_factor=vae_scale_factor, mode="nearest")


def repaint_region(touched: np.ndarray, vae_scale_factor: int) -> np.ndarray:
    """The bool (H, W) pixels a pipeline repaints for a touched mask: whole latent cells."""
    import torch

    f = vae_scale_factor
    return pixel_region(latent_region(torch.from_numpy(touched)[None, None].float(), f), f)[0, 0].numpy() > 0.5


def to_uint8(result: Any) -> np.ndarray:
    """A pipeline's float image in [0, 1] (output_type "np") as uint8."""
    return np.clip(np.rint(np.asarray(result, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def composite(image: np.ndarray, generated: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``generated`` (at the inference size) resized to ``image`` and pasted inside ``mask`` only: every pixel
    outside the mask is the input's."""
    import cv2

    h, w = image.shape[:2]
    size = generated.shape[0]
    if (h, w) != generated.shape[:2]:
        generated = cv2.resize(generated, (w, h), interpolation=cv2.INTER_CUBIC if max(h, w) > size
                               else cv2.INTER_AREA)
    return np.where(mask[:, :, None], generated, image)
