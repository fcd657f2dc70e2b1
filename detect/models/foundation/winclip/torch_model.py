"""WinCLIP / WinCLIP+ inference module (Jeong, Zou, Kim, Zhang, Ravichandran, Dabeer, CVPR 2023, arXiv 2303.14814).

Images in [0, 1] are resized to the CLIP input size and normalised with the CLIP statistics; the frozen CLIP
ViT then gives three kinds of embeddings:

- image: the class token of the whole image (``ln_post`` + projection), as CLIP's ``encode_image``;
- windows: for every window of ``s x s`` patches (stride 1 on the ViT patch grid, ``scales`` e.g. 2 and 3 =
  the paper's small and mid windows), the class token plus only that window's patch tokens (positional
  embeddings already added, so every token keeps its place) run through the transformer: the class token
  output, projected, is the window's embedding. This is the paper's "window masks applied to the token
  sequence" (Fig. 3), computed as one batch of short sequences;
- patches: the final-layer patch tokens of the whole image (after ``ln_post``), for WinCLIP+.

Zero-shot (WinCLIP): a language score is ``softmax(logit_scale * cos(embedding, [t_normal, t_anomalous]))``
of the anomalous class, with the two class prototypes of the compositional prompt ensemble
(``text_embeddings``) and CLIP's own logit scale (temperature). Window scores are aggregated into patches by
the harmonic mean over the windows covering the patch (paper Eq. 3); the scales (windows of every size and the
image score, broadcast) are combined by a harmonic mean too. Image score: the class-token language score
(paper's zero-shot classification score).

Few-shot (WinCLIP+): the patch / window embeddings of the k normal reference images are kept as buffers. The
visual association score of a query embedding is ``min_r 0.5 * (1 - cos(f, r))`` over the references of the
same scale (paper Eq. 4); window scores are harmonic-aggregated into patches and the scales (patch, every
window size) averaged. Pixel map: mean of the language map and the visual map; image score: mean of the
class-token language score and the maximum of the visual map (paper Eq. 5).

Maps are bilinearly upsampled to the input size (optional Gaussian blur, off by default as in the paper).
Every score lies in [0, 1]. ``forward`` is plain torch: exporting the module exports the whole model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detect.models.components.blur import AnomalyMapSmoother

IMAGE_SCORES = ("class_token", "class_token+map_max")
# Scores are clamped to this before 1/x in the harmonic means: a score of exactly 0 (a window identical to a
# reference) then gives ~0 instead of 0 * inf = NaN for the patches that window does not cover.
HARMONIC_EPS = 1e-6


def window_indices(grid: tuple[int, int], size: int) -> torch.Tensor:
    """Patch indices (row-major on the ``grid``) of every ``size x size`` window at stride 1: (n_windows, size**2).

    Windows are ordered row-major by their top-left patch; a 4x4 grid has 3x3 = 9 windows of size 2.
    """
    height, width = grid
    if not 1 <= size <= min(height, width):
        raise ValueError(f"window size {size} does not fit the {height}x{width} patch grid")
    patches = torch.arange(height * width).view(height, width)
    windows = patches.unfold(0, size, 1).unfold(1, size, 1)  # (h - s + 1, w - s + 1, s, s)
    return windows.reshape(-1, size * size).contiguous()


def window_cover(indices: torch.Tensor, n_patches: int) -> torch.Tensor:
    """(n_windows, n_patches) float matrix: 1 where the window covers the patch."""
    cover = torch.zeros(indices.shape[0], n_patches)
    cover.scatter_(1, indices, 1.0)
    return cover


def harmonic_aggregation(window_scores: torch.Tensor, cover: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Paper Eq. 3: each patch gets the harmonic mean of the scores of the windows covering it.

    window_scores (N, n_windows) in [0, 1], cover (n_windows, n_patches) -> (N, h, w).
    """
    inverse = 1.0 / window_scores.clamp_min(HARMONIC_EPS)
    counts = cover.sum(dim=0)
    patches = counts / (inverse @ cover)
    return patches.view(window_scores.shape[0], *grid)


def harmonic_mean(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Element-wise harmonic mean of equally shaped score tensors."""
    stacked = torch.stack(list(maps))
    return stacked.shape[0] / (1.0 / stacked.clamp_min(HARMONIC_EPS)).sum(dim=0)


def class_scores(embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Probability of the anomalous class: softmax over (normal, anomalous) of ``logit_scale * cos``.

    embeddings (..., D), text_embeddings (2, D) (normal, anomalous) -> (...).
    """
    cosine = F.normalize(embeddings, dim=-1) @ F.normalize(text_embeddings, dim=-1).T
    return (logit_scale * cosine).softmax(dim=-1)[..., 1]


def visual_association_score(embeddings: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Paper Eq. 4: ``min_r 0.5 * (1 - cos(f, r))`` over the reference embeddings.

    embeddings (N, M, D), references (R, D) -> (N, M) in [0, 1]; 0 for an embedding equal to a reference.
    """
    cosine = F.normalize(embeddings, dim=-1) @ F.normalize(references, dim=-1).T  # (N, M, R)
    return (0.5 * (1.0 - cosine)).amin(dim=-1).clamp(0.0, 1.0)


class WinClipModel(nn.Module):
    """Images in [0, 1] (N, 3, S, S) -> (scores (N,), anomaly maps (N, S, S)), from a frozen CLIP ViT.

    visual: an open_clip ``VisionTransformer`` with a class token (``pool_type='tok'``, no attentional pool).
    text_embeddings (buffer, (2, D)): normal and anomalous class prototypes (set by ``set_text_embeddings``).
    reference_patches / reference_windows_<i> (buffers): WinCLIP+ memory of the k reference images (empty
    when ``k_shot`` is 0).
    """

    def __init__(self, visual: nn.Module, *, scales: Sequence[int] = (2, 3), k_shot: int = 0,
                 mean: Sequence[float], std: Sequence[float], logit_scale: float,
                 image_score: str = "class_token", blur_sigma: float = 0.0):
        super().__init__()
        if image_score not in IMAGE_SCORES:
            raise ValueError(f"image_score must be one of {IMAGE_SCORES}, got {image_score!r}")
        self.visual = visual.eval().requires_grad_(False)
        self.input_size: tuple[int, int] = tuple(visual.image_size)  # type: ignore[assignment]
        self.grid: tuple[int, int] = tuple(visual.grid_size)  # type: ignore[assignment]
        self.scales = [int(s) for s in scales]
        self.k_shot = int(k_shot)
        self.image_score = image_score
        n_patches = self.grid[0] * self.grid[1]
        embed_dim = int(visual.proj.shape[1])
        token_dim = int(visual.proj.shape[0])
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.register_buffer("text_embeddings", torch.zeros(2, embed_dim))
        self.register_buffer("reference_patches", torch.zeros(0, token_dim))
        for i, size in enumerate(self.scales):
            indices = window_indices(self.grid, size)
            # Window layout follows from the config: derived buffers, not saved.
            self.register_buffer(f"window_index_{i}", indices, persistent=False)
            self.register_buffer(f"window_cover_{i}", window_cover(indices, n_patches), persistent=False)
            self.register_buffer(f"reference_windows_{i}", torch.zeros(0, embed_dim))
        self.smoother = AnomalyMapSmoother(sigma=blur_sigma)

    # ----- state set by the detector ----------------------------------------------------------------------------
    def set_text_embeddings(self, normal: torch.Tensor, anomalous: torch.Tensor) -> None:
        """Store the two class prototypes (D,) each."""
        self.text_embeddings = torch.stack([normal, anomalous]).to(self.text_embeddings)

    def set_references(self, patches: torch.Tensor, windows: Sequence[torch.Tensor]) -> None:
        """Store the WinCLIP+ memory: patch tokens (R_p, D_tok) and per scale window embeddings (R_s, D)."""
        self.reference_patches = patches.detach().to(self.reference_patches)
        for i, embeddings in enumerate(windows):
            setattr(self, f"reference_windows_{i}", embeddings.detach().to(self.text_embeddings))

    def reference_windows(self) -> list[torch.Tensor]:
        return [getattr(self, f"reference_windows_{i}") for i in range(len(self.scales))]

    def _covers(self) -> list[torch.Tensor]:
        return [getattr(self, f"window_cover_{i}") for i in range(len(self.scales))]

    # ----- CLIP features ---------------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images at any size -> CLIP input (its size, CLIP normalisation)."""
        if tuple(images.shape[-2:]) != self.input_size:
            images = F.interpolate(images, size=self.input_size, mode="bilinear", align_corners=False,
                                   antialias=images.shape[-1] > self.input_size[1])
        return (images - self.mean) / self.std

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Input tokens of the transformer: [class, patches] + positional embeddings, ``ln_pre``: (N, 1 + P, W).

        ``ln_pre`` normalises each token on its own, so selecting tokens after it equals selecting before.
        """
        visual = self.visual
        patches = visual.conv1(pixels).flatten(2).transpose(1, 2)  # (N, P, W)
        cls = visual.class_embedding.to(patches.dtype).view(1, 1, -1).expand(patches.shape[0], -1, -1)
        tokens = torch.cat([cls, patches], dim=1) + visual.positional_embedding.to(patches.dtype)
        return visual.ln_pre(tokens)

    def _class_embedding(self, sequences: torch.Tensor) -> torch.Tensor:
        """Transformer, then the projected class token: (B, L, W) -> (B, D)."""
        out = self.visual.ln_post(self.visual.transformer(sequences)[:, 0])
        return out @ self.visual.proj

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """CLIP-normalised pixels -> (image (N, D), per scale windows (N, n_windows, D), patches (N, P, W))."""
        tokens = self.tokens(pixels)
        full = self.visual.ln_post(self.visual.transformer(tokens))
        image = full[:, 0] @ self.visual.proj
        patches = full[:, 1:]
        n, _, width = tokens.shape
        windows = []
        for i in range(len(self.scales)):
            index = getattr(self, f"window_index_{i}")  # (n_windows, s*s)
            selected = tokens[:, 1 + index]  # (N, n_windows, s*s, W)
            cls = tokens[:, :1].unsqueeze(1).expand(-1, index.shape[0], -1, -1)
            sequences = torch.cat([cls, selected], dim=2).reshape(n * index.shape[0], -1, width)
            windows.append(self._class_embedding(sequences).view(n, index.shape[0], -1))
        return image, windows, patches

    # ----- scores ----------------------------------------------------------------------------------------------
    def zero_shot_map(self, image_scores: torch.Tensor, windows: Sequence[torch.Tensor]) -> torch.Tensor:
        """Language-guided patch map (N, h, w): harmonic mean over the image scale and every window scale."""
        per_scale = [image_scores.view(-1, 1, 1).expand(-1, *self.grid)]
        for embeddings, cover in zip(windows, self._covers(), strict=True):
            scores = class_scores(embeddings, self.text_embeddings, self.logit_scale)
            per_scale.append(harmonic_aggregation(scores, cover, self.grid))
        return harmonic_mean(per_scale)

    def few_shot_map(self, patches: torch.Tensor, windows: Sequence[torch.Tensor]) -> torch.Tensor:
        """Vision-based patch map (N, h, w): mean over the patch scale and every window scale of the
        (harmonic-aggregated) visual association scores."""
        if self.reference_patches.shape[0] == 0:
            raise RuntimeError("WinCLIP+ has no reference embeddings; fit the detector first")
        per_scale = [visual_association_score(patches, self.reference_patches).view(-1, *self.grid)]
        for embeddings, references, cover in zip(windows, self.reference_windows(), self._covers(), strict=True):
            per_scale.append(harmonic_aggregation(visual_association_score(embeddings, references), cover, self.grid))
        return torch.stack(per_scale).mean(dim=0)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = (images.shape[-2], images.shape[-1])
        image, windows, patches = self.encode(self.preprocess(images))
        scores = class_scores(image, self.text_embeddings, self.logit_scale)
        maps = self.zero_shot_map(scores, windows)
        if self.k_shot > 0:
            visual_map = self.few_shot_map(patches, windows)
            maps = 0.5 * (maps + visual_map)
            scores = 0.5 * (scores + visual_map.flatten(1).amax(dim=1))
        elif self.image_score == "class_token+map_max":
            scores = 0.5 * (scores + maps.flatten(1).amax(dim=1))
        return scores, self.smoother(maps, size)
