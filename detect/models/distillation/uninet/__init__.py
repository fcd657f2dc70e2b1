"""UniNet: contrastive learning-guided unified framework with feature selection (Wei, Jiang, Xu, CVPR 2025)."""

from .detector import UniNet

__all__ = ["UniNet"]
