"""DRAEM: Discriminatively trained Reconstruction Embedding (Zavrtanik, Kristan, Skocaj, ICCV 2021)."""

from .detector import Draem

__all__ = ["Draem"]
