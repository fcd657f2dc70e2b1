"""Reverse Distillation from One-Class Embedding (Deng & Li, CVPR 2022)."""

from .detector import ReverseDistillation

__all__ = ["ReverseDistillation"]
