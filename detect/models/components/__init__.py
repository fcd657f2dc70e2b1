"""Building blocks shared by several detectors (written once, reused)."""
