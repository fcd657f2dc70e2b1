"""PixelVision closed-loop pipelines: generate -> filter -> train -> evaluate -> report."""
