"""The accelerate training loop shared by the learned generators (ControlNet inpainting, CSM adapter).

Each trainer builds its own trainable module and batches; this module holds what they do alike: the Accelerator
(mixed precision refused with a clear message where the hardware lacks it), the SD-inpainting checks, the
noised-latent inputs and targets of one denoising step, complete-or-absent checkpoints, and the step loop with
gradient accumulation, clipping, a finite-loss check, the loss log and periodic checkpoints.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from synth.core.errors import InputError
from synth.diffusion.run_state import CHECKPOINTS_DIR, LOSS_LOG, checkpoint_steps, quiet_accelerate, replace_dir

if TYPE_CHECKING:
    import torch


def make_accelerator(gradient_accumulation_steps: int, mixed_precision: str) -> tuple[Any, torch.dtype]:
    """(Accelerator, dtype of the frozen parts: float16 / bfloat16 under mixed precision, else float32)."""
    import torch
    from accelerate import Accelerator

    try:
        accelerator = Accelerator(gradient_accumulation_steps=gradient_accumulation_steps,
                                  mixed_precision=mixed_precision)
    except ValueError as exc:  # e.g. fp16 without a GPU
        raise InputError(f"mixed_precision={mixed_precision!r} cannot be used here ({exc}); "
                         f"use mixed_precision: 'no' on CPU.") from None
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    return accelerator, weight_dtype


def check_inpaint_model(components: Any, pretrained: str | Path, resolution: int) -> tuple[str, int]:
    """(scheduler prediction type, VAE scale factor), refusing what the trainers cannot train."""
    prediction_type = components.noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise InputError(f"{pretrained}: scheduler prediction_type {prediction_type!r} is not supported "
                         f"(epsilon or v_prediction).")
    vsf = components.vae_scale_factor
    if resolution % vsf:
        raise InputError(f"resolution {resolution} must be a multiple of the VAE scale factor {vsf}.")
    return prediction_type, vsf


def denoising_inputs(components: Any, pixels: torch.Tensor, touched: torch.Tensor, *, weight_dtype: torch.dtype,
                     generator: torch.Generator, prediction_type: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One SD-inpainting training step's (noisy latents, 9-channel UNet input, timesteps, target).

    ``pixels`` in [-1, 1]; ``touched`` (N, 1, H, W) marks the pixels the defect changed, which are masked out of
    the conditioning image at latent resolution, as the inpainting UNet sees them at inference.
    """
    import torch

    from synth.diffusion.inpainting import latent_region, pixel_region

    vae, noise_scheduler, vsf = components.vae, components.noise_scheduler, components.vae_scale_factor
    scaling = vae.config.scaling_factor
    pixels = pixels.to(weight_dtype)
    latent_mask = latent_region(touched, vsf)
    masked = pixels * (1.0 - pixel_region(latent_mask, vsf).to(weight_dtype))
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.sample(generator) * scaling
        masked_latents = vae.encode(masked).latent_dist.sample(generator) * scaling
    # Noise and timesteps drawn on the CPU: the same values on every device type.
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator).to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    unet_input = torch.cat([noisy, latent_mask.to(weight_dtype), masked_latents], dim=1)
    target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
    return noisy, unet_input, timesteps, target


def save_checkpoint(accelerator: Any, out: Path, step: int, keep: int) -> None:
    """``accelerator.save_state`` into ``out/checkpoints/step_N``, renamed into place only when complete."""
    folder = out / CHECKPOINTS_DIR
    tmp = folder / f".step_{step}.tmp"
    main = accelerator.is_main_process
    if main:
        folder.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    with quiet_accelerate():
        accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if main:
        # Rename only complete checkpoints, so a kill mid-save never leaves a step_N to resume from.
        replace_dir(tmp, folder / f"step_{step}")
        for old in checkpoint_steps(out)[:-keep]:
            shutil.rmtree(folder / f"step_{old}", ignore_errors=True)
    accelerator.wait_for_everyone()


def run_training_steps(accelerator: Any, model: Any, optimizer: Any, trainable: Iterable[Any], *,
                       micro_batch: Callable[[int], Any], loss_of: Callable[[Any, int], torch.Tensor], out: Path,
                       start_step: int, train_steps: int, max_grad_norm: float, checkpoint_every: int,
                       keep_checkpoints: int, desc: str, progress: bool) -> None:
    """Steps ``start_step`` .. ``train_steps`` of gradient accumulation (one micro batch per accumulation slot,
    seeded by its global micro-step index, so a resumed run draws the same batches); the loss rows and a
    checkpoint are written every ``checkpoint_every`` steps and at the end."""
    from tqdm import tqdm

    trainable = list(trainable)
    accumulation = accelerator.gradient_accumulation_steps
    main = accelerator.is_main_process
    log_rows: list[str] = []
    with tqdm(total=train_steps, initial=start_step, desc=desc, unit="step",
              disable=not (progress and main)) as bar:
        for step in range(start_step, train_steps):
            losses = []
            for k in range(accumulation):
                micro_step = step * accumulation + k
                with accelerator.accumulate(model):
                    loss = loss_of(micro_batch(micro_step), micro_step)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(trainable, max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
            value = sum(losses) / len(losses)
            if not math.isfinite(value):
                raise InputError(f"the training loss became {value} at step {step + 1}; lower learning_rate or use "
                                 f"mixed_precision 'bf16'/'no' (the last checkpoint is kept).")
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            log_rows.append(json.dumps({"loss": value, "step": step + 1}, sort_keys=True) + "\n")
            done = step + 1
            if done % checkpoint_every == 0 or done == train_steps:
                if main:
                    with open(out / LOSS_LOG, "a", encoding="utf-8") as handle:
                        handle.writelines(log_rows)
                log_rows = []
                save_checkpoint(accelerator, out, done, keep_checkpoints)
