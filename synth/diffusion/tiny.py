"""A tiny randomly initialised Stable Diffusion inpainting model, written in diffusers' folder layout.

Nothing can be downloaded here, so tests (and smoke runs of the CLI) use this folder in place of a real checkpoint:
``load_inpaint_components(folder)`` then takes exactly the path real weights take. The architecture is SD's (VAE
with 4 latent channels and 8x downsampling, 9-channel inpainting UNet with cross-attention, CLIP text encoder and
a byte-level BPE tokenizer), only narrow: about 1 M parameters, a 64x64 image runs a denoising step in
milliseconds on a CPU. It generates noise-like texture, not defects; it proves plumbing, not quality.
"""

from __future__ import annotations

import json
from pathlib import Path

from synth.diffusion.components import require_diffusers

TINY_TEXT_DIM = 32


def _byte_vocab() -> dict[str, int]:
    """CLIP's byte-to-unicode alphabet, each symbol alone and word-final, plus the two special tokens."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    symbols = [chr(b) for b in visible]
    extra = 0
    for b in range(256):
        if b not in visible:
            symbols.append(chr(256 + extra))
            extra += 1
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


def write_tiny_tokenizer(folder: str | Path) -> Path:
    """A CLIPTokenizer with a byte-level vocabulary and no merges (every character is a token)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(_byte_vocab()), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=32)
    tokenizer.save_pretrained(str(folder))
    return folder


def write_tiny_inpaint_model(folder: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random SD inpainting model (``model_index.json``, unet/, vae/, text_encoder/, tokenizer/,
    scheduler/) to ``folder`` and return it. Same seed, same weights."""
    require_diffusers()
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    tokenizer_dir = write_tiny_tokenizer(folder / "_tokenizer_build")
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=9, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TINY_TEXT_DIM, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TINY_TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        projection_dim=TINY_TEXT_DIM,
    ))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, steps_offset=1)
    pipeline = StableDiffusionInpaintPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                              scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
    pipeline.save_pretrained(str(folder))
    for leftover in sorted(tokenizer_dir.iterdir()):
        leftover.unlink()
    tokenizer_dir.rmdir()
    return folder
