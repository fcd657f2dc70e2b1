"""PixelVision anomaly detection: one Detector API, a registry of models, metrics and thresholds.

>>> import detect
>>> model = detect.create("patchcore")          # any name from detect.list_models()
>>> model.fit("path/to/dataset")                # train/good of an MVTec-layout folder
>>> prediction = model.predict(["a.png"])      # scores, anomaly maps, labels at the calibrated threshold
>>> model.save("model_dir"); detect.load("model_dir")
"""

from detect.base import Detector, DetectorConfig, Prediction
from detect.registry import create, list_models, load, register

__all__ = ["Detector", "DetectorConfig", "Prediction", "create", "list_models", "load", "register"]
