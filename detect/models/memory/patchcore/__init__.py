"""PatchCore (Roth et al., CVPR 2022): coreset memory bank of locally aware patch features."""

from .detector import Patchcore, PatchcoreConfig, k_center_greedy
from .torch_model import PatchcoreModel

__all__ = ["Patchcore", "PatchcoreConfig", "PatchcoreModel", "k_center_greedy"]
