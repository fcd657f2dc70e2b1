"""STFPM: Student-Teacher Feature Pyramid Matching (Wang, Wu, Cui, Zhang, BMVC 2021)."""

from .detector import Stfpm

__all__ = ["Stfpm"]
