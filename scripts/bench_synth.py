"""Throughput of the model-free generators (images/s), in memory and with PNG writing, beside Anomalib.

Run (Anomalib is not a project dependency; put it in a venv that sees the project):

    python -m venv --system-site-packages /tmp/anomalib-venv && /tmp/anomalib-venv/bin/pip install anomalib
    /tmp/anomalib-venv/bin/python scripts/bench_synth.py            # writes scripts/results/bench_synth.{json,md}

Without anomalib importable, only our generators are measured. Same image, same sizes, same process, same
PNG writer (synth.io.write_image: atomic, fsync) for every generator; the ratio row compares ``perlin``
(Perlin mask + noise texture + blend) with Anomalib's ``PerlinAnomalyGenerator`` (Perlin mask + noise texture
+ blend when no anomaly-source folder is given) at probability 1.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch

from synth.augment import AUGMENTERS
from synth.io import write_image, write_json, write_text
from synth.placement import DefectExemplar, MaskGuidedPlacer
from synth.toyset import load_texture

REPO = Path(__file__).resolve().parent.parent
MAGNETIC_TILE = REPO.parent / "shared" / "data" / "magnetic-tile"


def test_image(size: int) -> np.ndarray:
    """A real photo: the first magnetic-tile normal image when present, else scikit-image's brick."""
    from synth.io import list_images, read_image

    if (MAGNETIC_TILE / "train" / "good").is_dir():
        image = read_image(list_images(MAGNETIC_TILE / "train" / "good")[0])
    else:
        image = load_texture("brick")
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def _image_and_mask(generator: Callable) -> Callable[[np.ndarray, np.random.Generator], tuple]:
    def run(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        result = generator(image, rng)
        return result.image, result.mask

    return run


def our_generators(size: int) -> dict[str, Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]]:
    from synth.io import list_images, read_image, read_mask

    generators = {}
    for name, cls in AUGMENTERS.items():
        augmenter = cls(p_anomaly=1.0) if name == "draem" else cls()
        generators[name] = _image_and_mask(augmenter)
    demo = REPO / "assets" / "demo"
    exemplars = []
    for mask_path in list_images(demo / "masks", recursive=True):
        defect_class = mask_path.parent.name
        image = read_image(demo / "defects" / defect_class / mask_path.name)
        exemplars.append(DefectExemplar(mask=read_mask(mask_path), image=image, defect_class=defect_class,
                                        source=str(mask_path)))
    for blend in ("alpha", "poisson", "texture"):
        placer = MaskGuidedPlacer(exemplars, blend_mode=blend, foreground="texture")
        generators[f"paste-{blend}"] = _image_and_mask(placer)
    return generators


def anomalib_generator() -> tuple[Callable | None, str]:
    try:
        import anomalib
        from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return None, f"not available ({type(exc).__name__}: {exc})"
    generator = PerlinAnomalyGenerator(probability=1.0)

    def run(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        tensor = torch.from_numpy(image).permute(2, 0, 1).float().div_(255)
        augmented, mask = generator(tensor)
        out = (augmented.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        return out, mask[0].numpy() > 0.5

    return run, f"anomalib {anomalib.__version__}"


def measure(generate: Callable, image: np.ndarray, n: int, write_dir: Path | None, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    generate(image, rng)  # warm-up (caches, lazy imports)
    start = time.perf_counter()
    for index in range(n):
        out, mask = generate(image, rng)
        if write_dir is not None:
            write_image(write_dir / f"{index:05d}.png", out)
            write_image(write_dir / f"{index:05d}_mask.png", mask)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--n", type=int, default=100, help="images per measurement")
    parser.add_argument("--out", type=Path, default=REPO / "scripts" / "results" / "bench_synth")
    args = parser.parse_args()

    peer, peer_name = anomalib_generator()
    rows = []
    for size in args.sizes:
        image = test_image(size)
        generators = our_generators(size)
        if peer is not None:
            generators["anomalib PerlinAnomalyGenerator"] = peer
        for name, generate in generators.items():
            with tempfile.TemporaryDirectory() as tmp:
                row = {"size": size, "generator": name,
                       "memory_img_s": measure(generate, image, args.n, None),
                       "png_img_s": measure(generate, image, max(args.n // 2, 10), Path(tmp))}
            rows.append(row)
            print(f"{size:4d}  {name:34s} {row['memory_img_s']:9.1f} img/s in memory  "
                  f"{row['png_img_s']:8.1f} img/s with PNG")
    ratios = {}
    if peer is not None:
        for size in args.sizes:
            ours = next(r for r in rows if r["size"] == size and r["generator"] == "perlin")
            theirs = next(r for r in rows if r["size"] == size and r["generator"].startswith("anomalib"))
            ratios[str(size)] = {"memory": ours["memory_img_s"] / theirs["memory_img_s"],
                                 "png": ours["png_img_s"] / theirs["png_img_s"]}
            print(f"perlin vs anomalib at {size}: {ratios[str(size)]['memory']:.1f}x in memory, "
                  f"{ratios[str(size)]['png']:.1f}x with PNG")
    meta = {"peer": peer_name, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": __import__("os").cpu_count(), "n": args.n}
    write_json(args.out.with_suffix(".json"), {"meta": meta, "results": rows, "perlin_vs_anomalib": ratios})
    lines = [f"Peer: {peer_name}; torch threads {meta['torch_threads']}; {meta['cpu_count']} CPUs", "",
             "| size | generator | img/s in memory | img/s with PNG |", "|---|---|---|---|"]
    lines += [f"| {r['size']} | {r['generator']} | {r['memory_img_s']:.1f} | {r['png_img_s']:.1f} |" for r in rows]
    if ratios:
        lines += ["", "| size | perlin / anomalib (memory) | perlin / anomalib (PNG) |", "|---|---|---|"]
        lines += [f"| {s} | {v['memory']:.1f}x | {v['png']:.1f}x |" for s, v in ratios.items()]
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
