"""DSR: dual subspace re-projection network (Zavrtanik, Kristan, Skocaj, ECCV 2022)."""

from .detector import Dsr

__all__ = ["Dsr"]
