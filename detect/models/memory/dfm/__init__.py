from .detector import Dfm

__all__ = ["Dfm"]
