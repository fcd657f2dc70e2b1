"""Memory-bank and statistical detectors: normal features kept as a bank or a fitted distribution."""
