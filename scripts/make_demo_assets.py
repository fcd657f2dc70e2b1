"""Rebuild assets/demo/: real texture crops (scikit-image's gravel photo) and a few planted example defects.

The demo (`synth demo`) generates new defects from these masks; run this script only to regenerate them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from synth.core.io import write_image
from synth.toyset import load_texture, plant_defect, random_crop

ROOT = Path(__file__).resolve().parent.parent / "assets" / "demo"


def main() -> None:
    rng = np.random.default_rng(2026)
    photo = load_texture("gravel")
    for i in range(8):
        write_image(ROOT / "normal" / f"gravel_{i:02d}.png", random_crop(photo, 128, rng))
    for defect_class in ("spot", "scratch"):
        for i in range(2):
            image, mask = plant_defect(random_crop(photo, 128, rng), defect_class, rng)
            write_image(ROOT / "defects" / defect_class / f"{defect_class}_{i}.png", image)
            write_image(ROOT / "masks" / defect_class / f"{defect_class}_{i}.png", mask)
    print(f"wrote {ROOT}")


if __name__ == "__main__":
    main()
