"""SuperSimpleNet: feature-space synthetic anomalies, unsupervised or supervised (Rolih, Fučka, Skočaj, ICPR 2024)."""

from .detector import SuperSimpleNet

__all__ = ["SuperSimpleNet"]
