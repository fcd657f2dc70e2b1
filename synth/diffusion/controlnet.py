"""Few-shot ControlNet training for mask-controlled defect inpainting (AnomalyControl-Inpaint style).

What the papers do
------------------
ControlNet (Zhang et al., 2023, arXiv:2302.05543) adds spatial control to a frozen Stable Diffusion UNet: a
trainable copy of the UNet encoder reads the noisy latents plus a condition image (through a small conv "hint"
encoder) and adds its features to the frozen UNet's skip connections through zero-initialised 1x1 convolutions, so
training starts exactly at the pretrained model. AnomalyControl (He et al., 2024, arXiv:2412.06510) synthesises
industrial anomalies by steering a frozen, pretrained Stable Diffusion model; its inpainting setting generates the
anomaly only inside a given mask of a normal image, with a mask-conditioned ControlNet telling the model the
defect's exact shape and a text prompt naming the defect type.

What this module implements
---------------------------
A frozen Stable Diffusion *inpainting* model (UNet with 9 input channels, VAE, CLIP text encoder, from
:func:`synth.diffusion.components.load_inpaint_components`) and a trainable ``diffusers.ControlNetModel`` whose
condition is the defect mask drawn as a 3-channel image in [0, 1]. The ControlNet is built from the UNet's config
with ``in_channels=4`` because diffusers' ``StableDiffusionControlNetInpaintPipeline`` feeds the ControlNet the 4
noisy latent channels and concatenates mask + masked-image latents only for the UNet; it is initialised from the
UNet weights wherever the shapes agree (``conv_in``: the first 4 input channels, which are the latent channels of
the inpainting UNet). Training data are the few (image, mask, class) defect samples of a labeled defect set
(MVTec layout or ``synth generate`` output, read with :func:`synth.core.defect_set.read_defect_set`) or of a
``masks/<class>/<name>.png`` + ``defects/`` folder pair. Each step draws random square crops that contain the
defect, flips (and optional 90-degree turns) applied identically to image and mask, resizes to ``resolution`` and
minimises the standard diffusion loss (MSE to the noise, or to the velocity for v-prediction models) of::

    UNet(cat(noisy latents, latent mask, masked-image latents), t, text("a photo of a {defect}"),
         + ControlNet(noisy latents, t, text, mask image) residuals)

with only the ControlNet trainable. The inpainted region is the defect mask grown to whole latent cells
(:func:`synth.diffusion.inpainting.latent_region`): the same region the generator passes to the pipeline, so
training and generation see the same masks.

Engineering: ``accelerate.Accelerator`` (mixed precision, gradient accumulation, ``prepare``, ``save_state`` /
``load_state`` checkpoints in ``out/checkpoints/step_N``, automatic resume from the latest one). The script has no
hard-coded device and writes files only on the main process, so ``accelerate launch --multi_gpu ...`` (and
multi-node launches) run it unchanged. Randomness of every micro-step comes from generators seeded by
``(seed, micro_step, process_index)``, so a resumed run is identical to an uninterrupted one and the same seed gives
the same weights on CPU.

Deviations
----------
- AnomalyControl's cross-modal semantic guidance (CSM/ASEA/SGA) is not part of this module (see issue 7, item 3);
  here the defect type reaches the model through the text prompt only.
- The prompt leaves the object name out on purpose ("a photo of a {defect}"): with it the inpainting model tends
  to paint a whole object into the mask.
- The few-shot set is held in memory and each process draws its own random batches (no ``DataLoader``): with a
  handful of samples epochs are meaningless, and per-step seeding makes resume exact without data-loader state.
- Constant learning rate (as the ControlNet paper), no EMA, no validation images during training.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import cv2
import numpy as np
from pydantic import Field, field_validator, model_validator

from synth.core.config import StrictModel, load_config
from synth.core.errors import InputError
from synth.core.io import write_json
from synth.diffusion.components import DEFAULT_INPAINT_MODEL
from synth.diffusion.run_state import (
    CHECKPOINTS_DIR,
    CONFIG_RECORD,
    LOSS_LOG,
    STATE_RECORD,
    already_trained,
    check_same_settings,
    quiet_accelerate,
    replace_dir,
    resume_step,
    stream_seed,
    truncate_log,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CONTROLNET_DIR = "controlnet"
# Settings that may change between runs into the same folder: where it goes, how long, how often to checkpoint.
DEFAULT_PROMPT_TEMPLATE = "a photo of a {defect}"


def check_prompt_template(template: str) -> str:
    """A template must format with ``defect=...`` and nothing else (used by the train and generate configs)."""
    try:
        template.format(defect="scratch")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"must be a Python format string with the single field {{defect}} ({exc!r})") from None
    if "{defect}" not in template:
        raise ValueError("must contain {defect}, e.g. 'a photo of a {defect}'")
    return template


def make_prompt(template: str, defect_class: str, class_names: dict[str, str]) -> str:
    """The text prompt for a class: ``class_names`` maps folder names to words; default: underscores -> spaces."""
    return template.format(defect=class_names.get(defect_class, defect_class.replace("_", " ")))


class AugmentConfig(StrictModel):
    """Augmentations of the few training pairs; image and mask always get the identical transform."""

    hflip: bool = Field(True, description="random horizontal flips")
    vflip: bool = Field(True, description="random vertical flips")
    rotate90: bool = Field(False, description="random 90-degree turns (good for textures, not for objects)")
    crop_scale: tuple[float, float] = Field(
        (0.6, 1.0), description="side of the random square crop around the defect, as a fraction of the shorter "
                                "image side; (1, 1) = the largest square that holds the defect")

    @field_validator("crop_scale")
    @classmethod
    def _check_crop_scale(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError("must be (min, max) with 0 < min <= max <= 1")
        return value


class ControlNetTrainConfig(StrictModel):
    """Settings of ``synth train-controlnet`` (configs/train_controlnet.yaml)."""

    out: Path = Field(description="output folder: controlnet/, checkpoints/, train_config.json, train_log.jsonl")
    data: Path | None = Field(None, description="labeled defect set (MVTec layout or synth generate output)")
    masks: Path | None = Field(None, description="instead of data: real defect masks <class>/<name>.png")
    defects: Path | None = Field(None, description="with masks: the defect images the masks belong to")
    shots: int | None = Field(None, gt=0, description="use only the first N defect samples of each class")
    pretrained: str = Field(DEFAULT_INPAINT_MODEL, description="SD inpainting model: hub id or local folder")
    init_controlnet: Path | None = Field(None, description="start from this saved ControlNet instead of the UNet")
    resolution: int = Field(512, ge=8, multiple_of=8, description="training crop size in pixels")
    train_steps: int = Field(1000, gt=0, description="optimizer steps in total (raise it to continue training)")
    batch_size: int = Field(4, gt=0, description="samples per micro-step and process")
    gradient_accumulation_steps: int = Field(1, gt=0)
    learning_rate: float = Field(1e-5, gt=0)
    adam_weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="fp16/bf16: for GPUs")
    gradient_checkpointing: bool = Field(False, description="trade compute for memory (UNet and ControlNet)")
    checkpoint_every: int = Field(250, gt=0, description="save a resumable checkpoint every N steps")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept")
    seed: int = Field(0, ge=0)
    prompt_template: str = Field(DEFAULT_PROMPT_TEMPLATE, description="'{defect}' is replaced by the class name")
    class_names: dict[str, str] = Field(default_factory=dict, description="class folder -> words in the prompt")
    prompt_dropout: float = Field(0.0, ge=0, le=1, description="probability of an empty prompt (for CFG)")
    conditioning: Literal["mask"] = Field("mask", description="ControlNet condition: the defect mask, 3 channels")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @field_validator("prompt_template")
    @classmethod
    def _check_template(cls, value: str) -> str:
        return check_prompt_template(value)

    @model_validator(mode="after")
    def _check_source(self) -> ControlNetTrainConfig:
        if (self.data is None) == (self.masks is None):
            raise ValueError("set either 'data' (a labeled defect set) or 'masks' + 'defects' (real defect masks "
                             "and their images), not both and not neither")
        if self.masks is not None and self.defects is None:
            raise ValueError("'masks' needs 'defects': training learns the defects' appearance from their images")
        return self


def load_train_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ControlNetTrainConfig:
    """Load and validate a training config (YAML file and/or overrides); bad keys raise ConfigError."""
    return load_config(ControlNetTrainConfig, path, overrides)


# --------------------------------------------------------------------------------------------------
# training data
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TrainingPair:
    """One real defect: uint8 HxWx3 image, bool HxW mask (non-empty), class, where it came from."""

    image: np.ndarray
    mask: np.ndarray
    defect_class: str
    source: str


def load_training_pairs(cfg: ControlNetTrainConfig) -> list[TrainingPair]:
    """The few (image, mask, class) defect samples; empty masks are skipped, none left is an InputError."""
    pairs: list[TrainingPair] = []
    if cfg.data is not None:
        from synth.core.defect_set import read_defect_set

        dataset = read_defect_set(cfg.data)
        samples = dataset.select(anomalous=True)
        if not samples:
            raise InputError(f"{cfg.data}: the set has no anomalous sample; ControlNet training needs a few defect "
                             f"images with masks (test/<class>/<name>.png + ground_truth/<class>/<name>_mask.png).")
        for sample in samples:
            image = dataset.load_image(sample)
            mask = dataset.load_mask(sample, image.shape[:2])
            if not mask.any():
                logger.warning("%s: empty defect mask skipped", dataset.mask_path(sample))
                continue
            pairs.append(TrainingPair(image, mask, sample.defect_class, str(dataset.image_path(sample))))
        where = cfg.data
    else:
        from synth.paste import load_exemplars

        assert cfg.masks is not None and cfg.defects is not None  # guaranteed by the config validator
        for ex in load_exemplars(cfg.masks, cfg.defects):
            pairs.append(TrainingPair(ex.image, ex.mask, ex.defect_class, ex.source))
        where = cfg.masks
    if not pairs:
        raise InputError(f"{where}: every defect mask is empty; masks must mark defect pixels.")
    if cfg.shots is not None:
        taken: dict[str, int] = {}
        kept = []
        for pair in pairs:  # file order: the same shots on every run
            if taken.get(pair.defect_class, 0) < cfg.shots:
                taken[pair.defect_class] = taken.get(pair.defect_class, 0) + 1
                kept.append(pair)
        pairs = kept
    return pairs


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _window_start(lo: int, hi: int, side: int, limit: int, rng: np.random.Generator) -> int:
    """Start of a window of length ``side`` in ``[0, limit)`` that covers ``[lo, hi)`` (or lies inside it)."""
    first = max(0, min(lo, hi - side))
    last = min(limit - side, max(lo, hi - side))
    if last < first:  # the defect touches both borders of a too-small range: any valid start
        first, last = 0, limit - side
    return int(rng.integers(first, last + 1))


def resize_mask(mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A bool mask resized to ``size x size``: (shape mask: area >= 0.5, touched: area > 0).

    The shape mask is the ControlNet condition; thin defects that area-averaging would erase keep every touched
    pixel. ``touched`` marks every pixel the defect reaches and defines the inpainted region.
    """
    soft = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    touched = soft > 0
    shape = soft >= 0.5
    return (shape if shape.any() else touched), touched


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 HxWx3 to ``size x size`` (area filter when shrinking, cubic when enlarging)."""
    if image.shape[:2] == (size, size):
        return image.copy()
    shrink = size < max(image.shape[:2])
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def augment_pair(pair: TrainingPair, rng: np.random.Generator, resolution: int,
                 augment: AugmentConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random square crop that contains the defect, flips/turns, resized: (image, shape mask, touched mask).

    Every random draw happens in a fixed order, so the same generator state gives the same crop.
    """
    h, w = pair.mask.shape
    y0, y1, x0, x1 = _bbox(pair.mask)
    short = min(h, w)
    side = max(1, min(short, int(round(rng.uniform(*augment.crop_scale) * short))))
    top = _window_start(y0, y1, side, h, rng)
    left = _window_start(x0, x1, side, w, rng)
    if not pair.mask[top:top + side, left:left + side].any():
        # A sparse defect larger than the crop (a long diagonal scratch) can miss a window that lies inside its
        # bounding box: centre the window on a random defect pixel instead.
        ys, xs = np.nonzero(pair.mask)
        pick = int(rng.integers(len(ys)))
        top = int(np.clip(ys[pick] - side // 2, 0, h - side))
        left = int(np.clip(xs[pick] - side // 2, 0, w - side))
    mask = pair.mask[top:top + side, left:left + side]
    image = pair.image[top:top + side, left:left + side]
    flip_h = augment.hflip and bool(rng.random() < 0.5)
    flip_v = augment.vflip and bool(rng.random() < 0.5)
    turns = int(rng.integers(4)) if augment.rotate90 else 0
    if flip_h:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if flip_v:
        image, mask = image[::-1], mask[::-1]
    if turns:
        image, mask = np.rot90(image, turns), np.rot90(mask, turns)
    image = resize_image(np.ascontiguousarray(image), resolution)
    shape, touched = resize_mask(np.ascontiguousarray(mask), resolution)
    return image, shape, touched


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------


def controlnet_from_inpaint_unet(unet: Any) -> Any:
    """A ControlNet for a 9-channel inpainting UNet: 4 latent input channels, weights copied from the UNet.

    ``ControlNetModel.from_unet`` copies ``in_channels`` (9) from the UNet; the inpainting pipelines feed the
    ControlNet only the 4 noisy latent channels, so the config is taken from ``from_unet`` (built on the meta device,
    no memory) with ``in_channels=4`` and the UNet weights are copied where shapes agree: ``conv_in`` keeps the
    kernels of the 4 latent channels, time embeddings, down blocks and mid block are copied whole. The hint encoder
    and the zero convolutions keep their own (zero for the output convolutions) initialisation.
    """
    import torch
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    with init_empty_weights():
        probe = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    config = dict(probe.config)
    config["in_channels"] = unet.config.out_channels  # the noisy latents: 4 channels for SD
    controlnet = ControlNetModel.from_config(config)
    with torch.no_grad():
        latent_channels = controlnet.conv_in.weight.shape[1]
        controlnet.conv_in.weight.copy_(unet.conv_in.weight[:, :latent_channels])
        controlnet.conv_in.bias.copy_(unet.conv_in.bias)
    controlnet.time_proj.load_state_dict(unet.time_proj.state_dict())
    controlnet.time_embedding.load_state_dict(unet.time_embedding.state_dict())
    if controlnet.class_embedding is not None:
        controlnet.class_embedding.load_state_dict(unet.class_embedding.state_dict())
    if getattr(controlnet, "add_embedding", None) is not None:
        controlnet.add_embedding.load_state_dict(unet.add_embedding.state_dict())
    controlnet.down_blocks.load_state_dict(unet.down_blocks.state_dict())
    controlnet.mid_block.load_state_dict(unet.mid_block.state_dict())
    return controlnet


def encode_prompts(prompts: list[str], tokenizer: Any, text_encoder: Any, device: Any) -> torch.Tensor:
    """CLIP text embeddings (last hidden state), padded to the tokenizer's maximum length like the pipelines."""
    import torch

    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    with torch.no_grad():
        return text_encoder(tokens.input_ids.to(device))[0]


# --------------------------------------------------------------------------------------------------
# run bookkeeping
# --------------------------------------------------------------------------------------------------


def _config_record(cfg: ControlNetTrainConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------


def train_controlnet(cfg: ControlNetTrainConfig, progress: bool = True) -> Path:
    """Train the mask-conditioned ControlNet on a few defect samples; returns ``cfg.out / "controlnet"``.

    Resumes from the newest ``out/checkpoints/step_N`` (raising ``train_steps`` continues a finished run); a
    finished run with the same ``train_steps`` is a no-op. Settings other than out/train_steps/checkpoint_every/
    keep_checkpoints must match the ones recorded in ``out/train_config.json``.

    Raises:
        InputError: no usable defect sample, an out folder trained with other settings, a bad local model folder.
        WeightsUnavailableError: ``pretrained`` is a hub id that is not cached and cannot be downloaded.
    """
    from synth.diffusion.components import require_diffusers

    require_diffusers()
    import torch
    import torch.nn.functional as F
    from accelerate.utils import set_seed

    from synth.core.hub import load_pretrained
    from synth.diffusion.components import load_inpaint_components
    from synth.diffusion.trainer import (
        check_inpaint_model,
        denoising_inputs,
        make_accelerator,
        run_training_steps,
    )

    out = Path(cfg.out)
    final_dir = out / CONTROLNET_DIR
    record = _config_record(cfg)
    check_same_settings(out, record, "a ControlNet")
    if already_trained(out, cfg.train_steps, (final_dir / "config.json").exists(), "a ControlNet"):
        return final_dir
    start_step = resume_step(out, cfg.train_steps)
    pairs = load_training_pairs(cfg)

    accelerator, weight_dtype = make_accelerator(cfg.gradient_accumulation_steps, cfg.mixed_precision)
    main = accelerator.is_main_process

    components = load_inpaint_components(cfg.pretrained)
    prediction_type, _ = check_inpaint_model(components, cfg.pretrained, cfg.resolution)

    # Same seed -> same initial ControlNet (the hint encoder is randomly initialised).
    set_seed(cfg.seed)
    if cfg.init_controlnet is not None:
        from diffusers import ControlNetModel

        controlnet = load_pretrained(ControlNetModel.from_pretrained, cfg.init_controlnet,
                                     what="initial ControlNet", option="init_controlnet: /path")
    else:
        controlnet = controlnet_from_inpaint_unet(components.unet)
    if cfg.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
        components.unet.enable_gradient_checkpointing()
    controlnet.train()
    # Cast the frozen parts only for mixed precision (any dtype argument, even None, makes diffusers warn).
    for module in (components.vae, components.unet, components.text_encoder):
        if weight_dtype == torch.float32:
            module.to(accelerator.device)
        else:
            module.to(accelerator.device, dtype=weight_dtype)
    unet = components.unet

    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=cfg.learning_rate, weight_decay=cfg.adam_weight_decay)
    controlnet, optimizer = accelerator.prepare(controlnet, optimizer)

    if start_step:
        with quiet_accelerate():
            accelerator.load_state(str(out / CHECKPOINTS_DIR / f"step_{start_step}"))
        logger.info("resumed from %s", out / CHECKPOINTS_DIR / f"step_{start_step}")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / CONFIG_RECORD, record)
        truncate_log(out / LOSS_LOG, start_step)
    accelerator.wait_for_everyone()

    # The text encoder is frozen: embed every class prompt (and the empty prompt) once.
    classes = sorted({p.defect_class for p in pairs})
    prompts = [make_prompt(cfg.prompt_template, c, cfg.class_names) for c in classes] + [""]
    embeddings = encode_prompts(prompts, components.tokenizer, components.text_encoder, accelerator.device)
    class_index = {c: i for i, c in enumerate(classes)}

    def micro_batch(micro_step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([cfg.seed, micro_step, accelerator.process_index])
        images, shapes, touched, rows = [], [], [], []
        for _ in range(cfg.batch_size):
            pair = pairs[int(rng.integers(len(pairs)))]
            image, shape, touch = augment_pair(pair, rng, cfg.resolution, cfg.augment)
            images.append(image)
            shapes.append(shape)
            touched.append(touch)
            rows.append(len(prompts) - 1 if rng.random() < cfg.prompt_dropout else class_index[pair.defect_class])
        device = accelerator.device
        return {
            "pixels": torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(device),
            "shape": torch.from_numpy(np.stack(shapes)).unsqueeze(1).float().to(device),
            "touched": torch.from_numpy(np.stack(touched)).unsqueeze(1).float().to(device),
            "text": embeddings[torch.tensor(rows, device=embeddings.device)],
        }

    def loss_of(batch: dict[str, torch.Tensor], micro_step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(stream_seed(cfg.seed, micro_step, accelerator.process_index, 1))
        noisy, unet_input, timesteps, target = denoising_inputs(
            components, batch["pixels"], batch["touched"], weight_dtype=weight_dtype, generator=generator,
            prediction_type=prediction_type)
        control = batch["shape"].expand(-1, 3, -1, -1)
        down, mid = controlnet(noisy.float(), timesteps, encoder_hidden_states=batch["text"].float(),
                               controlnet_cond=control, return_dict=False)
        prediction = unet(unet_input, timesteps, encoder_hidden_states=batch["text"].to(weight_dtype),
                          down_block_additional_residuals=[d.to(weight_dtype) for d in down],
                          mid_block_additional_residual=mid.to(weight_dtype), return_dict=False)[0]
        return F.mse_loss(prediction.float(), target.float())

    run_training_steps(accelerator, controlnet, optimizer, controlnet.parameters(), micro_batch=micro_batch,
                       loss_of=loss_of, out=out, start_step=start_step, train_steps=cfg.train_steps,
                       max_grad_norm=cfg.max_grad_norm, checkpoint_every=cfg.checkpoint_every,
                       keep_checkpoints=cfg.keep_checkpoints, desc="train ControlNet", progress=progress)

    accelerator.wait_for_everyone()
    if main:
        tmp = out / f".{CONTROLNET_DIR}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        accelerator.unwrap_model(controlnet).save_pretrained(str(tmp), safe_serialization=True)
        replace_dir(tmp, final_dir)
        write_json(out / STATE_RECORD, {"completed_steps": cfg.train_steps})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final_dir
