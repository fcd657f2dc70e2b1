"""Dinomaly inference module: frozen DINOv2 ViT encoder, noisy MLP bottleneck, Linear-Attention decoder.

Guo, Lu, Zhang, Liu, Li, Zhang, Li, Jia: "Dinomaly: The Less Is More Philosophy in Multi-Class Unsupervised
Anomaly Detection", CVPR 2025 (arXiv 2405.14325).

- Encoder: a frozen (DINOv2) timm VisionTransformer. The tokens after the middle blocks ``encoder_layers``
  (paper: blocks 2..9 of a 12-block ViT) are kept, class and register tokens included.
- Noisy bottleneck: the mean of all kept layers goes through a two-layer MLP (4x hidden, GELU) with dropout
  on its input, hidden and output (p 0.2). Dropout is the noise injector that keeps the decoder from learning
  an identity mapping, so anomalies are reconstructed as normal.
- Decoder: one pre-norm transformer block per kept encoder layer (paper: 8), with Linear Attention
  (``elu + 1`` feature maps instead of softmax), which cannot focus on a token's own neighbourhood and
  therefore cannot simply copy it.
- Loose reconstruction: the kept encoder layers are split into ``num_groups`` consecutive groups (paper: 2
  groups of 4) and averaged per group; the decoder outputs, in reverse order, are grouped the same way
  (the last decoder blocks mirror the shallowest encoder layers). Group features are compared, not single
  layers, so the decoder has freedom inside each group.
- Anomaly map: per group ``1 - cos(encoder, decoder)`` at every patch token (class/register tokens dropped),
  averaged over groups, upsampled to the input size and Gaussian-smoothed (the shared
  :class:`AnomalyMapSmoother`); the image score is the mean of the ``topk_ratio`` largest map values (paper:
  the top 1 %).

Input size: ViT patches are ``patch`` pixels (14 for DINOv2), while PixelVision images are multiples of 8.
The [0, 1] input (N, 3, S, S) is therefore resized inside the module to ``encoder_size`` (by default the
multiple of the patch size nearest to S, e.g. 64 -> 70, 256 -> 252, 392 -> 392) and the maps come back at S.

``forward`` is plain torch: exporting the module exports the whole model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detect.models.components.blur import AnomalyMapSmoother


def split_groups(count: int, num_groups: int) -> list[list[int]]:
    """Indices 0..count-1 split into ``num_groups`` consecutive groups of (nearly) equal size."""
    if not 1 <= num_groups <= count:
        raise ValueError(f"num_groups must be in [1, {count}], got {num_groups}")
    bounds = [round(i * count / num_groups) for i in range(num_groups + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(num_groups)]


class NoisyBottleneck(nn.Module):
    """The paper's noisy bottleneck: MLP ``dim -> hidden -> dim`` with dropout on input, hidden and output."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.drop(tokens)
        tokens = self.drop(self.act(self.fc1(tokens)))
        return self.drop(self.fc2(tokens))


class LinearAttention(nn.Module):
    """Multi-head linear attention (Katharopoulos et al. 2020): ``phi(q) (phi(k)^T v)`` normalised by
    ``phi(q) . sum phi(k)``, with ``phi = elu + 1``. Cost is linear in the number of tokens."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, t, c = tokens.shape
        qkv = self.qkv(tokens).reshape(n, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = F.elu(qkv[0]) + 1.0, F.elu(qkv[1]) + 1.0, qkv[2]  # (N, heads, T, d)
        context = k.transpose(-2, -1) @ v  # (N, heads, d, d)
        normaliser = q @ k.sum(dim=-2, keepdim=True).transpose(-2, -1)  # (N, heads, T, 1), > 0
        out = (q @ context) / normaliser
        return self.proj(out.transpose(1, 2).reshape(n, t, c))


class DecoderBlock(nn.Module):
    """Pre-norm transformer block with Linear Attention and a 4x GELU MLP (LayerNorm eps 1e-8 as the paper)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-8)
        self.attn = LinearAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-8)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.attn(self.norm1(tokens))
        return tokens + self.mlp(self.norm2(tokens))


class VitEncoder(nn.Module):
    """Frozen timm VisionTransformer returning the tokens after the blocks ``layers`` for [0, 1] images.

    Blocks after the last kept layer and the final norm/head are dropped (never computed, never saved).
    Normalisation (the weights' mean/std) and the resize to ``size`` happen inside.
    """

    def __init__(self, vit: nn.Module, layers: Sequence[int], size: int, mean: Sequence[float],
                 std: Sequence[float]):
        super().__init__()
        depth = len(vit.blocks)
        self.layers = [int(i) for i in layers]
        if not self.layers or self.layers[-1] >= depth:
            raise ValueError(f"encoder layers {self.layers} must lie in 0..{depth - 1}")
        vit.blocks = nn.Sequential(*list(vit.blocks)[: self.layers[-1] + 1])
        for unused in ("norm", "fc_norm", "head_drop", "head"):
            if isinstance(getattr(vit, unused, None), nn.Module):
                setattr(vit, unused, nn.Identity())
        if getattr(vit, "attn_pool", None) is not None:
            vit.attn_pool = None
        self.vit = vit
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.size = int(size)
        self.dim = int(vit.embed_dim)
        self.num_heads = int(vit.blocks[0].attn.num_heads)
        self.grid = tuple(int(g) for g in vit.patch_embed.grid_size)
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def train(self, mode: bool = True) -> VitEncoder:
        # Frozen: stays in eval mode (no dropout / drop-path) even while the decoder trains.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.shape[-2:] != (self.size, self.size):
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                   antialias=images.shape[-1] > self.size)
        vit = self.vit
        # timm's own token preparation: patch embedding, class/register tokens, position embedding.
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed((images - self.mean) / self.std))))
        kept = []
        for index, block in enumerate(vit.blocks):
            x = block(x)
            if index in self.layers:
                kept.append(x)
        return kept


def group_cosine_distance(encoder: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` between feature vectors at every token: (N, T, C) twice -> (N, T)."""
    return 1.0 - F.cosine_similarity(encoder, decoder, dim=-1)


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``weight`` in the backward pass."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(weight)
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        (weight,) = ctx.saved_tensors
        return grad * weight, None


def hard_mining_cosine_loss(encoder: Sequence[torch.Tensor], decoder: Sequence[torch.Tensor], p: float,
                            factor: float) -> torch.Tensor:
    """The paper's loose-reconstruction loss: global cosine distance with hard-point mining (Eq. 5-6).

    Per group, the encoder and decoder feature maps of each image are flattened to one vector each and the
    loss is the mean over images of ``1 - cos``; groups are averaged. Hard-point mining: the fraction ``p``
    of token positions (over the batch) that are reconstructed best, i.e. whose point-wise cosine distance
    is below the ``(1 - p)`` top quantile, keep only ``factor`` of their gradient (paper: p 0.9, factor 0.1),
    so training concentrates on the hard points. The loss value itself is unchanged by the mining.

    encoder, decoder: per group (N, T, C) patch tokens; the encoder side is treated as a constant target.
    """
    if not 0 <= p < 1:
        raise ValueError(f"p must be in [0, 1), got {p}")
    total = torch.zeros((), dtype=decoder[0].dtype, device=decoder[0].device)
    for enc, dec in zip(encoder, decoder, strict=True):
        enc = enc.detach()
        with torch.no_grad():
            distance = group_cosine_distance(enc, dec)  # (N, T)
            keep = int(distance.numel() * (1 - p))
            if p > 0 and keep >= 1:
                threshold = torch.topk(distance.flatten(), keep).values[-1]
                weight = torch.where(distance < threshold, factor, 1.0).to(dec.dtype).unsqueeze(-1)
            else:
                weight = None
        if weight is not None:
            dec = _ScaleGrad.apply(dec, weight)
        total = total + (1.0 - F.cosine_similarity(enc.flatten(1), dec.flatten(1), dim=1)).mean()
    return total / len(encoder)


class DinomalyModel(nn.Module):
    """Images in [0, 1] (N, 3, S, S) -> (scores (N,), anomaly maps (N, S, S))."""

    def __init__(self, encoder: VitEncoder, *, num_groups: int = 2, bottleneck_dropout: float = 0.2,
                 mlp_ratio: float = 4.0, topk_ratio: float = 0.01, blur_sigma: float = 4.0):
        super().__init__()
        self.encoder = encoder
        depth = len(encoder.layers)
        self.groups = split_groups(depth, num_groups)
        dim, heads = encoder.dim, encoder.num_heads
        self.bottleneck = NoisyBottleneck(dim, int(dim * mlp_ratio), bottleneck_dropout)
        # One decoder block per kept encoder layer (paper: 8 blocks for encoder blocks 2..9).
        self.decoder = nn.ModuleList([DecoderBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.topk_ratio = float(topk_ratio)
        self.smoother = AnomalyMapSmoother(sigma=blur_sigma)

    def trainable_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.bottleneck, self.decoder])

    def _patch_map(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, self.encoder.num_prefix_tokens:, :]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Bottleneck input (mean of all kept layers, all tokens; (N, T, C)) and the per-group encoder targets
        (mean over each group's layers, patch tokens only; (N, P, C) each)."""
        layers = self.encoder(images)
        fused = torch.stack(layers, dim=1).mean(dim=1)
        targets = [self._patch_map(torch.stack([layers[i] for i in group], dim=1).mean(dim=1))
                   for group in self.groups]
        return fused, targets

    def decode(self, fused: torch.Tensor) -> list[torch.Tensor]:
        """Per-group decoder reconstructions (N, P, C) from the fused encoder tokens."""
        x = self.bottleneck(fused)
        outputs = []
        for block in self.decoder:
            x = block(x)
            outputs.append(x)
        outputs = outputs[::-1]  # the last decoder blocks reconstruct the shallowest encoder layers
        return [self._patch_map(torch.stack([outputs[i] for i in group], dim=1).mean(dim=1))
                for group in self.groups]

    def patch_scores(self, targets: Sequence[torch.Tensor], reconstructions: Sequence[torch.Tensor]
                     ) -> torch.Tensor:
        """Mean over groups of the token-wise cosine distance, as (N, h, w) on the patch grid."""
        distance = torch.stack([group_cosine_distance(t, r) for t, r in zip(targets, reconstructions, strict=True)]
                               ).mean(dim=0)
        return distance.reshape(distance.shape[0], *self.encoder.grid)

    def image_scores(self, maps: torch.Tensor) -> torch.Tensor:
        """Mean of the ``topk_ratio`` largest values of each map (at least one value)."""
        flat = maps.flatten(1)
        k = max(1, int(flat.shape[1] * self.topk_ratio))
        return torch.topk(flat, k, dim=1).values.mean(dim=1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = (images.shape[-2], images.shape[-1])
        fused, targets = self.encode(images)
        maps = self.smoother(self.patch_scores(targets, self.decode(fused)), size)
        return self.image_scores(maps), maps
