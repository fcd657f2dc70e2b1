"""CS-Flow: Fully Convolutional Cross-Scale-Flows (Rudolph, Wehrbein, Rosenhahn, Wandt, WACV 2022)."""

from .detector import CsFlow

__all__ = ["CsFlow"]
