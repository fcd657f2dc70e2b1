"""Detector implementations, one package per model: detect/models/<paradigm>/<model>/.

Each model package holds ``torch_model.py`` (the nn.Module: inference only) and ``detector.py`` (training
logic, registered with ``detect.registry.register``); its ``__init__`` imports the detector.
"""
