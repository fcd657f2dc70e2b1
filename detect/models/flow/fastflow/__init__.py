"""FastFlow: unsupervised anomaly detection and localization via 2D normalizing flows (Yu et al. 2021)."""

from .detector import Fastflow

__all__ = ["Fastflow"]
