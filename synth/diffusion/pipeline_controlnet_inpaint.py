"""Defect generation with a frozen Stable Diffusion inpainting model and a trained mask ControlNet.

What the paper does
-------------------
AnomalyControl (He et al., 2024, arXiv:2412.06510) synthesises an anomaly inside a given region of a normal image
with a frozen, pretrained Stable Diffusion model that is steered by learned guidance; in the inpainting setting
everything outside the region is kept and the ControlNet-style control fixes the anomaly's shape and position.

What this module implements
---------------------------
:class:`ControlNetInpaintGenerator` plugs into ``synth generate`` as a ``DefectGenerator``
(``gen(normal_uint8, rng) -> GeneratedDefect``):

1. Where: a real defect mask is deformed and placed on the normal image by :class:`synth.placement.
   MaskGuidedPlacer` (the same mask-guided placement as ``--method paste``; only its mask is used).
2. What: diffusers' ``StableDiffusionControlNetInpaintPipeline`` (frozen SD inpainting VAE/UNet/text encoder from
   :func:`synth.diffusion.components.load_inpaint_components` + the ControlNet trained by
   :mod:`synth.diffusion.controlnet`, safety checker off) inpaints the resized image at ``resolution`` with the
   prompt ``"a photo of a {defect}"`` for the exemplar's class, the defect mask as the control image and the mask
   grown to whole latent cells as the inpainting mask (exactly as in training), seeded by a ``torch.Generator``
   drawn from ``rng``.
3. Composite: the result is resized back and copied into the normal image *only* inside the placed mask; every
   pixel outside the mask is byte-identical to the input, so the label covers every changed pixel.

Deviations: no semantic (CSM) guidance here (issue 7, item 3); non-square images are squashed to a square at
``resolution`` and back (training uses undistorted square crops), which slightly changes defect aspect ratios on
very elongated images. Generated pixels are pasted without feathering because the mask must stay exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from synth.core.config import StrictModel, validate_config
from synth.core.errors import InputError
from synth.core.io import read_json_if_exists
from synth.diffusion.components import DEFAULT_INPAINT_MODEL
from synth.diffusion.controlnet import (
    CONTROLNET_DIR,
    DEFAULT_PROMPT_TEMPLATE,
    check_prompt_template,
    make_prompt,
    resize_image,
    resize_mask,
)
from synth.diffusion.inpainting import (
    PAINT_KEYS,
    check_scheduler,
    composite,
    device_and_dtype,
    make_scheduler,
    mask_placer,
    repaint_region,
    to_uint8,
)
from synth.diffusion.run_state import CONFIG_RECORD
from synth.generators import GeneratedDefect, register_generator

# Placement keys that describe the alpha paint the placer also renders; that image is thrown away here.


class ControlNetGenerateConfig(StrictModel):
    """``method_params`` of ``synth generate --method controlnet`` (configs/generate_controlnet.yaml).

    Keys left unset (None) come from the training run's ``train_config.json`` next to the ControlNet, then from
    the defaults named here.
    """

    controlnet: Path = Field(description="a synth train-controlnet out folder, or its controlnet/ subfolder")
    pretrained: str | None = Field(None, description="SD inpainting model; default: the one trained with")
    prompt_template: str | None = Field(None, description=f"default: as trained ({DEFAULT_PROMPT_TEMPLATE!r})")
    class_names: dict[str, str] | None = Field(None, description="class folder -> words in the prompt")
    negative_prompt: str = ""
    num_inference_steps: int = Field(30, gt=0)
    guidance_scale: float = Field(7.5, ge=0, description="classifier-free guidance; <= 1 turns it off")
    strength: float = Field(1.0, gt=0, le=1, description="1 = start from pure noise inside the mask")
    controlnet_scale: float = Field(1.0, ge=0, description="weight of the ControlNet residuals")
    resolution: int | None = Field(None, ge=8, multiple_of=8, description="default: the training resolution")
    scheduler: Literal["unipc", "ddim", "dpm", "ddpm"] = "unipc"
    device: str | None = Field(None, description="torch device; default cuda when available, else cpu")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="auto: fp16 on GPU")
    placement: dict[str, Any] = Field(default_factory=dict, description="MaskGuidedPlacer options (scale, ...)")

    @field_validator("prompt_template")
    @classmethod
    def _check_template(cls, value: str | None) -> str | None:
        return None if value is None else check_prompt_template(value)


def resolve_controlnet_dir(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The folder holding the ControlNet's config.json and the training record (``{}`` when there is none)."""
    path = Path(path).expanduser()
    if (path / CONTROLNET_DIR / "config.json").is_file():
        folder, record_dir = path / CONTROLNET_DIR, path
    elif (path / "config.json").is_file():
        folder, record_dir = path, path.parent
    else:
        raise InputError(f"{path}: no trained ControlNet there (expected {path}/{CONTROLNET_DIR}/config.json or "
                         f"{path}/config.json); train one with `synth train-controlnet --out {path}` or set "
                         f"method_params.controlnet to that out folder.")
    record = read_json_if_exists(record_dir / CONFIG_RECORD)
    return folder, record if isinstance(record, dict) else {}


class ControlNetInpaintGenerator:
    """``(normal uint8 HxWx3, rng) -> GeneratedDefect``: placed real mask, ControlNet inpainting, exact composite.

    Args:
        controlnet: training out folder (``synth train-controlnet --out``) or its ``controlnet/`` folder.
        exemplars: real defects (:class:`synth.placement.DefectExemplar`) whose masks are deformed and placed.
        pretrained: SD inpainting model (hub id or folder); default: the one the ControlNet was trained with.
        prompt_template, class_names: the prompt; default: as trained.
        negative_prompt, num_inference_steps, guidance_scale, strength: diffusion settings (pipeline arguments).
        controlnet_scale: ``controlnet_conditioning_scale`` of the pipeline.
        resolution: inference size in pixels; default: the training resolution (else 512).
        scheduler: ``unipc`` (default), ``ddim``, ``dpm`` (DPM-Solver++) or ``ddpm``, built from the model's
            scheduler config.
        device, dtype: where and in which precision to run; default cuda + fp16 when available, else cpu + fp32.
        foreground: ``auto``/``object``/``texture`` placement area (see :func:`synth.placement.estimate_foreground`).
        placement: further :class:`synth.placement.MaskGuidedPlacer` options (scale, rotation, min_inside, ...).

    Raises:
        InputError: a missing ControlNet folder, bad exemplars, a bad local model folder.
        WeightsUnavailableError: ``pretrained`` is a hub id that is not cached and cannot be downloaded.
    """

    def __init__(
        self,
        controlnet: str | Path,
        exemplars: list[Any],
        *,
        pretrained: str | None = None,
        prompt_template: str | None = None,
        class_names: dict[str, str] | None = None,
        negative_prompt: str = "",
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        strength: float = 1.0,
        controlnet_scale: float = 1.0,
        resolution: int | None = None,
        scheduler: str = "unipc",
        device: str | None = None,
        dtype: str = "auto",
        foreground: str = "auto",
        placement: dict[str, Any] | None = None,
    ) -> None:
        from synth.diffusion.components import load_inpaint_components, require_diffusers

        require_diffusers()
        import torch
        from diffusers import ControlNetModel, StableDiffusionControlNetInpaintPipeline

        from synth.core.hub import load_pretrained

        folder, record = resolve_controlnet_dir(controlnet)
        self.controlnet_dir = folder
        self.pretrained = pretrained or record.get("pretrained") or DEFAULT_INPAINT_MODEL
        self.prompt_template = check_prompt_template(
            prompt_template or record.get("prompt_template") or DEFAULT_PROMPT_TEMPLATE)
        self.class_names = {**(record.get("class_names") or {}), **(class_names or {})}
        self.resolution = int(resolution or record.get("resolution") or 512)
        check_scheduler(scheduler)
        self.negative_prompt = negative_prompt
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.strength = float(strength)
        self.controlnet_scale = float(controlnet_scale)
        self.scheduler_name = scheduler

        self.placer = mask_placer(exemplars, foreground, placement)
        self.device, self.dtype = device_and_dtype(device, dtype)
        components = load_inpaint_components(self.pretrained)
        self.vae_scale_factor = components.vae_scale_factor
        if self.resolution % self.vae_scale_factor:
            raise InputError(f"resolution {self.resolution} must be a multiple of {self.vae_scale_factor}.")
        controlnet_model = load_pretrained(ControlNetModel.from_pretrained, str(folder),
                                           what="trained ControlNet", option="method_params.controlnet: /path")
        self.pipeline = StableDiffusionControlNetInpaintPipeline(
            vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
            unet=components.unet, controlnet=controlnet_model,
            scheduler=make_scheduler(scheduler, components.noise_scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        ).to(self.device, None if self.dtype == torch.float32 else self.dtype)
        self.pipeline.set_progress_bar_config(disable=True)

    def _inpaint(self, image: np.ndarray, shape: np.ndarray, touched: np.ndarray, prompt: str, seed: int) -> np.ndarray:
        """One pipeline call at ``resolution``; returns the uint8 result at that size."""
        import torch
        from PIL import Image

        region = repaint_region(touched, self.vae_scale_factor)
        control = np.repeat((shape.astype(np.uint8) * 255)[:, :, None], 3, axis=2)
        # CPU generator: the same seed gives the same noise on any device.
        generator = torch.Generator().manual_seed(seed)
        with torch.inference_mode():
            result = self.pipeline(
                prompt=prompt, negative_prompt=self.negative_prompt or None,
                image=Image.fromarray(image), mask_image=Image.fromarray(region.astype(np.uint8) * 255),
                control_image=Image.fromarray(control), height=self.resolution, width=self.resolution,
                strength=self.strength, num_inference_steps=self.num_inference_steps,
                guidance_scale=self.guidance_scale, controlnet_conditioning_scale=self.controlnet_scale,
                generator=generator, output_type="np",
            ).images[0]
        return to_uint8(result)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> Any:
        """Place a real defect mask on ``image`` and inpaint a new defect there (see the module docstring)."""
        placed = self.placer(image, rng)
        mask = placed.mask
        seed = int(rng.integers(0, 2**31 - 1))
        prompt = make_prompt(self.prompt_template, placed.defect_class, self.class_names)
        size = self.resolution
        shape, touched = resize_mask(mask, size)
        generated = self._inpaint(resize_image(image, size), shape, touched, prompt, seed)
        out = composite(image, generated, mask)
        params = {
            "defect_class": placed.defect_class,
            "prompt": prompt,
            "negative_prompt": self.negative_prompt,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "strength": self.strength,
            "controlnet_scale": self.controlnet_scale,
            "scheduler": self.scheduler_name,
            "resolution": size,
            "diffusion_seed": seed,
            "controlnet": str(self.controlnet_dir),
            "pretrained": str(self.pretrained),
            "placement": {k: v for k, v in placed.params.items() if k not in PAINT_KEYS},
        }
        return GeneratedDefect(image=out, mask=mask, defect_class=placed.defect_class, params=params)


def build_controlnet_generator(
    cfg_params: dict[str, Any],
    masks_dir: Path | None,
    defects_dir: Path | None = None,
    *,
    foreground: str = "auto",
    strict: bool = False,
    skipped: list[str] | None = None,
) -> ControlNetInpaintGenerator:
    """The ``synth generate --method controlnet`` generator from ``method_params`` and the real defect masks.

    Raises:
        ConfigError: a bad ``method_params`` key or value (named).
        InputError: no ``--masks``, a missing ControlNet folder, unusable masks.
    """
    from synth.paste import load_exemplars

    params = validate_config(ControlNetGenerateConfig, dict(cfg_params), source="method_params")
    if masks_dir is None:
        raise InputError("method 'controlnet' places real defect masks: pass --masks DIR (<class>/<name>.png).")
    exemplars = load_exemplars(Path(masks_dir), None if defects_dir is None else Path(defects_dir), strict=strict,
                               skipped=skipped)
    return ControlNetInpaintGenerator(
        params.controlnet, exemplars, pretrained=params.pretrained, prompt_template=params.prompt_template,
        class_names=params.class_names, negative_prompt=params.negative_prompt,
        num_inference_steps=params.num_inference_steps, guidance_scale=params.guidance_scale,
        strength=params.strength, controlnet_scale=params.controlnet_scale, resolution=params.resolution,
        scheduler=params.scheduler, device=params.device, dtype=params.dtype, foreground=foreground,
        placement=params.placement,
    )


def _from_generate_config(cfg: Any, skipped: list[str]) -> Any:
    return build_controlnet_generator(cfg.method_params, cfg.masks, cfg.defects, foreground=cfg.foreground,
                                      strict=cfg.strict, skipped=skipped)


register_generator("controlnet", from_config=_from_generate_config, needs_masks=True, single_process=True,
                   summary="a ControlNet trained on the real defects inpaints each placed mask")
