"""Reconstruction detectors: anomalies are what a model trained on normal data cannot reconstruct."""
