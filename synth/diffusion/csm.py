"""CSM-style semantic guidance: CLIP encoders, cross-modal fusion and a decoupled cross-attention adapter.

What the papers do
------------------
AnomalyControl (He et al., 2024, arXiv:2412.06510) guides a frozen Stable Diffusion model with *cross-modal
semantic features*: a reference prompt (an image of a real anomaly + a text describing it) and a *non-matching*
target text (the same anomaly type, other object or surface) are encoded by a vision-language model; the
Cross-modal Semantic Modeling (CSM) module fuses them, its Anomaly-Semantic Enhanced Attention (ASEA) makes the
fusion look at the anomalous region of the reference image, and a Semantic Guided Adapter (SGA) injects the fused
features into the UNet. IP-Adapter (Ye et al., 2023, arXiv:2308.06721) is the injection mechanism of that kind:
*decoupled cross-attention*, i.e. every cross-attention layer of the frozen UNet gets a second attention over a few
guidance tokens with new key/value projections (initialised from the text ones), added to the text attention with
a scale; only the projection of the image features and those new keys/values train.

What this module implements
---------------------------
- :class:`ClipEncoder` / :func:`load_clip_encoder`: a frozen open_clip ViT (default ``ViT-B-16`` with
  ``laion2b_s34b_b88k`` weights) giving, in CLIP's joint embedding space, the patch tokens + pooled embedding of an
  image and the token features + pooled embedding of a text. Offline, a pretrained tag that is not cached fails at
  once with one :class:`~synth.core.errors.WeightsUnavailableError` naming model, tag and ``clip_checkpoint=``.
- :class:`CrossModalSemanticModule` (CSM + ASEA): the target-text tokens (and its pooled embedding) are queries of
  one pre-norm cross-attention block over ``[reference image pooled + patch tokens; reference text pooled + tokens]``.
  ASEA is realised as a log-prior on the attention logits of the patch keys: the reference defect mask is pooled to
  the patch grid (covered fraction ``w``), turned into a prior ``pi = (1 - b) * w / sum(w) + b / N`` that puts
  ``1 - b`` of the image mass on the defect whatever its size, and ``mask_prior * log(N * pi)`` is added to the
  logits (0 for a uniform prior, so the total weight of the image block against the text block is unchanged).
  The attended target tokens are averaged and projected IP-Adapter style (``Linear -> K tokens -> LayerNorm``) to
  ``K`` guidance tokens of the UNet's ``cross_attention_dim``.
- :class:`CSMAttnProcessor` + :class:`CSMAdapter` (SGA): decoupled cross-attention processors for every
  cross-attention layer of the UNet: ``softmax(q k_text^T) v_text + adapter_scale * softmax(q k_ip^T) v_ip`` with
  frozen ``to_k``/``to_v`` and new ``to_k_ip``/``to_v_ip`` initialised from them. Guidance tokens are set per call
  with :meth:`CSMAdapter.guidance` (a context manager); with scale 0 (or no tokens) the processor computes exactly
  diffusers' ``AttnProcessor2_0``.

Why own processors instead of diffusers' IP-Adapter plumbing (``encoder_hid_proj`` + ``IPAdapterAttnProcessor2_0``
+ ``added_cond_kwargs={"image_embeds": ...}``): that route feeds one ``image_embeds`` tensor through a projection
inside the UNet, while the CSM tokens come from a module with four inputs (target text, reference image, reference
text, reference mask); it also rewrites the UNet's config (``encoder_hid_dim_type``), which the shared frozen
components must not carry into other pipelines. The processor below keeps diffusers' math and names
(``to_k_ip``/``to_v_ip``, scale 0 skips the branch), takes its tokens from a shared :class:`GuidanceState`, and so
works unchanged inside ``StableDiffusionInpaintPipeline`` and ``StableDiffusionControlNetInpaintPipeline`` (with
classifier-free guidance the unconditional half gets zero tokens, which add exactly nothing, like IP-Adapter's
zero-image negative).

Deviations from AnomalyControl: CLIP (open_clip) instead of BLIP-2's multimodal encoder; one cross-attention block
instead of a Q-Former stack; ASEA as an additive mask log-prior rather than the paper's exact formulation (not
published as code); the adapter sits in the UNet's cross-attention layers only (as IP-Adapter).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from synth.core.clip_weights import build_open_clip, is_random_clip_weights, resolve_clip_model_name, tag_weights
from synth.core.errors import InputError, WeightsUnavailableError

logger = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "ViT-B-16"
DEFAULT_CLIP_PRETRAINED = "laion2b_s34b_b88k"
CLIP_CHECKPOINT_OPTION = "clip_checkpoint=/path/open_clip_model.safetensors"
ADAPTER_WEIGHTS = "csm_adapter.safetensors"
ADAPTER_CONFIG = "csm_adapter.json"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------------------------------
# CLIP encoders
# --------------------------------------------------------------------------------------------------


def require_open_clip() -> None:
    """Fail with the install command when open_clip is missing."""
    try:
        import open_clip  # noqa: F401
    except ImportError as exc:
        raise InputError(f"CSM guidance encodes references with open_clip ({exc}); "
                         f"pip install 'pixelvision[clip]'.") from None


@dataclass
class ClipFeatures:
    """CLIP features of a batch, all in the joint embedding space.

    tokens: (B, L, D) patch tokens (images) or token features (texts); pooled: (B, D); valid: (B, L) bool
    (False for text padding); grid: (rows, cols) of image patches, None for texts.
    """

    tokens: torch.Tensor
    pooled: torch.Tensor
    valid: torch.Tensor
    grid: tuple[int, int] | None = None

    def index(self, rows: torch.Tensor) -> ClipFeatures:
        """Rows of the batch (``rows``: a LongTensor), e.g. per-class text features gathered per sample."""
        return ClipFeatures(self.tokens[rows], self.pooled[rows], self.valid[rows], self.grid)


def resolve_clip_name(clip_model: str) -> str:
    """The open_clip model name: a built-in name, or a model-config JSON file registered under its stem."""
    require_open_clip()
    return resolve_clip_model_name(clip_model, example=DEFAULT_CLIP_MODEL)


def _clip_unavailable(name: str, tag: str, reason: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"CLIP model {name!r} with pretrained tag {tag!r} is not available: {reason}. Download it once where there "
        f"is internet (python -c \"import open_clip; open_clip.create_model_and_transforms('{name}', "
        f"pretrained='{tag}')\" fills the Hugging Face cache; copy it here and point HF_HOME at it), or pass a "
        f"local open_clip checkpoint file with {CLIP_CHECKPOINT_OPTION} (CLI: --set clip_checkpoint=/path/...).")


def resolve_clip_weights(name: str, pretrained: str | None, checkpoint: str | Path | None
                         ) -> tuple[str | None, dict[str, Any]]:
    """(what to hand open_clip as ``pretrained``, the tag's table entry) -- never touches the network itself.

    A checkpoint file wins over the tag (the tag still supplies normalisation and QuickGELU); "random" gives
    random weights; a tag is answered from the cache when there, else downloaded only when the hub is reachable.
    """
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    tag = None if is_random_clip_weights(pretrained) else str(pretrained)
    tag_cfg = dict(get_pretrained_cfg(name, tag) or {}) if tag else {}
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise InputError(f"clip_checkpoint {str(checkpoint)!r}: file not found; pass an open_clip checkpoint "
                             f"file ({CLIP_CHECKPOINT_OPTION}).")
        return str(path), tag_cfg
    if tag is None:
        return None, {}
    if not tag_cfg:
        tags = ", ".join(list_pretrained_tags_by_model(name)) or "none"
        raise InputError(f"clip_pretrained {tag!r} is not a pretrained tag of open_clip model {name!r} (known tags: "
                         f"{tags}); pass one of them, 'random', or a local file with {CLIP_CHECKPOINT_OPTION}.")
    return tag_weights(tag_cfg, tag, lambda reason: _clip_unavailable(name, tag, reason)), tag_cfg


def _project(x: torch.Tensor, projection: Any) -> torch.Tensor:
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


class ClipEncoder(nn.Module):
    """A frozen open_clip ViT: image patch tokens / text token features + pooled embeddings, joint space.

    Patch tokens and text tokens are mapped with the towers' own output projections, so everything the fusion
    module sees has CLIP's ``embed_dim``.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, name: str, source: str) -> None:
        super().__init__()
        visual = getattr(model, "visual", None)
        if visual is None or not hasattr(visual, "output_tokens") or not hasattr(visual, "grid_size"):
            raise InputError(f"open_clip model {name!r} has no ViT image tower; CSM needs patch tokens "
                             f"(use a ViT model such as {DEFAULT_CLIP_MODEL}).")
        if not hasattr(model, "token_embedding") and not hasattr(getattr(model, "text", None), "output_tokens"):
            raise InputError(f"open_clip model {name!r}: its text tower gives no token features; use a CLIP "
                             f"text transformer model such as {DEFAULT_CLIP_MODEL}.")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.source = source
        preprocess = getattr(visual, "preprocess_cfg", None) or {}
        self.register_buffer("mean", torch.tensor(preprocess.get("mean") or OPENAI_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(preprocess.get("std") or OPENAI_STD).view(1, 3, 1, 1),
                             persistent=False)
        size = visual.image_size
        self.image_size: tuple[int, int] = (int(size[0]), int(size[1])) if isinstance(size, Sequence) \
            else (int(size), int(size))
        self.grid: tuple[int, int] = (int(visual.grid_size[0]), int(visual.grid_size[1]))
        self.embed_dim = int(visual.output_dim)

    def train(self, mode: bool = True) -> ClipEncoder:  # frozen: always in eval mode
        return super().train(False)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> ClipFeatures:
        """(B, 3, H, W) floats in [0, 1] -> patch tokens (B, rows*cols, D) + pooled (B, D)."""
        visual = self.model.visual
        x = images.to(self.mean.device, torch.float32)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        x = ((x.clamp(0, 1) - self.mean) / self.std).to(next(visual.parameters()).dtype)
        previous = visual.output_tokens
        visual.output_tokens = True
        try:
            pooled, tokens = visual(x)
        finally:
            visual.output_tokens = previous
        proj = getattr(visual, "proj", None)
        if proj is not None and tokens.shape[-1] != pooled.shape[-1]:
            tokens = _project(tokens, proj)
        valid = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return ClipFeatures(tokens.float(), pooled.float(), valid, self.grid)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> ClipFeatures:
        """Texts -> token features (B, context, D) with a padding mask + pooled (B, D)."""
        from open_clip.transformer import text_global_pool

        model = self.model
        ids = self.tokenizer(list(texts)).to(self.mean.device)
        if hasattr(model, "token_embedding"):  # open_clip.CLIP: the text tower lives in the model itself
            cast = model.transformer.get_cast_dtype()
            x = model.token_embedding(ids).to(cast) + model.positional_embedding.to(cast)
            x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
            pooled = text_global_pool(x, ids, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
            tokens, pooled = _project(x, model.text_projection), _project(pooled, model.text_projection)
        else:  # CustomTextCLIP with a TextTransformer
            text = model.text
            previous = text.output_tokens
            text.output_tokens = True
            try:
                pooled, tokens = text(ids)
            finally:
                text.output_tokens = previous
            if tokens.shape[-1] != pooled.shape[-1]:
                tokens = _project(tokens, text.text_projection)
        valid = ids != 0  # open_clip pads with 0; start/end tokens are never 0
        valid[:, 0] = True
        return ClipFeatures(tokens.float(), pooled.float(), valid, None)


def load_clip_encoder(clip_model: str = DEFAULT_CLIP_MODEL, pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
                      checkpoint: str | Path | None = None, *, seed: int = 0) -> ClipEncoder:
    """Build the frozen CLIP encoder with ``open_clip.create_model_and_transforms``.

    Args:
        clip_model: open_clip model name or model-config JSON file (tests: a tiny ViT).
        pretrained: open_clip pretrained tag, or "random" (random weights drawn from ``seed``: tests only).
        checkpoint: a local open_clip checkpoint file; wins over the tag's download.
        seed: seed of random weights (used only for "random").

    Raises:
        InputError: unknown model or tag, a missing checkpoint file, a non-ViT model.
        WeightsUnavailableError: the tag's weights are not cached and cannot be downloaded now.
    """
    require_open_clip()
    import open_clip

    name = resolve_clip_name(clip_model)
    weights, tag_cfg = resolve_clip_weights(name, pretrained, checkpoint)
    preprocess = ({"mean": tuple(tag_cfg["mean"]), "std": tuple(tag_cfg["std"])}
                  if tag_cfg.get("mean") and tag_cfg.get("std") else None)
    model = build_open_clip(
        name, weights, seed=seed, quick_gelu=bool(tag_cfg.get("quick_gelu", False)), preprocess=preprocess,
        download_failed=lambda reason: _clip_unavailable(name, str(pretrained), reason),
        build_failed=lambda reason: InputError(
            f"could not build open_clip model {name!r} from {weights or 'random weights'!r}: {reason}; pass a "
            f"checkpoint that matches the model ({CLIP_CHECKPOINT_OPTION})."))
    source = str(weights) if weights is not None else f"random(seed={seed})"
    return ClipEncoder(model, open_clip.get_tokenizer(name), name=name, source=source)


# --------------------------------------------------------------------------------------------------
# cross-modal fusion (CSM + ASEA)
# --------------------------------------------------------------------------------------------------


def mask_patch_weights(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) or (B, H, W) mask in [0, 1] -> (B, rows*cols) fraction of every patch the defect covers."""
    if mask.ndim == 3:
        mask = mask[:, None]
    return F.adaptive_avg_pool2d(mask.float(), grid).flatten(1)


def mask_log_prior(weights: torch.Tensor, strength: float, background: float) -> torch.Tensor:
    """ASEA prior: ``strength * log(N * pi)``, ``pi = (1 - background) * w / sum(w) + background / N``.

    A uniform prior gives 0 everywhere; an empty mask gives the uniform prior. With equal content logits the
    attention over the patches *is* ``pi``: ``1 - background`` of it lies on the defect whatever its size.
    """
    n = weights.shape[1]
    total = weights.sum(dim=1, keepdim=True)
    share = torch.where(total > 0, weights / total.clamp_min(1e-12), torch.full_like(weights, 1.0 / n))
    prior = (1.0 - background) * share + background / n
    return strength * torch.log(prior * n)


@dataclass
class FusionOutput:
    """Guidance tokens (B, K, cross_attention_dim) and the attention that made them.

    attention: (B, heads, Lq, S) over the keys ``[image pooled, patches, text pooled, text tokens]``;
    patch_attention: (B, Lq, rows, cols), the head-averaged part on the reference patches.
    """

    tokens: torch.Tensor
    attention: torch.Tensor
    patch_attention: torch.Tensor


class CrossModalSemanticModule(nn.Module):
    """Fuse a target text with a reference (defect image + mask + text) into K guidance tokens.

    Queries: the target text's pooled embedding and token features; keys/values: the reference image's pooled
    embedding and patch tokens, the reference text's pooled embedding and token features (learned modality
    embeddings tell them apart). The defect mask biases the patch logits (:func:`mask_log_prior`).
    """

    def __init__(self, clip_dim: int, cross_attention_dim: int, *, num_tokens: int = 4, dim: int | None = None,
                 num_heads: int = 8, mask_prior: float = 1.0, mask_background: float = 0.1) -> None:
        super().__init__()
        dim = int(dim or clip_dim)
        if dim % num_heads:
            raise InputError(f"fusion_heads={num_heads} must divide the fusion width {dim} (the CLIP embedding "
                             f"size); pick a divisor, e.g. 8 for ViT-B (512).")
        if not 0.0 < mask_background <= 1.0 or mask_prior < 0:
            raise InputError(f"mask_background must be in (0, 1] and mask_prior >= 0, got {mask_background} and "
                             f"{mask_prior}.")
        self.num_tokens, self.dim, self.num_heads = int(num_tokens), dim, int(num_heads)
        self.cross_attention_dim = int(cross_attention_dim)
        self.mask_prior, self.mask_background = float(mask_prior), float(mask_background)
        self.in_target = nn.Linear(clip_dim, dim)
        self.in_image = nn.Linear(clip_dim, dim)
        self.in_text = nn.Linear(clip_dim, dim)
        # 0 pooled target, 1 target tokens, 2 pooled image, 3 patches, 4 pooled reference text, 5 reference tokens
        self.type_embedding = nn.Parameter(torch.randn(6, dim) * 0.02)
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.norm_pool = nn.LayerNorm(dim)
        # IP-Adapter's image projection: one vector -> K tokens of the UNet's text width, then LayerNorm.
        self.proj = nn.Linear(dim, self.num_tokens * self.cross_attention_dim)
        self.norm_out = nn.LayerNorm(self.cross_attention_dim)

    def forward(self, target: ClipFeatures, ref_image: ClipFeatures, ref_text: ClipFeatures,
                ref_mask: torch.Tensor | None) -> FusionOutput:
        """target/ref_text: text features; ref_image: image features with a grid; ref_mask: (B, 1, H, W) in [0, 1]
        (None: no prior)."""
        if ref_image.grid is None:
            raise ValueError("ref_image must be image features (with a patch grid)")
        dtype = self.to_q.weight.dtype
        b = target.tokens.shape[0]
        e = self.type_embedding.to(dtype)

        def cat(pooled: torch.Tensor, tokens: torch.Tensor, layer: nn.Linear, i: int) -> torch.Tensor:
            return torch.cat([layer(pooled.to(dtype))[:, None] + e[i], layer(tokens.to(dtype)) + e[i + 1]], dim=1)

        queries = cat(target.pooled, target.tokens, self.in_target, 0)
        memory = torch.cat([cat(ref_image.pooled, ref_image.tokens, self.in_image, 2),
                            cat(ref_text.pooled, ref_text.tokens, self.in_text, 4)], dim=1)
        n_patches = ref_image.tokens.shape[1]
        ones = torch.ones(b, 1, dtype=torch.bool, device=queries.device)
        q_valid = torch.cat([ones, target.valid], dim=1)
        k_valid = torch.cat([ones, ref_image.valid, ones, ref_text.valid], dim=1)

        bias = torch.zeros(k_valid.shape, dtype=torch.float32, device=queries.device)
        if ref_mask is not None and self.mask_prior > 0:
            weights = mask_patch_weights(ref_mask.to(queries.device), ref_image.grid)
            bias[:, 1:1 + n_patches] = mask_log_prior(weights, self.mask_prior, self.mask_background)
        bias = bias.masked_fill(~k_valid, float("-inf"))

        heads, width = self.num_heads, self.dim // self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, heads, width).transpose(1, 2)

        kv = self.norm_kv(memory)
        q, k, v = split(self.to_q(self.norm_q(queries))), split(self.to_k(kv)), split(self.to_v(kv))
        logits = (q @ k.transpose(-1, -2)).float() / math.sqrt(width) + bias[:, None, None, :]
        attention = logits.softmax(dim=-1)
        attended = (attention.to(v.dtype) @ v).transpose(1, 2).reshape(b, -1, self.dim)
        x = queries + self.to_out(attended)
        x = x + self.ff(self.norm_ff(x))

        weights_q = q_valid.to(x.dtype)[..., None]
        pooled = (x * weights_q).sum(dim=1) / weights_q.sum(dim=1).clamp_min(1.0)
        tokens = self.proj(self.norm_pool(pooled)).view(b, self.num_tokens, self.cross_attention_dim)
        tokens = self.norm_out(tokens)
        rows, cols = ref_image.grid
        patch_attention = attention[..., 1:1 + n_patches].mean(dim=1).reshape(b, -1, rows, cols)
        return FusionOutput(tokens=tokens, attention=attention, patch_attention=patch_attention)


# --------------------------------------------------------------------------------------------------
# decoupled cross-attention adapter (SGA)
# --------------------------------------------------------------------------------------------------


class GuidanceState:
    """The guidance tokens the processors read during the next UNet calls (shared by all processors)."""

    def __init__(self, scale: float = 1.0) -> None:
        self.tokens: torch.Tensor | None = None
        self.scale = float(scale)

    def for_batch(self, batch: int) -> torch.Tensor | None:
        """Tokens for a UNet batch: as set, or -- classifier-free guidance doubles the batch as [uncond, cond] --
        zero tokens for the unconditional half (zero keys/values add exactly nothing)."""
        tokens = self.tokens
        if tokens is None or tokens.shape[0] == batch:
            return tokens
        if tokens.shape[0] * 2 == batch:
            return torch.cat([torch.zeros_like(tokens), tokens], dim=0)
        if tokens.shape[0] == 1:
            return tokens.expand(batch, -1, -1)
        raise RuntimeError(f"CSM guidance tokens for a batch of {tokens.shape[0]} met a UNet batch of {batch}")


class CSMAttnProcessor(nn.Module):
    """Decoupled cross-attention: diffusers' ``AttnProcessor2_0`` on the text tokens plus
    ``scale * attention(q, to_k_ip(g), to_v_ip(g))`` on the guidance tokens ``g`` (IP-Adapter)."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, state: GuidanceState) -> None:
        super().__init__()
        self.hidden_size, self.cross_attention_dim = int(hidden_size), int(cross_attention_dim)
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.state = state  # a plain object: not part of the state dict

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        # Everything up to the text attention is diffusers' AttnProcessor2_0, line for line, so scale 0 is exact.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                       is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        tokens = self.state.for_batch(batch_size)
        if tokens is not None and self.state.scale != 0:
            tokens = tokens.to(device=query.device, dtype=self.to_k_ip.weight.dtype)
            ip_key = self.to_k_ip(tokens).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ip_value = self.to_v_ip(tokens).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            guided = F.scaled_dot_product_attention(query, ip_key.to(query.dtype), ip_value.to(query.dtype),
                                                    attn_mask=None, dropout_p=0.0, is_causal=False)
            guided = guided.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
            hidden_states = hidden_states + self.state.scale * guided

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@dataclass
class CSMAdapterConfig:
    """Architecture of a :class:`CSMAdapter` (saved as JSON next to the weights).

    layers: ``[processor name, hidden size, cross-attention dim]`` of every UNet cross-attention layer, in order.
    """

    clip_dim: int
    cross_attention_dim: int
    layers: list[list[Any]]
    num_tokens: int = 4
    fusion_dim: int | None = None
    fusion_heads: int = 8
    mask_prior: float = 1.0
    mask_background: float = 0.1
    adapter_scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str) -> CSMAdapterConfig:
        known = set(cls.__dataclass_fields__)
        if not isinstance(data, dict) or not {"clip_dim", "cross_attention_dim", "layers"} <= set(data):
            raise InputError(f"{where}: not a CSM adapter config (needs clip_dim, cross_attention_dim, layers).")
        return cls(**{k: v for k, v in data.items() if k in known})


def cross_attention_layers(unet: nn.Module) -> list[list[Any]]:
    """``[processor name, hidden size, cross-attention dim]`` for every cross-attention layer of a UNet."""
    layers = []
    for name in unet.attn_processors:
        module = unet.get_submodule(name[: -len(".processor")])
        if getattr(module, "is_cross_attention", False):
            layers.append([name, int(module.to_k.out_features), int(module.to_k.in_features)])
    if not layers:
        raise InputError("the UNet has no cross-attention layer; CSM guidance needs a text-conditioned UNet.")
    return layers


class CSMAdapter(nn.Module):
    """The trainable part: fusion module + ``to_k_ip``/``to_v_ip`` of every cross-attention layer.

    >>> adapter = CSMAdapter.for_unet(unet, clip_dim=512, num_tokens=4)    # k/v initialised from the UNet
    >>> adapter.install(unet)                                             # processors in place, scale as set
    >>> with adapter.guidance(adapter.fuse(target, ref_image, ref_text, mask).tokens):
    ...     unet(sample, t, encoder_hidden_states=text)
    """

    def __init__(self, config: CSMAdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.state = GuidanceState(config.adapter_scale)
        self.fusion = CrossModalSemanticModule(
            config.clip_dim, config.cross_attention_dim, num_tokens=config.num_tokens, dim=config.fusion_dim,
            num_heads=config.fusion_heads, mask_prior=config.mask_prior, mask_background=config.mask_background)
        self.processors = nn.ModuleList([CSMAttnProcessor(hidden, cross, self.state)
                                         for _, hidden, cross in config.layers])
        self._originals: dict[str, Any] | None = None

    @classmethod
    def for_unet(cls, unet: nn.Module, clip_dim: int, **options: Any) -> CSMAdapter:
        """A new adapter for ``unet``: fusion randomly initialised (seed it first), k/v copies of the UNet's."""
        layers = cross_attention_layers(unet)
        widths = {cross for _, _, cross in layers}
        if len(widths) != 1:
            raise InputError(f"the UNet's cross-attention layers disagree on the text width ({sorted(widths)}).")
        adapter = cls(CSMAdapterConfig(clip_dim=int(clip_dim), cross_attention_dim=widths.pop(), layers=layers,
                                       **options))
        with torch.no_grad():
            for (name, _, _), processor in zip(layers, adapter.processors, strict=True):
                attn = unet.get_submodule(name[: -len(".processor")])
                processor.to_k_ip.weight.copy_(attn.to_k.weight)
                processor.to_v_ip.weight.copy_(attn.to_v.weight)
        return adapter

    @property
    def scale(self) -> float:
        return self.state.scale

    @scale.setter
    def scale(self, value: float) -> None:
        self.state.scale = float(value)

    def check_unet(self, unet: nn.Module) -> None:
        """The adapter's layers must be the UNet's cross-attention layers (same names and widths)."""
        if cross_attention_layers(unet) != [list(layer) for layer in self.config.layers]:
            raise InputError("this CSM adapter was trained for another UNet (its cross-attention layers differ); "
                             "use the Stable Diffusion inpainting model it was trained with (pretrained: ...).")

    def install(self, unet: nn.Module) -> None:
        """Put the CSM processors into the UNet's cross-attention layers (self-attention keeps its processor)."""
        self.check_unet(unet)
        originals = dict(unet.attn_processors)
        processors = dict(originals)
        for (name, _, _), processor in zip(self.config.layers, self.processors, strict=True):
            processors[name] = processor
        unet.set_attn_processor(processors)
        self._originals = originals

    def remove(self, unet: nn.Module) -> None:
        """Restore the processors the UNet had before :meth:`install`."""
        if self._originals is not None:
            unet.set_attn_processor(self._originals)
            self._originals = None

    def fuse(self, target: ClipFeatures, ref_image: ClipFeatures, ref_text: ClipFeatures,
             ref_mask: torch.Tensor | None) -> FusionOutput:
        return self.fusion(target, ref_image, ref_text, ref_mask)

    @contextmanager
    def guidance(self, tokens: torch.Tensor | None, scale: float | None = None) -> Iterator[None]:
        """Use ``tokens`` (B, K, D) in every UNet call inside the block (optionally with another scale)."""
        previous = (self.state.tokens, self.state.scale)
        self.state.tokens = tokens
        if scale is not None:
            self.state.scale = float(scale)
        try:
            yield
        finally:
            self.state.tokens, self.state.scale = previous

    def save(self, folder: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write ``csm_adapter.safetensors`` + ``csm_adapter.json`` (config + ``metadata``) atomically."""
        from safetensors.torch import save_file

        from synth.core.io import write_json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{ADAPTER_WEIGHTS}.tmp"
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(tmp))
        os.replace(tmp, folder / ADAPTER_WEIGHTS)
        write_json(folder / ADAPTER_CONFIG, {"adapter": self.config.to_dict(), "metadata": metadata or {}})
        return folder / ADAPTER_WEIGHTS


@dataclass
class LoadedAdapter:
    adapter: CSMAdapter
    metadata: dict[str, Any] = field(default_factory=dict)
    folder: Path = Path(".")


def resolve_adapter_dir(path: str | Path) -> Path:
    """The folder holding ``csm_adapter.safetensors`` (a train-csm out folder, or the weights file itself)."""
    path = Path(path).expanduser()
    folder = path.parent if path.is_file() else path
    if not (folder / ADAPTER_WEIGHTS).is_file() or not (folder / ADAPTER_CONFIG).is_file():
        raise InputError(f"{path}: no trained CSM adapter there (expected {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG}); "
                         f"train one with `synth train-csm --out {path}` or set method_params.adapter to that folder.")
    return folder


def load_adapter(path: str | Path) -> LoadedAdapter:
    """Load a saved adapter (weights + config + the training metadata recorded with it)."""
    from safetensors.torch import load_file

    folder = resolve_adapter_dir(path)
    where = str(folder / ADAPTER_CONFIG)
    try:
        record = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{where}: unreadable ({exc}); retrain or restore the file.") from None
    adapter = CSMAdapter(CSMAdapterConfig.from_dict(record.get("adapter"), where=where))
    try:
        adapter.load_state_dict(load_file(str(folder / ADAPTER_WEIGHTS)))
    except (RuntimeError, OSError) as exc:
        raise InputError(f"{folder / ADAPTER_WEIGHTS}: does not match {ADAPTER_CONFIG} ({str(exc)[:300]}).") from None
    adapter.eval()
    return LoadedAdapter(adapter, dict(record.get("metadata") or {}), folder)


class CSMTrainingModule(nn.Module):
    """What ``accelerator.prepare`` wraps: the adapter only (the frozen UNet is an argument, not a submodule, so
    checkpoints and DDP hold the adapter's parameters alone), and a forward that runs the guided UNet."""

    def __init__(self, adapter: CSMAdapter) -> None:
        super().__init__()
        self.adapter = adapter

    def forward(self, unet: nn.Module, sample: torch.Tensor, timesteps: torch.Tensor,
                encoder_hidden_states: torch.Tensor, clip: dict[str, ClipFeatures], ref_mask: torch.Tensor,
                keep: torch.Tensor) -> torch.Tensor:
        """UNet prediction with guidance tokens; ``keep`` (B,) zeroes the tokens of dropped samples (trains the
        unguided branch used by classifier-free guidance)."""
        tokens = self.adapter.fuse(clip["target"], clip["ref_image"], clip["ref_text"], ref_mask).tokens
        tokens = tokens * keep.to(tokens.dtype)[:, None, None]
        with self.adapter.guidance(tokens):
            return unet(sample, timesteps, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
