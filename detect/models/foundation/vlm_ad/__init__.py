"""VLM-AD: anomaly detection with a vision-language model's structured JSON verdict (OpenAI API or transformers)."""

from .detector import VlmAd, VlmAdConfig
from .schema import Defect, Verdict

__all__ = ["Defect", "VlmAd", "VlmAdConfig", "Verdict"]
