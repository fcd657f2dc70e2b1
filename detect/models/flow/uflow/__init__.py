"""U-Flow: a U-shaped normalizing flow for anomaly detection with unsupervised threshold (Tailanian et al. 2022)."""

from .detector import Uflow

__all__ = ["Uflow"]
