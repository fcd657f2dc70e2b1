"""WinCLIP detector: zero-shot (WinCLIP) or few-normal-shot (WinCLIP+) anomaly detection with a frozen CLIP.

Nothing is trained. ``fit``

1. encodes the compositional prompt ensemble (``prompting.py``: the paper's 7 normal and 4 anomalous state
   words, plus one anomalous state per ``defect_types`` entry, in the paper's 22 templates, with the object
   name ``object_name``) with the CLIP text tower; as in CLIP's prompt ensembling, every prompt embedding is
   L2-normalised, each class's embeddings averaged and the mean renormalised: two class prototypes, stored as
   a buffer of the inference module;
2. with ``k_shot > 0`` (WinCLIP+), stores the patch and window embeddings of ``k_shot`` normal training images
   (a sample drawn with ``seed``; all of them when there are fewer) as reference buffers.

Persistence: the saved model holds the CLIP *vision* tower, the text prototypes and the reference memory; the
text tower is only needed to encode the prompts, so it is dropped after ``fit`` and never saved (the saved
ViT-B-16+ is ~0.45 GB instead of ~0.8 GB). A saved model loads offline: the architecture is rebuilt from
``clip_model`` without looking the pretrained weights up, and the weights file supplies every tensor. A loaded
model that is fitted again keeps its stored text prototypes (they depend on the config only).

Choices where the paper leaves room (documented in ``torch_model.py``): the scales of the zero-shot map (image
score broadcast, every window size) are combined by a harmonic mean and the WinCLIP+ patch features are the
final-layer patch tokens after ``ln_post``, both as Anomalib's reference implementation; the class prototypes
average *normalised* prompt embeddings (CLIP's prompt ensembling). The default input size is the paper's 240
(the CLIP input of ViT-B-16-plus-240; other ``image_size`` values are resized to it inside the model). The
paper's zero-shot image score is the class-token score; ``zero_shot_image_score="class_token+map_max"``
averages it with the maximum of the zero-shot map instead (as the few-shot score does with the visual map).

Cost: the 196 + 169 window sequences of ViT-B-16+ add about 12 full-image forwards per image (~0.35 TMAC per
240-px image): seconds per image on a CPU, use a GPU for real data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from detect.base import Detector, DetectorConfig
from detect.data import ImageInput
from detect.models.foundation.winclip.clip_loading import LoadedClip, create_clip
from detect.models.foundation.winclip.prompting import prompt_ensemble
from detect.models.foundation.winclip.torch_model import IMAGE_SCORES, WinClipModel
from detect.registry import register
from synth.core.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

TEXT_BATCH = 64


@dataclass
class WinClipConfig(DetectorConfig):
    """WinCLIP settings.

    image_size: input size (the paper's 240; images are resized to the CLIP input size inside the model).
    clip_model: open_clip model name (paper: "ViT-B-16-plus-240") or the path of an open_clip model-config JSON.
    pretrained: open_clip pretrained tag (paper: "laion400m_e31"; needs the hub or its cache), a local
        checkpoint file (``open_clip_pytorch_model.bin`` / ``.safetensors``), or "random" / null for random
        weights drawn from ``seed`` (tests only).
    object_name: the object word of the prompts ("a photo of a flawless {object_name}.").
    defect_types: extra anomalous states "<object> with <defect>", e.g. ["scratch", "crack"].
    k_shot: number of normal reference images of WinCLIP+ (0: zero-shot WinCLIP, text only).
    scales: window sizes in ViT patches, ascending (paper: 2 and 3, small and mid windows).
    zero_shot_image_score: "class_token" (paper) or "class_token+map_max" (mean with the map's maximum).
    blur_sigma: Gaussian blur of the final map, pixels at the input size (0: none, as the paper).
    """

    image_size: int = 240
    batch_size: int = 8
    clip_model: str = "ViT-B-16-plus-240"
    pretrained: str | None = "laion400m_e31"
    object_name: str = "object"
    defect_types: list[str] = field(default_factory=list)
    k_shot: int = 4
    scales: list[int] = field(default_factory=lambda: [2, 3])
    zero_shot_image_score: str = "class_token"
    blur_sigma: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(isinstance(self.clip_model, str) and bool(self.clip_model.strip()), "clip_model",
                   "an open_clip model name or a model-config JSON path")
        self.check(self.pretrained is None or isinstance(self.pretrained, str), "pretrained",
                   "a pretrained tag, a checkpoint file path, 'random' or null")
        self.check(isinstance(self.object_name, str) and bool(self.object_name.strip()), "object_name",
                   "a non-empty string")
        self.check(isinstance(self.defect_types, (list, tuple))
                   and all(isinstance(d, str) and d.strip() for d in self.defect_types), "defect_types",
                   "a list of non-empty strings")
        self.check(isinstance(self.k_shot, int) and not isinstance(self.k_shot, bool) and self.k_shot >= 0,
                   "k_shot", "an integer >= 0 (0: zero-shot)")
        scales = self.scales
        self.check(isinstance(scales, (list, tuple)) and len(scales) >= 1
                   and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in scales)
                   and list(scales) == sorted(set(scales)), "scales",
                   "a non-empty ascending list of distinct window sizes >= 1 (in patches)")
        self.check(self.zero_shot_image_score in IMAGE_SCORES, "zero_shot_image_score", f"one of {IMAGE_SCORES}")
        self.check(0 <= self.blur_sigma <= 32, "blur_sigma", "in [0, 32]")


@register
class WinClip(Detector):
    """WinCLIP / WinCLIP+ (Jeong et al., CVPR 2023): CLIP windows against a prompt ensemble and k normal shots."""

    name = "winclip"
    paradigm = "foundation"
    Config = WinClipConfig
    config: WinClipConfig

    def build_model(self) -> WinClipModel:
        cfg = self.config
        clip = create_clip(cfg.clip_model, cfg.pretrained, seed=cfg.seed, loading=self.loading)
        visual = getattr(clip.model, "visual", None)
        if (type(visual).__name__ != "VisionTransformer" or getattr(visual, "attn_pool", None) is not None
                or getattr(visual, "pool_type", None) != "tok"):
            raise InputError(f"winclip: {clip.name!r} has no class-token ViT image tower (open_clip "
                             f"VisionTransformer with pool_type 'tok'); WinCLIP needs one for window embeddings.")
        grid = tuple(visual.grid_size)
        if max(cfg.scales) > min(grid):
            raise ConfigError(f"{type(cfg).__qualname__}: key 'scales' must be window sizes <= the {grid[0]}x{grid[1]}"
                              f" patch grid of {clip.name} (got {cfg.scales!r})")
        # The text tower is kept (outside the module, so never saved) until fit has encoded the prompts.
        self._clip: LoadedClip | None = None if self.loading else clip
        # The k normal shots of the last fit (WinCLIP+), for inspection; not saved.
        self.reference_shots: list[ImageInput] = []
        return WinClipModel(visual, scales=cfg.scales, k_shot=cfg.k_shot, mean=clip.mean, std=clip.std,
                            logit_scale=float(clip.model.logit_scale.detach().exp()),
                            image_score=cfg.zero_shot_image_score, blur_sigma=cfg.blur_sigma)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], bar: tqdm | None = None) -> torch.Tensor:
        """Class prototype of ``prompts``: mean of the L2-normalised CLIP text embeddings, renormalised: (D,)."""
        if self._clip is None:
            raise InputError("winclip: the CLIP text tower is not available (loaded or already fitted model).")
        clip = self._clip
        device = next(self.model.parameters()).device
        chunks = []
        for start in range(0, len(prompts), TEXT_BATCH):
            tokens = clip.tokenizer(prompts[start:start + TEXT_BATCH]).to(device)
            chunks.append(F.normalize(clip.model.to(device).encode_text(tokens).float(), dim=-1))
            if bar is not None:
                bar.update(1)
        return F.normalize(torch.cat(chunks).mean(dim=0), dim=-1)

    def reference_images(self, images: list[ImageInput]) -> list[ImageInput]:
        """The ``k_shot`` normal shots: a sample drawn with ``seed`` (training order kept), all when fewer."""
        k = self.config.k_shot
        if len(images) <= k:
            if len(images) < k:
                logger.warning("winclip: k_shot=%d but only %d training images; using all of them.", k, len(images))
            return list(images)
        chosen = np.random.default_rng(self.config.seed).choice(len(images), size=k, replace=False)
        return [images[i] for i in sorted(chosen)]

    def _fit(self, images: list[ImageInput], progress: bool) -> None:
        cfg = self.config
        model: WinClipModel = self.model
        model.eval()
        normal, anomalous = prompt_ensemble(cfg.object_name, cfg.defect_types)
        shots = self.reference_images(images) if cfg.k_shot > 0 else []
        self.reference_shots = shots
        text_steps = 0 if self._clip is None else -(-len(normal) // TEXT_BATCH) - (-len(anomalous) // TEXT_BATCH)
        shot_steps = -(-len(shots) // cfg.batch_size)
        with tqdm(total=text_steps + shot_steps, desc=f"{self.name} fit", disable=not progress) as bar:
            if self._clip is not None:
                model.set_text_embeddings(self.encode_prompts(normal, bar), self.encode_prompts(anomalous, bar))
                self._clip = None  # text prototypes stored; the text tower is no longer needed
            else:
                logger.info("winclip: keeping the stored text prototypes (no text tower in a loaded model).")
            if shots:
                self._store_references(shots, bar)

    @torch.no_grad()
    def _store_references(self, shots: list[ImageInput], bar: tqdm) -> None:
        model: WinClipModel = self.model
        pixels = self.load_tensor(shots).to(model.text_embeddings.device)
        patches, windows = [], []
        bs = self.config.batch_size
        for start in range(0, len(pixels), bs):
            _, batch_windows, batch_patches = model.encode(model.preprocess(pixels[start:start + bs]))
            patches.append(batch_patches.flatten(0, 1))
            windows.append([w.flatten(0, 1) for w in batch_windows])
            bar.update(1)
        model.set_references(torch.cat(patches), [torch.cat(scale) for scale in zip(*windows, strict=True)])
