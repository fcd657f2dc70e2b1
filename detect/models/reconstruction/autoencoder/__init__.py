"""Convolutional autoencoder: pixel reconstruction error (L2 / SSIM) of an autoencoder trained on normal images."""

from .detector import Autoencoder

__all__ = ["Autoencoder"]
