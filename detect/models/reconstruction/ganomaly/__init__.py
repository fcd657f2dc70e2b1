"""GANomaly: semi-supervised anomaly detection via adversarial training (Akcay et al., ACCV 2018)."""

from .detector import Ganomaly

__all__ = ["Ganomaly"]
