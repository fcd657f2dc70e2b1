"""Defect-class classification: which defect is it? (``detect classify fit|predict|eval``)."""

from detect.classify.classifier import ClassifierConfig, ClassPrediction, DefectClassifier, LabeledImages

__all__ = ["ClassPrediction", "ClassifierConfig", "DefectClassifier", "LabeledImages"]
