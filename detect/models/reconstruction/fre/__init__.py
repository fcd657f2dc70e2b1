"""FRE: Feature Reconstruction Error (Ndiour, Ahuja, Tickoo, BMVC 2023; Anomalib's Fre)."""

from .detector import Fre

__all__ = ["Fre"]
