from .detector import Dfkde

__all__ = ["Dfkde"]
