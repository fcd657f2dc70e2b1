"""PixelVision synthetic defect generation: masks, augmentations, placement and labeled defect sets."""

__version__ = "0.1.0"
