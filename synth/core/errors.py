"""Exceptions shared by every PixelVision package.

Every error a user can cause by bad input is a :class:`PixelVisionError`; the CLIs print its
message (which names the file or key and the fix) and exit with status 2 instead of a traceback.
"""

from __future__ import annotations


class PixelVisionError(Exception):
    """Base class for errors caused by user input or environment, shown without a traceback."""


class InputError(PixelVisionError, ValueError):
    """A file, folder, image, mask or argument is missing or unusable."""


class ConfigError(PixelVisionError, ValueError):
    """A configuration file or value is invalid; the message names the key."""


class WeightsUnavailableError(PixelVisionError, RuntimeError):
    """Pretrained weights could not be found locally and could not be downloaded."""
