"""``synth train-csm``: few-shot training of the CSM semantic-guidance adapter (AnomalyControl-CSM style).

What is trained
---------------
The frozen Stable Diffusion *inpainting* model (VAE, 9-channel UNet, text encoder from
:func:`synth.diffusion.components.load_inpaint_components`) and a frozen open_clip ViT stay fixed; the
:class:`~synth.diffusion.csm.CSMAdapter` trains: the cross-modal fusion module (target text -> reference defect
image + mask + reference text, mask-biased attention) and the new ``to_k_ip``/``to_v_ip`` of every UNet
cross-attention layer (decoupled cross-attention, initialised from ``to_k``/``to_v``; see :mod:`synth.diffusion.csm`).

Data: the few (image, mask, class) defect samples of a labeled defect set (``read_defect_set``: MVTec layout or
``synth generate`` output). Each training sample is a *target* defect plus a *reference* defect of the same class
(another sample when the class has more than one, otherwise the same sample under another random crop/flip, so the
adapter learns to transfer the defect's look, not to copy the reference's pixels). Target and reference get
independent random square crops that contain the defect and flips (:func:`synth.diffusion.controlnet.augment_pair`,
the ControlNet trainer's augmentation); the target is inpainted at ``resolution``, the reference goes to CLIP at its
input size. Loss: the standard diffusion loss of::

    UNet(cat(noisy latents, latent mask, masked-image latents), t, text("a photo of a {defect}"),
         + guidance tokens CSM(target text, reference image, reference mask, reference text))

(MSE to the noise, or to the velocity for v-prediction models); with probability ``guidance_dropout`` a sample's
guidance tokens are zeroed (IP-Adapter's image-embedding dropout), which trains the unguided branch that
classifier-free guidance uses at generation.

Engineering, as :mod:`synth.diffusion.controlnet`: ``accelerate.Accelerator`` (prepare, mixed precision, gradient
accumulation, ``save_state``/``load_state`` checkpoints in ``out/checkpoints/step_N``, automatic resume from the
newest), main-process-only writes and progress bar, no hard-coded device, so ``accelerate launch --multi_gpu``
(and multi-node launches) run it unchanged. The randomness of micro-step ``m`` on process ``p`` comes from
generators seeded by ``(seed, m, p)``: a resumed run equals an uninterrupted one and the same seed gives the same
weights on the same hardware. Output: ``out/csm_adapter.safetensors`` + ``out/csm_adapter.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from synth.core.config import StrictModel, load_config
from synth.core.errors import InputError
from synth.core.io import write_json
from synth.diffusion.components import DEFAULT_INPAINT_MODEL
from synth.diffusion.controlnet import (
    DEFAULT_PROMPT_TEMPLATE,
    AugmentConfig,
    TrainingPair,
    augment_pair,
    check_prompt_template,
    make_prompt,
)
from synth.diffusion.run_state import (
    CHECKPOINTS_DIR,
    CONFIG_RECORD,
    LOSS_LOG,
    STATE_RECORD,
    already_trained,
    check_same_settings,
    resume_step,
    stream_seed,
    truncate_log,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "ViT-B-16"  # = synth.diffusion.csm.DEFAULT_CLIP_MODEL (kept here: csm imports torch)
DEFAULT_CLIP_PRETRAINED = "laion2b_s34b_b88k"
# Settings that may change between runs into the same folder: where it goes, how long, how often to checkpoint.


class CSMTrainConfig(StrictModel):
    """Settings of ``synth train-csm`` (configs/train_csm.yaml)."""

    out: Path = Field(description="output folder: csm_adapter.safetensors/.json, checkpoints/, train records")
    data: Path = Field(description="labeled defect set (MVTec layout or synth generate output) with masks")
    shots: int | None = Field(None, gt=0, description="use only the first N defect samples of each class")
    pretrained: str = Field(DEFAULT_INPAINT_MODEL, description="SD inpainting model: hub id or local folder")
    clip_model: str = Field(DEFAULT_CLIP_MODEL, min_length=1, description="open_clip ViT name or model-config JSON")
    clip_pretrained: str = Field(DEFAULT_CLIP_PRETRAINED, min_length=1,
                                 description="open_clip pretrained tag ('random': random weights, tests only)")
    clip_checkpoint: Path | None = Field(None, description="local open_clip checkpoint file (offline use)")
    resolution: int = Field(512, ge=8, multiple_of=8, description="training crop size in pixels")
    train_steps: int = Field(1000, gt=0, description="optimizer steps in total (raise it to continue training)")
    batch_size: int = Field(4, gt=0, description="samples per micro-step and process")
    gradient_accumulation_steps: int = Field(1, gt=0)
    learning_rate: float = Field(1e-4, gt=0, description="IP-Adapter's value")
    adam_weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="fp16/bf16 need a GPU")
    checkpoint_every: int = Field(250, gt=0, description="save a resumable checkpoint every N steps")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept")
    seed: int = Field(0, ge=0)
    prompt_template: str = Field(DEFAULT_PROMPT_TEMPLATE, description="target text and SD prompt; '{defect}'")
    reference_template: str | None = Field(None, description="text of the reference pair; default prompt_template")
    class_names: dict[str, str] = Field(default_factory=dict, description="class folder -> words in the prompt")
    num_tokens: int = Field(4, gt=0, le=77, description="K guidance tokens appended to the cross-attention")
    adapter_scale: float = Field(1.0, gt=0, description="weight of the guidance attention while training")
    fusion_heads: int = Field(8, gt=0, description="attention heads of the fusion module (divide CLIP's width)")
    mask_prior: float = Field(1.0, ge=0, description="strength of the defect-mask attention prior (0: off)")
    mask_background: float = Field(0.1, gt=0, le=1, description="prior attention share left outside the mask")
    guidance_dropout: float = Field(0.05, ge=0, lt=1, description="probability of zero guidance tokens (for CFG)")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @field_validator("prompt_template", "reference_template")
    @classmethod
    def _check_template(cls, value: str | None) -> str | None:
        return None if value is None else check_prompt_template(value)


def load_train_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> CSMTrainConfig:
    """Load and validate a training config (YAML file and/or overrides); bad keys raise ConfigError."""
    return load_config(CSMTrainConfig, path, overrides)


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def load_defect_pairs(data: str | Path, shots: int | None = None) -> list[TrainingPair]:
    """The (image, mask, class) defect samples of a labeled defect set; empty masks skipped, none left: error."""
    from synth.core.defect_set import read_defect_set

    dataset = read_defect_set(data)
    samples = dataset.select(anomalous=True)
    if not samples:
        raise InputError(f"{data}: the set has no defect sample; CSM training needs a few defect images with masks "
                         f"(test/<class>/<name>.png + ground_truth/<class>/<name>_mask.png).")
    pairs: list[TrainingPair] = []
    taken: dict[str, int] = {}
    for sample in samples:  # file order: the same shots on every run
        if shots is not None and taken.get(sample.defect_class, 0) >= shots:
            continue
        image = dataset.load_image(sample)
        mask = dataset.load_mask(sample, image.shape[:2])
        if not mask.any():
            logger.warning("%s: empty defect mask skipped", dataset.mask_path(sample))
            continue
        taken[sample.defect_class] = taken.get(sample.defect_class, 0) + 1
        pairs.append(TrainingPair(image, mask, sample.defect_class, str(dataset.image_path(sample))))
    if not pairs:
        raise InputError(f"{data}: every defect mask is empty; masks must mark defect pixels.")
    return pairs


def pick_reference(index: int, pairs: list[TrainingPair], by_class: dict[str, list[int]],
                   rng: np.random.Generator) -> int:
    """Another sample of the same class as ``pairs[index]`` (itself only when it is its class's only sample)."""
    same = [j for j in by_class[pairs[index].defect_class] if j != index] or [index]
    return same[int(rng.integers(len(same)))]


def images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 list -> (B, 3, H, W) floats in [0, 1]."""
    import torch

    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255.0)


def masks_to_tensor(masks: list[np.ndarray]) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.stack(masks)).unsqueeze(1).float()


# --------------------------------------------------------------------------------------------------
# run bookkeeping
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------


def train_csm(cfg: CSMTrainConfig, progress: bool = True) -> Path:
    """Train the CSM adapter on a few defect samples; returns ``cfg.out`` (holding ``csm_adapter.safetensors``).

    Resumes from the newest ``out/checkpoints/step_N``; raising ``train_steps`` continues a finished run; a finished
    run with the same ``train_steps`` is a no-op. Other settings must match ``out/train_config.json``.

    Raises:
        InputError: no usable defect sample, an out folder trained with other settings, bad local model files.
        WeightsUnavailableError: the SD model or the CLIP weights are not cached and cannot be downloaded now.
    """
    from synth.diffusion.components import require_diffusers

    require_diffusers()
    import torch
    import torch.nn.functional as F

    from synth.diffusion.components import load_inpaint_components
    from synth.diffusion.controlnet import encode_prompts
    from synth.diffusion.csm import ADAPTER_WEIGHTS, CSMAdapter, CSMTrainingModule, load_clip_encoder
    from synth.diffusion.trainer import (
        check_inpaint_model,
        denoising_inputs,
        make_accelerator,
        run_training_steps,
    )

    out = Path(cfg.out)
    record = cfg.model_dump(mode="json")
    check_same_settings(out, record, "a CSM adapter")
    if already_trained(out, cfg.train_steps, (out / ADAPTER_WEIGHTS).is_file(), "an adapter"):
        return out
    start_step = resume_step(out, cfg.train_steps)
    pairs = load_defect_pairs(cfg.data, cfg.shots)
    by_class: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        by_class.setdefault(pair.defect_class, []).append(i)

    accelerator, weight_dtype = make_accelerator(cfg.gradient_accumulation_steps, cfg.mixed_precision)
    main = accelerator.is_main_process
    device = accelerator.device

    # CLIP first: it is small, so a missing checkpoint fails before the large SD model is read.
    clip = load_clip_encoder(cfg.clip_model, cfg.clip_pretrained, cfg.clip_checkpoint, seed=cfg.seed).to(device)
    clip_size = clip.image_size[0]
    components = load_inpaint_components(cfg.pretrained)
    prediction_type, _ = check_inpaint_model(components, cfg.pretrained, cfg.resolution)

    # The frozen parts go to the device (and precision) first: the processors installed below then stay float32.
    components.to(device, dtype=weight_dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # same seed -> same initial fusion module
        adapter = CSMAdapter.for_unet(
            components.unet, clip.embed_dim, num_tokens=cfg.num_tokens, fusion_heads=cfg.fusion_heads,
            mask_prior=cfg.mask_prior, mask_background=cfg.mask_background, adapter_scale=cfg.adapter_scale)
    adapter.install(components.unet)
    model = CSMTrainingModule(adapter).to(device)
    model.train()
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=cfg.learning_rate, weight_decay=cfg.adam_weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)

    if start_step:
        accelerator.load_state(str(out / CHECKPOINTS_DIR / f"step_{start_step}"))
        logger.info("resumed from %s", out / CHECKPOINTS_DIR / f"step_{start_step}")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / CONFIG_RECORD, record)
        truncate_log(out / LOSS_LOG, start_step)
    accelerator.wait_for_everyone()

    # Frozen encoders: every class's prompt embedding and CLIP text features once.
    classes = sorted(by_class)
    class_index = {c: i for i, c in enumerate(classes)}
    prompts = [make_prompt(cfg.prompt_template, c, cfg.class_names) for c in classes]
    references = [make_prompt(cfg.reference_template or cfg.prompt_template, c, cfg.class_names) for c in classes]
    text_embeddings = encode_prompts(prompts, components.tokenizer, components.text_encoder, device)
    target_text = clip.encode_text(prompts)
    reference_text = clip.encode_text(references)
    unet = components.unet

    def micro_batch(micro_step: int) -> dict[str, Any]:
        rng = np.random.default_rng([cfg.seed, micro_step, accelerator.process_index])
        images, touched, ref_images, ref_masks, rows, keep = [], [], [], [], [], []
        for _ in range(cfg.batch_size):
            index = int(rng.integers(len(pairs)))
            reference = pairs[pick_reference(index, pairs, by_class, rng)]
            image, _, touch = augment_pair(pairs[index], rng, cfg.resolution, cfg.augment)
            ref_image, ref_shape, _ = augment_pair(reference, rng, clip_size, cfg.augment)
            images.append(image)
            touched.append(touch)
            ref_images.append(ref_image)
            ref_masks.append(ref_shape)
            rows.append(class_index[pairs[index].defect_class])
            keep.append(bool(rng.random() >= cfg.guidance_dropout))
        row_index = torch.tensor(rows, device=device)
        return {
            "pixels": images_to_tensor(images).mul(2.0).sub(1.0).to(device),
            "touched": masks_to_tensor(touched).to(device),
            "text": text_embeddings[row_index],
            "clip": {"target": target_text.index(row_index), "ref_text": reference_text.index(row_index),
                     "ref_image": clip.encode_image(images_to_tensor(ref_images).to(device))},
            "ref_mask": masks_to_tensor(ref_masks).to(device),
            "keep": torch.tensor(keep, device=device),
        }

    def loss_of(batch: dict[str, Any], micro_step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(stream_seed(cfg.seed, micro_step, accelerator.process_index, 1))
        _, sample, timesteps, target = denoising_inputs(
            components, batch["pixels"], batch["touched"], weight_dtype=weight_dtype, generator=generator,
            prediction_type=prediction_type)
        prediction = model(unet, sample, timesteps, batch["text"].to(weight_dtype), batch["clip"],
                           batch["ref_mask"], batch["keep"])
        return F.mse_loss(prediction.float(), target.float())

    run_training_steps(accelerator, model, optimizer, [p for p in adapter.parameters() if p.requires_grad],
                       micro_batch=micro_batch, loss_of=loss_of, out=out, start_step=start_step,
                       train_steps=cfg.train_steps, max_grad_norm=cfg.max_grad_norm,
                       checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints,
                       desc="train CSM adapter", progress=progress)

    accelerator.wait_for_everyone()
    if main:
        metadata = {
            "pretrained": cfg.pretrained, "clip_model": cfg.clip_model, "clip_pretrained": cfg.clip_pretrained,
            "clip_checkpoint": None if cfg.clip_checkpoint is None else str(cfg.clip_checkpoint),
            "clip_seed": cfg.seed, "prompt_template": cfg.prompt_template,
            "reference_template": cfg.reference_template, "class_names": dict(cfg.class_names),
            "classes": classes, "resolution": cfg.resolution, "train_steps": cfg.train_steps,
            "augment": cfg.augment.model_dump(mode="json"),
        }
        accelerator.unwrap_model(model).adapter.save(out, metadata)
        write_json(out / STATE_RECORD, {"completed_steps": cfg.train_steps})
    adapter.remove(components.unet)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out
