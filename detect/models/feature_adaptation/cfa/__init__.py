"""CFA: Coupled-hypersphere-based Feature Adaptation (Lee, Lee, Song, IEEE Access 2022)."""

from .detector import Cfa

__all__ = ["Cfa"]
