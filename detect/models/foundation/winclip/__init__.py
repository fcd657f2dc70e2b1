"""WinCLIP / WinCLIP+: zero- and few-normal-shot anomaly detection with CLIP (Jeong et al., CVPR 2023)."""

from .detector import WinClip

__all__ = ["WinClip"]
