"""VLM-AD detector: anomaly detection by prompting a vision-language model for a structured JSON verdict.

Method. The VQA formulation of GPT-4V-AD (Zhang et al., "Exploring Grounding Potential of VQA-oriented GPT-4V
for Zero-shot Anomaly Detection", arXiv 2311.02612) with the in-context normal examples of few-shot VLM
inspection (e.g. Ueno et al., "Vision-Language In-Context Learning Driven Few-Shot Visual Inspection Model",
2025): a system prompt fixes the task and a strict JSON schema (is_anomaly, confidence, defects with normalised
boxes and severity), the user turn shows ``k_shot`` normal reference images, an optional object description and
defect-type list, then the image to inspect. The reply is parsed and validated (:mod:`.schema`); unusable
replies are sent back to the model with a correction request, up to ``max_retries`` times.

Backends. ``backend="openai"``: any OpenAI-compatible ``/chat/completions`` server (images as base64 PNG data
URLs, ``response_format={"type": "json_object"}``); the API key comes from the environment variable named by
``api_key_env`` and is never stored, logged or shown. ``backend="transformers"``: a local image-text-to-text
model (default ``Qwen/Qwen2-VL-2B-Instruct``) through its processor's chat template, greedy decoding.

Detector mapping. ``fit`` only chooses the ``k_shot`` normal examples (seeded) and calibrates the threshold on
validation images, which costs one VLM request per validation image (``verdict_threshold=True`` skips that and
uses the model's own decision, score 0.5, as the threshold); image score = confidence if is_anomaly
else 1 - confidence; anomaly map = the reported boxes painted with score x severity weight at ``image_size``
(:func:`~.torch_model.paint_map`), so the pixel metrics and overlays work. :meth:`VlmAd.predict_structured`
gives the parsed verdicts themselves.

Deviations and limits. GPT-4V-AD localises through a superpixel grid it asks about; here the model's own boxes
are used (coarser maps, one request per image). Images are sent at ``image_size`` (default 448), not their
original resolution. A saved transformers-backend detector stores the model id / folder, not the VLM weights.
Replies are cached in memory per image (``cache``), so repeating a prediction does not pay again.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from detect.base import Detector, DetectorConfig, ValidationData
from detect.data import ImageInput, iter_batches
from detect.models.foundation.vlm_ad.backends import OpenAIChatBackend, TransformersBackend, VlmBackend
from detect.models.foundation.vlm_ad.schema import SEVERITY_WEIGHTS, Verdict
from detect.models.foundation.vlm_ad.torch_model import VlmAdModel
from detect.registry import register
from detect.threshold import Calibration
from synth.core.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

BACKENDS = ("openai", "transformers")
DEFAULT_MODELS = {"openai": "gpt-4o-mini", "transformers": "Qwen/Qwen2-VL-2B-Instruct"}
IMAGE_DETAILS = ("auto", "low", "high")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass
class VlmAdConfig(DetectorConfig):
    """VLM-AD settings.

    backend: "openai" (OpenAI-compatible HTTP API) or "transformers" (local model).
    model: API model name, or hub id / local folder of a transformers model; "" = the backend's default
        (gpt-4o-mini / Qwen/Qwen2-VL-2B-Instruct).
    base_url: API root; requests go to {base_url}/chat/completions (openai backend).
    api_key_env: NAME of the environment variable holding the API key (the key itself is never stored).
    timeout: seconds per HTTP request; max_retries: extra attempts for transport failures (429, 5xx, timeouts)
        and, separately, for unusable replies; retry_backoff: first back-off in seconds, doubled per retry.
    k_shot: normal training images shown as references with every query (0 = zero-shot).
    object_description: what the images show (e.g. "a brick wall"); defect_types: defect names to mention.
    max_tokens: reply length limit; temperature: sampling temperature (openai backend; 0 = most repeatable).
    json_mode: send response_format={"type": "json_object"} (turn off for servers that reject it).
    image_detail: OpenAI image detail "auto", "low" or "high".
    fallback_score: None = an image without a usable reply after the retries raises InputError; a number in
        [0, 1] = give it that score (and a uniform map) instead, with the reason in its Verdict.error.
    workers: parallel HTTP requests (openai backend); cache: reuse replies for identical images in memory.
    verdict_threshold: true = skip threshold calibration (no validation requests): an image is anomalous when
        the model says so (score >= 0.5) and a pixel when it lies in a box of such a verdict. False (default) =
        calibrate on validation data like every detector, falling back to the verdict threshold when the
        VLM gives every validation image the same score.
    device / dtype: where and in which precision the transformers model runs ("auto": cuda + bfloat16 when
        available, else cpu + float32).
    """

    image_size: int = 448
    backend: str = "openai"
    model: str = ""
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 60.0
    max_retries: int = 3
    retry_backoff: float = 1.0
    k_shot: int = 1
    object_description: str = ""
    defect_types: list[str] = field(default_factory=list)
    max_tokens: int = 512
    temperature: float = 0.0
    json_mode: bool = True
    image_detail: str = "auto"
    fallback_score: float | None = None
    workers: int = 4
    cache: bool = True
    verdict_threshold: bool = False
    # Each view would be one more request per validation image: off for a model behind an API.
    calibration_views: int = 0
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(self.backend in BACKENDS, "backend", f"one of {BACKENDS}")
        self.check(isinstance(self.model, str), "model", "a model name, hub id or folder (a string)")
        if not self.model:
            self.model = DEFAULT_MODELS[self.backend]
        self.check(isinstance(self.base_url, str) and self.base_url.startswith(("http://", "https://")),
                   "base_url", "an http:// or https:// URL such as https://api.openai.com/v1")
        if not (isinstance(self.api_key_env, str) and _ENV_NAME.match(self.api_key_env)):
            # Not self.check: its message repeats the value, which may be the key pasted in by mistake.
            raise ConfigError(f"{type(self).__qualname__}: key 'api_key_env' must be the NAME of the environment "
                              f"variable that holds the API key (e.g. OPENAI_API_KEY), not the key itself; the "
                              f"value given is not a variable name (not shown).")
        self.check(_number(self.timeout) and self.timeout > 0, "timeout", "> 0 seconds")
        self.check(_integer(self.max_retries) and 0 <= self.max_retries <= 20, "max_retries", "an integer in [0, 20]")
        self.check(_number(self.retry_backoff) and 0 <= self.retry_backoff <= 60, "retry_backoff",
                   "in [0, 60] seconds")
        self.check(_integer(self.k_shot) and 0 <= self.k_shot <= 8, "k_shot", "an integer in [0, 8]")
        self.check(isinstance(self.object_description, str), "object_description", "a string")
        self.check(isinstance(self.defect_types, (list, tuple))
                   and all(isinstance(t, str) and t.strip() for t in self.defect_types), "defect_types",
                   "a list of non-empty strings")
        self.defect_types = [t.strip() for t in self.defect_types]
        self.check(_integer(self.max_tokens) and 16 <= self.max_tokens <= 32768, "max_tokens",
                   "an integer in [16, 32768]")
        self.check(_number(self.temperature) and 0 <= self.temperature <= 2, "temperature", "in [0, 2]")
        self.check(isinstance(self.json_mode, bool), "json_mode", "true or false")
        self.check(self.image_detail in IMAGE_DETAILS, "image_detail", f"one of {IMAGE_DETAILS}")
        self.check(self.fallback_score is None or (_number(self.fallback_score) and 0 <= self.fallback_score <= 1),
                   "fallback_score", "null (raise an error) or a number in [0, 1]")
        self.check(_integer(self.workers) and 1 <= self.workers <= 64, "workers", "an integer in [1, 64]")
        self.check(isinstance(self.cache, bool), "cache", "true or false")
        self.check(isinstance(self.verdict_threshold, bool), "verdict_threshold", "true or false")
        self.check(isinstance(self.device, str) and bool(_DEVICE.match(self.device)), "device",
                   "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        self.check(self.dtype in DTYPES, "dtype", f"one of {DTYPES}")


def verdict_calibration(data: ValidationData) -> Calibration:
    """Thresholds at the model's own decision: image score 0.5, and any box of an anomalous verdict (0.5 x the
    lowest severity weight) for pixels; normalised scores equal the raw ones."""
    anomalous = int(np.sum(data.labels))
    return Calibration(image_threshold=0.5, method="vlm-verdict", score_min=0.0, score_max=1.0,
                       pixel_threshold=0.5 * min(SEVERITY_WEIGHTS.values()), pixel_min=0.0, pixel_max=1.0,
                       num_normal=len(data.labels) - anomalous, num_anomalous=anomalous)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@register
class VlmAd(Detector):
    """VLM-AD: a vision-language model (API or local) answers with a JSON verdict per image."""

    name = "vlm_ad"
    paradigm = "foundation"
    Config = VlmAdConfig
    config: VlmAdConfig

    def build_model(self) -> VlmAdModel:
        cfg = self.config
        backend: VlmBackend
        if cfg.backend == "openai":
            backend = OpenAIChatBackend(base_url=cfg.base_url, model=cfg.model, api_key_env=cfg.api_key_env,
                                        timeout=float(cfg.timeout), max_retries=cfg.max_retries,
                                        retry_backoff=float(cfg.retry_backoff), max_tokens=cfg.max_tokens,
                                        temperature=float(cfg.temperature), seed=cfg.seed, json_mode=cfg.json_mode,
                                        image_detail=cfg.image_detail)
        else:
            backend = TransformersBackend(cfg.model, device=cfg.device, dtype=cfg.dtype, max_new_tokens=cfg.max_tokens)
        self.history: list[float] = []  # nothing is trained; kept for the common Detector attributes
        return VlmAdModel(backend, image_size=cfg.image_size, object_description=cfg.object_description,
                          defect_types=cfg.defect_types, max_retries=cfg.max_retries,
                          fallback_score=cfg.fallback_score, cache=cfg.cache, workers=cfg.workers)

    def _fit(self, images: list[ImageInput], progress: bool) -> None:
        cfg = self.config
        model: VlmAdModel = self.model
        count = min(cfg.k_shot, len(images))
        if count:
            chosen = np.random.default_rng(cfg.seed).choice(len(images), size=count, replace=False)
            model.set_references(self.load_tensor([images[i] for i in sorted(chosen)]))
        else:
            model.set_references(torch.zeros(0, 3, cfg.image_size, cfg.image_size))
        logger.info("vlm_ad: %s with %d normal reference image(s)", model.backend.describe(), count)

    def _calibrate(self, data: ValidationData) -> Calibration:
        if self.config.verdict_threshold:
            return verdict_calibration(data)
        model: VlmAdModel = self.model
        own_cache = model.cache
        if own_cache is None:
            model.cache = {}  # the base calibration predicts the same images again: ask the VLM once
        try:
            scores = self._predict_raw(data.images).scores
            if np.ptp(scores) <= 0:
                # A VLM often repeats one confidence for every image; a data threshold needs a spread.
                logger.warning("vlm_ad: every validation image got score %.3g; using the model's own verdict "
                               "(score >= 0.5) as the threshold", float(scores[0]))
                return verdict_calibration(data)
            return super()._calibrate(data)
        finally:
            if own_cache is None:
                model.cache = None

    @torch.no_grad()
    def predict_structured(self, images: Any, *, batch_size: int | None = None) -> list[Verdict]:
        """The parsed verdict (is_anomaly, confidence, defects with boxes, score, raw reply) of every image.

        Replies are cached, so calling this and ``predict`` on the same images asks the VLM once.
        """
        if not self.fitted:
            raise InputError(f"{self.name}: the model is not fitted; call fit() or load a saved model first.")
        model: VlmAdModel = self.model
        items = images if not isinstance(images, np.ndarray) or images.ndim == 4 else [images]
        verdicts: list[Verdict] = []
        for batch, _ in iter_batches(items, self.config.image_size, batch_size or self.config.batch_size):
            verdicts.extend(model.inspect(batch))
        if not verdicts:
            raise InputError("no images to predict.")
        return verdicts
