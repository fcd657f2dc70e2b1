"""Dinomaly: multi-class anomaly detection by loose reconstruction of DINOv2 features (Guo et al., CVPR 2025)."""

from .detector import Dinomaly

__all__ = ["Dinomaly"]
