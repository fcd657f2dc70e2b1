"""EfficientAD: Accurate Visual Anomaly Detection at Millisecond-Level Latencies (Batzner et al., WACV 2024)."""

from .detector import EfficientAd

__all__ = ["EfficientAd"]
