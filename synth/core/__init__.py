"""The ground floor every package imports (synth, detect, pipelines): errors, image I/O and atomic writes,
typed configs, CLI plumbing, the labeled defect-set format, the one download check (local file -> installed
wheel -> cache -> hub, failing fast offline), timm backbones and open_clip weights. It imports nothing else of
the project (``tests/test_layering.py``)."""
