"""CFlow: CFLOW-AD, conditional normalizing flows for anomaly detection and localization (Gudovskiy et al. 2022)."""

from .detector import Cflow

__all__ = ["Cflow"]
