"""The frozen Stable Diffusion inpainting parts every learned generator builds on.

``load_inpaint_components("stabilityai/stable-diffusion-2-inpainting")`` (the default, for users with internet)
and ``load_inpaint_components("/path/to/folder")`` (a folder in diffusers' layout: ``unet/ vae/ text_encoder/
tokenizer/ scheduler/``, e.g. from ``hf download`` or :func:`synth.diffusion.tiny.write_tiny_inpaint_model`) take
the same code path; offline, a hub id that is not cached fails at once with a message naming it and
``--pretrained /path``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synth.core.errors import InputError

DEFAULT_INPAINT_MODEL = "stabilityai/stable-diffusion-2-inpainting"
PRETRAINED_OPTION = "--pretrained /path (YAML: pretrained: /path)"


def require_diffusers() -> None:
    """Fail with the install command when the ``diffusion`` extra is missing."""
    try:
        import accelerate  # noqa: F401
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise InputError(f"learned generation needs the diffusion extra ({exc}); "
                         f"pip install 'pixelvision[diffusion]'.") from None


@dataclass
class InpaintComponents:
    """Frozen parts of a Stable Diffusion inpainting model (UNet with 9 input channels)."""

    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    source: str

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def freeze(self) -> InpaintComponents:
        for module in (self.vae, self.unet, self.text_encoder):
            module.requires_grad_(False)
            module.eval()
        return self

    def to(self, device: Any, dtype: Any = None) -> InpaintComponents:
        for module in (self.vae, self.unet, self.text_encoder):
            # No dtype argument unless asked: diffusers warns about float32-only modules on any dtype.
            module.to(device) if dtype is None else module.to(device=device, dtype=dtype)
        return self


def load_inpaint_components(pretrained: str | Path = DEFAULT_INPAINT_MODEL) -> InpaintComponents:
    """Load VAE, inpainting UNet, CLIP text encoder, tokenizer and DDPM noise scheduler, frozen, in eval mode.

    Raises:
        InputError: a local folder that does not hold an inpainting model, or a UNet without 9 input channels.
        WeightsUnavailableError: a hub id that is neither cached nor downloadable now.
    """
    require_diffusers()
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from synth.core.hub import load_pretrained

    source = str(pretrained)

    def load(cls_loader: Any, subfolder: str, what: str) -> Any:
        return load_pretrained(cls_loader, source, what=f"Stable Diffusion inpainting {what}",
                               option=PRETRAINED_OPTION, subfolder=subfolder)

    unet = load(UNet2DConditionModel.from_pretrained, "unet", "UNet")
    if unet.config.in_channels != 9:
        raise InputError(f"{source}: its UNet has {unet.config.in_channels} input channels; an inpainting model "
                         f"(9: latents + mask + masked-image latents) is needed, e.g. {DEFAULT_INPAINT_MODEL}.")
    components = InpaintComponents(
        vae=load(AutoencoderKL.from_pretrained, "vae", "VAE"),
        unet=unet,
        text_encoder=load(CLIPTextModel.from_pretrained, "text_encoder", "text encoder"),
        tokenizer=load(CLIPTokenizer.from_pretrained, "tokenizer", "tokenizer"),
        noise_scheduler=load(DDPMScheduler.from_pretrained, "scheduler", "scheduler"),
        source=source,
    )
    return components.freeze()
