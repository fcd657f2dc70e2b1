"""Defect generation with CSM semantic guidance: frozen SD inpainting + trained CSM adapter (+ optional ControlNet).

What the paper does
-------------------
AnomalyControl (He et al., 2024, arXiv:2412.06510) generates an anomaly inside a region of a normal image with a
frozen Stable Diffusion model guided by cross-modal semantic features of a (reference defect image + text) pair and a
target text, injected through an adapter, optionally together with a ControlNet-style spatial control.

What this module implements
---------------------------
:class:`CSMGenerator` plugs into ``synth generate`` as a ``DefectGenerator`` (``gen(normal_uint8, rng) ->
GeneratedDefect``):

1. Where: a real defect mask is deformed and placed on the normal image by :class:`synth.placement.
   MaskGuidedPlacer` (the mask-guided placement of ``--method paste``; only its mask is used).
2. Guidance: a reference defect of the same class (image + mask, from a labeled defect set or the ``--masks`` /
   ``--defects`` folders) is cropped around its defect (the training augmentation, drawn from ``rng``) and encoded
   with the frozen CLIP; the trained :class:`~synth.diffusion.csm.CSMAdapter` fuses it with the target text into K
   guidance tokens that the decoupled cross-attention processors add to every UNet cross-attention layer.
3. What: diffusers' ``StableDiffusionInpaintPipeline`` -- or ``StableDiffusionControlNetInpaintPipeline`` with a
   mask ControlNet trained by ``synth train-controlnet`` (condition: the placed mask as a 3-channel image) --
   inpaints the resized image at ``resolution`` with the prompt ``"a photo of a {defect}"``; the inpainting mask is
   the placed mask grown to whole latent cells, as in training. Classifier-free guidance pairs the text prompt with
   the guidance tokens (the unconditional branch gets neither).
4. Composite: the result is resized back and copied into the normal image *only* inside the placed mask: every pixel
   outside it is byte-identical to the input.

Deviations: see :mod:`synth.diffusion.csm`; non-square images are squashed to a square at ``resolution`` and back.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from synth.core.config import StrictModel, validate_config
from synth.core.errors import InputError
from synth.diffusion.components import DEFAULT_INPAINT_MODEL
from synth.diffusion.controlnet import (
    DEFAULT_PROMPT_TEMPLATE,
    AugmentConfig,
    TrainingPair,
    augment_pair,
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
from synth.generators import GeneratedDefect, register_generator

logger = logging.getLogger(__name__)

# Placement keys that describe the alpha paint the placer also renders; that image is thrown away here.


class CSMGenerateConfig(StrictModel):
    """``method_params`` of ``synth generate --method csm`` (configs/generate_csm.yaml).

    Keys left unset (None) come from the adapter's training record (``csm_adapter.json``), then the defaults here.
    """

    adapter: Path = Field(description="a synth train-csm out folder (holds csm_adapter.safetensors)")
    references: Path | None = Field(None, description="labeled defect set with the reference defects; "
                                                      "default: the --masks/--defects pairs")
    controlnet: Path | None = Field(None, description="optional mask ControlNet (synth train-controlnet out folder)")
    pretrained: str | None = Field(None, description="SD inpainting model; default: the one trained with")
    defect_class: str | None = Field(None, min_length=1, description="generate only this class")
    prompt: str | None = Field(None, min_length=1, description="fixed target text for every sample")
    prompt_template: str | None = Field(None, description=f"default: as trained ({DEFAULT_PROMPT_TEMPLATE!r})")
    reference_template: str | None = Field(None, description="text of the reference pair; default: as trained")
    class_names: dict[str, str] | None = Field(None, description="class folder -> words in the prompt")
    clip_checkpoint: Path | None = Field(None, description="local open_clip checkpoint; default: as trained")
    negative_prompt: str = ""
    num_inference_steps: int = Field(30, gt=0)
    guidance_scale: float = Field(7.5, ge=0, description="classifier-free guidance; <= 1 turns it off")
    strength: float = Field(1.0, gt=0, le=1, description="1 = start from pure noise inside the mask")
    adapter_scale: float | None = Field(None, ge=0, description="weight of the CSM guidance; default: as trained")
    controlnet_scale: float = Field(1.0, ge=0, description="weight of the ControlNet residuals")
    resolution: int | None = Field(None, ge=8, multiple_of=8, description="default: the training resolution")
    scheduler: Literal["unipc", "ddim", "dpm", "ddpm"] = "unipc"
    device: str | None = Field(None, description="torch device; default cuda when available, else cpu")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="auto: fp16 on GPU")
    placement: dict[str, Any] = Field(default_factory=dict, description="MaskGuidedPlacer options (scale, ...)")

    @field_validator("prompt_template", "reference_template")
    @classmethod
    def _check_template(cls, value: str | None) -> str | None:
        return None if value is None else check_prompt_template(value)


def load_references(source: str | Path) -> list[TrainingPair]:
    """Reference defects (image, mask, class) of a labeled defect set."""
    from synth.diffusion.train_csm import load_defect_pairs

    return load_defect_pairs(source)


class CSMGenerator:
    """``(normal uint8 HxWx3, rng) -> GeneratedDefect``: placed mask, CSM-guided inpainting, exact composite.

    Args:
        adapter: ``synth train-csm`` out folder (or its ``csm_adapter.safetensors``).
        exemplars: real defects (:class:`synth.placement.DefectExemplar`) whose masks are deformed and placed.
        references: reference defects (:class:`synth.diffusion.controlnet.TrainingPair`: image, mask, class); every
            generated class needs at least one.
        pretrained: SD inpainting model (hub id or folder); default: the one the adapter was trained with.
        controlnet: optional ``synth train-controlnet`` out folder (or its ``controlnet/``): mask control.
        defect_class: generate only this class (its masks when there are any, else every mask, relabelled).
        prompt: fixed target text; default ``prompt_template`` with the class.
        prompt_template, reference_template, class_names: texts; default: as trained.
        clip_checkpoint: local open_clip checkpoint file; default: as trained.
        negative_prompt, num_inference_steps, guidance_scale, strength: diffusion settings (pipeline arguments).
        adapter_scale: weight of the guidance attention; default: as trained.
        controlnet_scale: ``controlnet_conditioning_scale`` (with a ControlNet).
        resolution: inference size in pixels; default: the training resolution.
        scheduler: ``unipc`` (default), ``ddim``, ``dpm`` or ``ddpm``, from the model's scheduler config.
        device, dtype: default cuda + fp16 when available, else cpu + fp32.
        foreground, placement: :class:`synth.placement.MaskGuidedPlacer` area and options.

    Raises:
        InputError: missing adapter / ControlNet folders, classes without references, bad exemplars or options.
        WeightsUnavailableError: SD or CLIP weights that are neither local nor cached and cannot be downloaded.
    """

    def __init__(
        self,
        adapter: str | Path,
        exemplars: list[Any],
        references: list[TrainingPair],
        *,
        pretrained: str | None = None,
        controlnet: str | Path | None = None,
        defect_class: str | None = None,
        prompt: str | None = None,
        prompt_template: str | None = None,
        reference_template: str | None = None,
        class_names: dict[str, str] | None = None,
        clip_checkpoint: str | Path | None = None,
        negative_prompt: str = "",
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        strength: float = 1.0,
        adapter_scale: float | None = None,
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

        from synth.diffusion.csm import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, load_adapter, load_clip_encoder

        loaded = load_adapter(adapter)
        meta = loaded.metadata
        self.adapter_dir = loaded.folder
        self.adapter = loaded.adapter
        self.pretrained = pretrained or meta.get("pretrained") or DEFAULT_INPAINT_MODEL
        self.prompt_template = check_prompt_template(
            prompt_template or meta.get("prompt_template") or DEFAULT_PROMPT_TEMPLATE)
        self.reference_template = check_prompt_template(
            reference_template or meta.get("reference_template") or self.prompt_template)
        self.class_names = {**(meta.get("class_names") or {}), **(class_names or {})}
        self.prompt = prompt
        self.resolution = int(resolution or meta.get("resolution") or 512)
        self.scheduler_name = check_scheduler(scheduler)
        self.negative_prompt = negative_prompt
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.strength = float(strength)
        self.controlnet_scale = float(controlnet_scale)
        if adapter_scale is not None:
            self.adapter.scale = float(adapter_scale)
        self.augment = AugmentConfig(**(meta.get("augment") or {}))

        # Placement needs only the masks; the class to generate decides which of them.
        self.defect_class = defect_class
        if defect_class is not None:
            own = [ex for ex in exemplars if ex.defect_class == defect_class]
            if not own:
                logger.warning("no %r masks among the exemplars: placing every mask as %r", defect_class,
                               defect_class)
            exemplars = own or exemplars
        self.placer = mask_placer(exemplars, foreground, placement)
        masks_only = self.placer.exemplars
        self.references: dict[str, list[TrainingPair]] = {}
        for ref in references:
            self.references.setdefault(ref.defect_class, []).append(ref)
        needed = {defect_class} if defect_class is not None else {ex.defect_class for ex in masks_only}
        missing = sorted(needed - set(self.references))
        if missing:
            raise InputError(f"no reference defect (image + mask) of class(es) {missing}; the references have "
                             f"{sorted(self.references) or 'none'}. Pass references of those classes "
                             f"(method_params.references: a labeled defect set, or --defects with the masks).")

        self.device, self.dtype = device_and_dtype(device, dtype)
        # CLIP first: it is small, so a missing checkpoint fails before the large SD model is read.
        checkpoint = clip_checkpoint or meta.get("clip_checkpoint")
        self.clip = load_clip_encoder(meta.get("clip_model") or DEFAULT_CLIP_MODEL,
                                      meta.get("clip_pretrained") or DEFAULT_CLIP_PRETRAINED, checkpoint,
                                      seed=int(meta.get("clip_seed", 0))).to(self.device)
        if self.clip.embed_dim != self.adapter.config.clip_dim:
            raise InputError(f"the CLIP model gives {self.clip.embed_dim}-d features but the adapter was trained on "
                             f"{self.adapter.config.clip_dim}-d ones; use the CLIP model it was trained with.")
        components = load_inpaint_components(self.pretrained)
        self.vae_scale_factor = components.vae_scale_factor
        if self.resolution % self.vae_scale_factor:
            raise InputError(f"resolution {self.resolution} must be a multiple of {self.vae_scale_factor}.")
        self.adapter.install(components.unet)  # raises when the UNet is not the one trained with
        self.adapter.fusion.to(self.device)  # fusion runs in float32; the processors follow the pipeline's dtype
        self.controlnet_dir = None
        scheduler_obj = make_scheduler(scheduler, components.noise_scheduler.config)
        common = dict(vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
                      unet=components.unet, scheduler=scheduler_obj, safety_checker=None, feature_extractor=None,
                      requires_safety_checker=False)
        if controlnet is not None:
            from diffusers import ControlNetModel, StableDiffusionControlNetInpaintPipeline

            from synth.core.hub import load_pretrained
            from synth.diffusion.pipeline_controlnet_inpaint import resolve_controlnet_dir

            folder, _ = resolve_controlnet_dir(controlnet)
            self.controlnet_dir = folder
            controlnet_model = load_pretrained(ControlNetModel.from_pretrained, str(folder),
                                               what="trained ControlNet", option="method_params.controlnet: /path")
            self.pipeline = StableDiffusionControlNetInpaintPipeline(controlnet=controlnet_model, **common)
        else:
            from diffusers import StableDiffusionInpaintPipeline

            self.pipeline = StableDiffusionInpaintPipeline(**common)
        self.pipeline.to(self.device, self.dtype)
        self.pipeline.set_progress_bar_config(disable=True)
        self._text_cache: dict[str, Any] = {}

    def _text(self, text: str) -> Any:
        if text not in self._text_cache:
            self._text_cache[text] = self.clip.encode_text([text])
        return self._text_cache[text]

    def guidance_tokens(self, target_text: str, reference: TrainingPair, rng: np.random.Generator) -> Any:
        """K guidance tokens (1, K, D) from the target text and a random defect-centred crop of ``reference``."""
        import torch

        from synth.diffusion.train_csm import images_to_tensor, masks_to_tensor

        image, shape, _ = augment_pair(reference, rng, self.clip.image_size[0], self.augment)
        ref_text = make_prompt(self.reference_template, reference.defect_class, self.class_names)
        with torch.inference_mode():
            features = self.clip.encode_image(images_to_tensor([image]).to(self.device))
            return self.adapter.fuse(self._text(target_text), features, self._text(ref_text),
                                     masks_to_tensor([shape]).to(self.device)).tokens

    def _inpaint(self, image: np.ndarray, shape: np.ndarray, touched: np.ndarray, prompt: str, tokens: Any,
                 seed: int) -> np.ndarray:
        """One pipeline call at ``resolution`` with the guidance tokens; the uint8 result at that size."""
        import torch
        from PIL import Image

        region = repaint_region(touched, self.vae_scale_factor)
        kwargs: dict[str, Any] = {}
        if self.controlnet_dir is not None:
            control = np.repeat((shape.astype(np.uint8) * 255)[:, :, None], 3, axis=2)
            kwargs = {"control_image": Image.fromarray(control),
                      "controlnet_conditioning_scale": self.controlnet_scale}
        generator = torch.Generator().manual_seed(seed)  # CPU generator: the same noise on any device
        with torch.inference_mode(), self.adapter.guidance(tokens):
            result = self.pipeline(
                prompt=prompt, negative_prompt=self.negative_prompt or None, image=Image.fromarray(image),
                mask_image=Image.fromarray(region.astype(np.uint8) * 255), height=self.resolution,
                width=self.resolution, strength=self.strength, num_inference_steps=self.num_inference_steps,
                guidance_scale=self.guidance_scale, generator=generator, output_type="np", **kwargs,
            ).images[0]
        return to_uint8(result)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> Any:
        """Place a real defect mask on ``image`` and inpaint a new, CSM-guided defect there."""
        placed = self.placer(image, rng)
        mask = placed.mask
        defect_class = self.defect_class or placed.defect_class
        candidates = self.references[defect_class]
        ref_index = int(rng.integers(len(candidates)))
        reference = candidates[ref_index]
        prompt = self.prompt or make_prompt(self.prompt_template, defect_class, self.class_names)
        tokens = self.guidance_tokens(prompt, reference, rng)
        seed = int(rng.integers(0, 2**31 - 1))
        size = self.resolution
        shape, touched = resize_mask(mask, size)
        generated = self._inpaint(resize_image(image, size), shape, touched, prompt, tokens, seed)
        out = composite(image, generated, mask)
        params = {
            "defect_class": defect_class,
            "prompt": prompt,
            "reference": reference.source,
            "negative_prompt": self.negative_prompt,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "strength": self.strength,
            "adapter_scale": self.adapter.scale,
            "controlnet_scale": self.controlnet_scale if self.controlnet_dir is not None else None,
            "scheduler": self.scheduler_name,
            "resolution": size,
            "diffusion_seed": seed,
            "adapter": str(self.adapter_dir),
            "controlnet": None if self.controlnet_dir is None else str(self.controlnet_dir),
            "pretrained": str(self.pretrained),
            "placement": {k: v for k, v in placed.params.items() if k not in PAINT_KEYS},
        }
        return GeneratedDefect(image=out, mask=mask, defect_class=defect_class, params=params)


def build_csm_generator(
    params: dict[str, Any],
    masks_dir: Path | None,
    defects_dir: Path | None = None,
    *,
    foreground: str = "auto",
    strict: bool = False,
    skipped: list[str] | None = None,
) -> CSMGenerator:
    """The ``synth generate --method csm`` generator from ``method_params`` and the real defect masks.

    References: ``method_params.references`` (a labeled defect set) when set, else the ``--masks`` + ``--defects``
    pairs themselves.

    Raises:
        ConfigError: a bad ``method_params`` key or value (named).
        InputError: no ``--masks``, no references, missing adapter/ControlNet folders, unusable masks.
    """
    from synth.paste import load_exemplars

    cfg = validate_config(CSMGenerateConfig, dict(params), source="method_params")
    if masks_dir is None:
        raise InputError("method 'csm' places real defect masks: pass --masks DIR (<class>/<name>.png).")
    exemplars = load_exemplars(Path(masks_dir), None if defects_dir is None else Path(defects_dir), strict=strict,
                               skipped=skipped)
    if cfg.references is not None:
        references = load_references(cfg.references)
    elif defects_dir is not None:
        references = [TrainingPair(ex.image, ex.mask, ex.defect_class, ex.source) for ex in exemplars]
    else:
        raise InputError("method 'csm' needs reference defect images: pass --defects DIR (the images of --masks) or "
                         "set method_params.references to a labeled defect set.")
    return CSMGenerator(
        cfg.adapter, exemplars, references, pretrained=cfg.pretrained, controlnet=cfg.controlnet,
        defect_class=cfg.defect_class, prompt=cfg.prompt, prompt_template=cfg.prompt_template,
        reference_template=cfg.reference_template, class_names=cfg.class_names, clip_checkpoint=cfg.clip_checkpoint,
        negative_prompt=cfg.negative_prompt, num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale, strength=cfg.strength, adapter_scale=cfg.adapter_scale,
        controlnet_scale=cfg.controlnet_scale, resolution=cfg.resolution, scheduler=cfg.scheduler,
        device=cfg.device, dtype=cfg.dtype, foreground=foreground, placement=cfg.placement,
    )


def _from_generate_config(cfg: Any, skipped: list[str]) -> Any:
    return build_csm_generator(cfg.method_params, cfg.masks, cfg.defects, foreground=cfg.foreground, strict=cfg.strict,
                              skipped=skipped)


register_generator("csm", from_config=_from_generate_config, needs_masks=True, single_process=True,
                   summary="Stable Diffusion inpainting guided by the reference defects (CSM)")
