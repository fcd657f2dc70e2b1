from .detector import Padim

__all__ = ["Padim"]
