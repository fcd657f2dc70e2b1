"""VLM-AD inference module: ask a vision-language model about each image, parse its JSON verdict, paint its boxes.

``forward(images in [0, 1], (N, 3, S, S)) -> (scores (N,), anomaly_maps (N, S, S))``:

- score = confidence if is_anomaly else 1 - confidence;
- map = each reported defect box filled with score x severity weight (low 1/3, medium 2/3, high 1; overlapping
  boxes keep the maximum), 0 elsewhere; an anomalous verdict without any box paints the whole image with the
  score (the defect may be anywhere), as does a ``fallback_score`` that replaced an unusable answer.

The only tensor state is ``reference_images`` (uint8 (k, S, S, 3), the few-shot normal examples chosen by
``fit``), so a saved model keeps its examples. The VLM itself is not a submodule: an API model has no local
weights, and a local transformers model (gigabytes) is reloaded from its hub id / folder, not copied into every
saved detector.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from detect.models.foundation.vlm_ad.backends import VlmBackend
from detect.models.foundation.vlm_ad.prompt import build_messages, with_correction
from detect.models.foundation.vlm_ad.schema import SEVERITY_WEIGHTS, MalformedReply, Verdict, parse_reply
from synth.core.errors import InputError

logger = logging.getLogger(__name__)


def paint_map(verdict: Verdict, size: int) -> np.ndarray:
    """(size, size) float32 anomaly map of one verdict (see the module docstring)."""
    amap = np.zeros((size, size), np.float32)
    boxes = [d for d in verdict.defects if d.location is not None]
    if verdict.error is not None or (verdict.is_anomaly and not boxes):
        amap[:] = verdict.score
        return amap
    for defect in boxes:
        x0, y0, x1, y1 = defect.location  # type: ignore[misc]
        # At least one pixel per box: a point-like defect still marks where it is.
        c0 = min(int(math.floor(x0 * size)), size - 1)
        r0 = min(int(math.floor(y0 * size)), size - 1)
        c1 = max(c0 + 1, min(int(math.ceil(x1 * size)), size))
        r1 = max(r0 + 1, min(int(math.ceil(y1 * size)), size))
        region = amap[r0:r1, c0:c1]
        np.maximum(region, verdict.score * SEVERITY_WEIGHTS[defect.severity], out=region)
    return amap


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, S, S) in [0, 1] -> uint8 (N, S, S, 3); exact inverse of detect.data.to_tensor's /255."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class VlmAdModel(nn.Module):
    """Prompt a VLM backend per image; ``reference_images`` are the normal examples shown with every query."""

    def __init__(self, backend: VlmBackend, *, image_size: int, object_description: str = "",
                 defect_types: Sequence[str] = (), max_retries: int = 3, fallback_score: float | None = None,
                 cache: bool = True, workers: int = 1) -> None:
        super().__init__()
        self.backend = backend  # a plain object, not a submodule: its weights are not saved (see module docstring)
        self.image_size = image_size
        self.object_description = object_description
        self.defect_types = list(defect_types)
        self.max_retries = max_retries
        self.fallback_score = fallback_score
        self.workers = workers
        self.cache: dict[str, Verdict] | None = {} if cache else None
        self.register_buffer("reference_images", torch.zeros(0, image_size, image_size, 3, dtype=torch.uint8))

    def set_references(self, images: torch.Tensor) -> None:
        """Keep ``images`` ((k, 3, S, S) in [0, 1]) as the few-shot normal examples."""
        self.reference_images = torch.from_numpy(to_uint8(images)).contiguous()
        if self.cache is not None:
            self.cache.clear()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        verdicts = self.inspect(images)
        size = images.shape[-1]
        scores = torch.tensor([v.score for v in verdicts], dtype=torch.float32)
        maps = torch.from_numpy(np.stack([paint_map(v, size) for v in verdicts]))
        return scores, maps

    def inspect(self, images: torch.Tensor) -> list[Verdict]:
        """One parsed verdict per image of the batch (N, 3, S, S) in [0, 1]."""
        pixels = list(to_uint8(images))
        references = list(self.reference_images.cpu().numpy())
        refs_digest = hashlib.sha256(self.reference_images.cpu().numpy().tobytes()).hexdigest()
        if self.workers > 1 and self.backend.concurrent and len(pixels) > 1:
            with ThreadPoolExecutor(max_workers=min(self.workers, len(pixels))) as pool:
                return list(pool.map(lambda p: self._inspect_one(p, references, refs_digest), pixels))
        return [self._inspect_one(p, references, refs_digest) for p in pixels]

    def _cache_key(self, image: np.ndarray, refs_digest: str) -> str:
        digest = hashlib.sha256()
        for part in (self.backend.identity(), self.object_description, "|".join(self.defect_types), refs_digest,
                     str(image.shape)):
            digest.update(part.encode("utf-8") + b"\0")
        digest.update(np.ascontiguousarray(image).tobytes())
        return digest.hexdigest()

    def _inspect_one(self, image: np.ndarray, references: list[np.ndarray], refs_digest: str) -> Verdict:
        key = self._cache_key(image, refs_digest) if self.cache is not None else ""
        if self.cache is not None and key in self.cache:
            return copy.deepcopy(self.cache[key])
        messages = build_messages(image, references, object_description=self.object_description,
                                  defect_types=self.defect_types)
        conversation = messages
        failure = MalformedReply("no attempt made")
        attempts = self.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                reply = self.backend.complete(conversation)
                verdict = parse_reply(reply, self.image_size)
            except MalformedReply as exc:
                failure = exc
                logger.warning("vlm_ad: unusable reply from %s (attempt %d/%d): %s; reply began %r",
                               self.backend.describe(), attempt, attempts, exc.reason,
                               self.backend.redact(exc.reply[:80]))
                # Show the model its bad answer and ask again; a transport-level failure just repeats.
                conversation = with_correction(messages, exc.reply, exc.reason) if exc.reply else messages
                continue
            verdict.attempts = attempt
            if self.cache is not None:
                self.cache[key] = copy.deepcopy(verdict)
            return verdict
        if self.fallback_score is not None:
            score = float(self.fallback_score)
            is_anomaly = score >= 0.5
            verdict = Verdict(is_anomaly, score if is_anomaly else 1.0 - score, [], score, failure.reply, attempts,
                              error=failure.reason)
            if self.cache is not None:  # the same image would most likely fail the same way again
                self.cache[key] = copy.deepcopy(verdict)
            return verdict
        raise InputError(
            f"vlm_ad: {self.backend.describe()} gave no usable answer in {attempts} attempt(s); last problem: "
            f"{failure.reason}; reply began {self.backend.redact(failure.reply[:120])!r}. Use a model that follows "
            f"JSON instructions, raise max_retries, or set fallback_score (e.g. 0.5) to score such images "
            f"instead of failing.")
