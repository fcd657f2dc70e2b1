"""The defect-class classifier of the classification pipeline: one training recipe for every method.

A timm backbone (``detect.backbones.create_backbone``: offline ImageNet weights for ``tf_efficientnet_lite0``) gets
a fresh ``num_classes`` head and is fine-tuned end to end with AdamW, cross-entropy and a cosine learning-rate
decay for a fixed number of optimizer steps. Every training image goes through the same standard augmentation
(flips, 90-degree rotations, a small shift/scale/rotate, colour jitter), so methods differ only in their training
images. Batches are drawn from consecutive seeded permutations of the training set (with repeats when the set is
smaller than a batch), so every step has a full batch and every method gets exactly the same compute.

Determinism: ``torch.manual_seed(seed)`` before the head is created, a ``torch.Generator`` for the batch order and
albumentations' own ``seed``: same inputs and seed -> same model (on the same machine and torch build).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix
from torch import nn
from tqdm import tqdm

from detect.backbones import create_backbone, imagenet_normalization
from synth.errors import InputError

__all__ = ["TrainedClassifier", "build_augmentation", "classification_metrics", "predict", "resize_images",
           "train_classifier"]


@dataclass
class TrainedClassifier:
    """A fine-tuned model and what it takes to run it."""

    model: nn.Module
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    steps: int
    final_loss: float
    weights_source: str


def build_augmentation(seed: int) -> A.Compose:
    """The standard augmentation used for every method (the images are already at the model's input size)."""
    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
        # Small shift/scale/rotate; reflected borders so no black corners become a class cue.
        A.Affine(translate_percent=(-0.06, 0.06), scale=(0.9, 1.1), rotate=(-15, 15),
                 border_mode=cv2.BORDER_REFLECT_101, p=0.5),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
    ], seed=seed)


def resize_images(images: Sequence[np.ndarray], image_size: int) -> list[np.ndarray]:
    """Resize uint8 RGB images to ``image_size`` squared (area interpolation when shrinking)."""
    out = []
    for image in images:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputError(f"classifier input must be uint8 HxWx3 RGB, got {image.dtype} {image.shape}.")
        if image.shape[:2] != (image_size, image_size):
            shrink = min(image.shape[:2]) > image_size
            image = cv2.resize(image, (image_size, image_size),
                               interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        out.append(np.ascontiguousarray(image))
    return out


def _to_tensor(images: Sequence[np.ndarray], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (batch - mean_t) / std_t


def _batch_indices(n: int, batch_size: int, steps: int, generator: torch.Generator) -> list[list[int]]:
    """``steps`` full batches from consecutive seeded permutations of ``range(n)``."""
    stream: list[int] = []
    needed = steps * batch_size
    while len(stream) < needed:
        stream += torch.randperm(n, generator=generator).tolist()
    return [stream[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def train_classifier(
    images: Sequence[np.ndarray],
    labels: Sequence[int],
    num_classes: int,
    *,
    backbone: str = "tf_efficientnet_lite0",
    pretrained: bool = True,
    image_size: int = 224,
    steps: int = 100,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train classifier",
) -> TrainedClassifier:
    """Fine-tune ``backbone`` with a new ``num_classes`` head on uint8 RGB ``images`` with int ``labels``.

    Args:
        images: training images (any size; resized to ``image_size``).
        labels: class index of each image, in ``range(num_classes)``.
        num_classes: number of classes (>= 2).
        backbone, pretrained: passed to ``create_backbone``.
        image_size: square input size.
        steps: optimizer steps (each one full batch).
        batch_size, lr, weight_decay: AdamW recipe; the learning rate decays to 0 on a cosine.
        seed: head initialisation, batch order and augmentation.
        progress: show a tqdm bar.
        desc: the bar's label.
    """
    if len(images) != len(labels) or not images:
        raise InputError(f"train_classifier needs one label per image and at least one image "
                         f"(got {len(images)} images, {len(labels)} labels).")
    if num_classes < 2 or any(not 0 <= int(y) < num_classes for y in labels):
        raise InputError(f"labels must lie in range({num_classes}) with num_classes >= 2.")
    torch.manual_seed(seed)
    model = create_backbone(backbone, pretrained=pretrained, num_classes=num_classes)
    mean, std = imagenet_normalization(model)
    data = resize_images(images, image_size)
    targets = torch.tensor([int(y) for y in labels], dtype=torch.long)
    augment = build_augmentation(seed)
    batches = _batch_indices(len(data), batch_size, steps, torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    model.train()
    loss_value = float("nan")
    with tqdm(batches, desc=desc, unit="step", disable=not progress) as bar:
        for indices in bar:
            inputs = _to_tensor([augment(image=data[i])["image"] for i in indices], mean, std)
            loss = F.cross_entropy(model(inputs), targets[indices])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_value = float(loss.detach())
            bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    return TrainedClassifier(model=model, image_size=image_size, mean=mean, std=std, steps=steps,
                             final_loss=loss_value, weights_source=str(getattr(model, "weights_source", "")))


@torch.no_grad()
def predict(classifier: TrainedClassifier, images: Sequence[np.ndarray], *, batch_size: int = 32) -> np.ndarray:
    """Predicted class index per image (eval mode, no augmentation)."""
    data = resize_images(images, classifier.image_size)
    classifier.model.eval()
    out = []
    for start in range(0, len(data), batch_size):
        logits = classifier.model(_to_tensor(data[start:start + batch_size], classifier.mean, classifier.std))
        out.append(logits.argmax(dim=1).numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str]) -> dict:
    """Per-class accuracy (recall), their mean (balanced accuracy), overall accuracy and the confusion matrix.

    ``confusion[i][j]`` counts test images of class ``classes[i]`` predicted as ``classes[j]``.
    """
    matrix = confusion_matrix(list(y_true), list(y_pred), labels=list(range(len(classes))))
    support = matrix.sum(axis=1)
    # A class without test images has no accuracy: None keeps the JSON strict (no NaN).
    per_class = {cls: float(matrix[i, i] / support[i]) if support[i] else None for i, cls in enumerate(classes)}
    valid = [v for v in per_class.values() if v is not None]
    return {
        "per_class": per_class,
        "mean_accuracy": float(np.mean(valid)) if valid else None,
        "overall_accuracy": float(np.trace(matrix) / max(int(matrix.sum()), 1)),
        "confusion": matrix.astype(int).tolist(),
    }
