"""Normalizing-flow detectors: density of pretrained CNN features under a trained flow (FastFlow, CFlow, U-Flow)."""
