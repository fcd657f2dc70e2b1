"""``synth``: generate labeled synthetic defect sets.

Subcommands: ``generate`` (model-free and learned generators), ``filter`` (two-stage DINOv2 filter of a
generated set), ``demo`` (generate on the bundled example images), ``toyset`` (the small real-texture test set),
``inspect`` (validate and summarise a defect set), ``export-hf`` (save a defect set as a Hugging Face dataset).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from synth import __version__
from synth.config import GenerateConfig
from synth.core.cli_utils import add_common_arguments, run_cli
from synth.core.config import describe_yaml_error, load_config
from synth.core.errors import ConfigError
from synth.generators import generator_names

logger = logging.getLogger("synth")

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config (configs/generate_*.yaml); flags override it")
    parser.add_argument("--normal", type=Path, help="folder of defect-free images")
    parser.add_argument("--masks", type=Path, help="real defect masks, <class>/<name>.png (method paste)")
    parser.add_argument("--defects", type=Path, help="defect images matching the masks by name")
    parser.add_argument("--anomaly-source", type=Path, help="texture folder for DRAEM (e.g. DTD)")
    parser.add_argument("--method", choices=generator_names())
    parser.add_argument("--blend", choices=("alpha", "poisson", "texture"), help="blend mode of method paste")
    parser.add_argument("--foreground", choices=("auto", "object", "texture"))
    parser.add_argument("--normal-match", choices=("any", "exemplar"),
                        help="method paste: 'exemplar' prefers normals resembling the defects' source images")
    parser.add_argument("--defect-class", help="class label for perlin/draem/cutpaste samples")
    parser.add_argument("--n", type=int, help="number of defect samples")
    parser.add_argument("--out", type=Path, help="output folder (a labeled defect set)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--strict", action="store_true", default=None,
                        help="fail on the first unreadable file instead of skipping it")
    parser.add_argument("--no-copy-normals", dest="copy_normals", action="store_false", default=None,
                        help="do not copy the normal images into train/good")
    parser.add_argument("--workers", type=int, help="processes generating in parallel (default: all cores; the "
                        "output bytes do not depend on it)")
    parser.add_argument("--png-compression", type=int, help="zlib level 0-9 of the written PNGs (default 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a method_params entry, YAML value (repeatable): --set controlnet=runs/cn")


def _generate_config(args: argparse.Namespace) -> GenerateConfig:
    keys = ("normal", "masks", "defects", "anomaly_source", "method", "blend", "foreground", "normal_match",
            "defect_class", "n", "out", "seed", "strict", "copy_normals", "workers", "png_compression")
    cfg = load_config(GenerateConfig, args.config, {k: getattr(args, k) for k in keys})
    if args.set:
        cfg.method_params = {**cfg.method_params, **_parse_set(args.set)}
    return cfg


def _run_generate(cfg: GenerateConfig, quiet: bool, title: str) -> int:
    from synth.generate import generate
    from synth.report import defect_set_report

    report = generate(cfg, progress=not quiet)
    if not _main_process():  # a shard under accelerate launch: the main process merges and reports
        return 0
    html_path = defect_set_report(report.dataset, title=title, config=cfg.model_dump(mode="json"),
                                  skipped=report.skipped_files)
    print(f"{report.dataset}")
    print(f"wrote {cfg.out}/ (manifest.jsonl, preview.png, {html_path.name}); "
          f"{report.generated} generated, {report.resumed_from} already there")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    return _run_generate(_generate_config(args), args.quiet, f"synth generate: {args.method or 'config'}")


def cmd_demo(args: argparse.Namespace) -> int:
    cfg = load_config(GenerateConfig, DEMO_CONFIG, {"out": args.out, "seed": args.seed})
    base = DEMO_CONFIG.parent.parent
    cfg = cfg.model_copy(update={k: base / getattr(cfg, k) for k in ("normal", "masks", "defects")
                                 if getattr(cfg, k) is not None and not getattr(cfg, k).is_absolute()})
    return _run_generate(cfg, args.quiet, "PixelVision demo: synthetic defects from 3 real masks")


def cmd_toyset(args: argparse.Namespace) -> int:
    from synth.toyset import make_texture_defect_set

    dataset = make_texture_defect_set(args.out, texture=args.texture, size=args.size, n_train=args.n_train,
                                      n_test_good=args.n_test_good, n_test_per_class=args.n_test_per_class,
                                      seed=args.seed)
    print(dataset)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from synth.core.defect_set import read_defect_set

    dataset = read_defect_set(args.data)
    if args.check:
        for sample in dataset:
            image = dataset.load_image(sample)
            if sample.is_anomalous:
                dataset.load_mask(sample, image.shape[:2])
    print(json.dumps({"root": str(dataset.root), "samples": len(dataset), "defect_classes": dataset.defect_classes,
                      "summary": repr(dataset)}, indent=2))
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from synth.core.defect_set import read_defect_set

    hf = read_defect_set(args.data).to_hf_dataset()
    hf.save_to_disk(str(args.out))
    print(f"saved {len(hf)} rows to {args.out} (datasets.load_from_disk)")
    return 0


FILTER_KEYS = ("generated", "real_defects", "normals", "out", "embedder", "embedder_path", "stage1_keep",
               "stage1_ratio", "stage2_keep", "stage2_ratio", "per_class", "k", "batch_size", "image_size",
               "device", "copy_normals", "strict", "seed")


def _add_filter_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config (configs/filter.yaml); flags override it")
    parser.add_argument("--generated", type=Path, help="generated defect set to filter (from synth generate)")
    parser.add_argument("--real-defects", type=Path,
                        help="real defect images: folder (<class>/ subfolders = classes) or MVTec dataset")
    parser.add_argument("--normals", type=Path,
                        help="normal images: folder or MVTec dataset (train/good); default: the set's train/good")
    parser.add_argument("--out", type=Path, help="output folder (the filtered defect set)")
    parser.add_argument("--embedder", choices=("auto", "dinov2", "lite0"),
                        help="auto (default): DINOv2 ViT-S/14 if loadable, else the offline EfficientNet-Lite0")
    parser.add_argument("--embedder-path", help="local DINOv2 folder (or hub id); with --embedder lite0 a weights file")
    parser.add_argument("--stage1-keep", type=int, help="keep the N candidates closest to the real defects")
    parser.add_argument("--stage1-ratio", type=float, help="... or this fraction of them (default 0.5)")
    parser.add_argument("--stage2-keep", type=int, help="of those, keep the N farthest from the normals")
    parser.add_argument("--stage2-ratio", type=float, help="... or this fraction of them (default 0.5)")
    parser.add_argument("--per-class", action="store_true", default=None,
                        help="rank each defect class against the real defects of that class")
    parser.add_argument("--k", type=int, help="nearest neighbours averaged for the distances (default 5)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--image-size", type=int, help="embedder input side (default 224)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--no-copy-normals", dest="copy_normals", action="store_false", default=None,
                        help="do not copy the generated set's normal (good) images")
    parser.add_argument("--strict", action="store_true", default=None,
                        help="fail on the first unreadable image instead of skipping it")
    parser.add_argument("--seed", type=int)


def cmd_filter(args: argparse.Namespace) -> int:
    from synth.filter import filter_defect_set, load_filter_config
    from synth.report import defect_set_report

    cfg = load_filter_config(args.config, {k: getattr(args, k) for k in FILTER_KEYS})
    report = filter_defect_set(cfg, progress=not args.quiet)
    html_path = defect_set_report(report.dataset, title="synth filter", config=cfg.model_dump(mode="json"),
                                  skipped=report.skipped_files)
    print(f"{report.dataset}")
    print(f"embedder {report.embedder['name']} ({report.embedder['source']}): {report.candidates} candidates -> "
          f"{report.stage1_kept} after stage 1 (closest to real) -> {report.kept} kept (farthest from normal)")
    print(f"wrote {cfg.out}/ (manifest.jsonl with filter scores, {report.scores_path.name}, preview.png, "
          f"{html_path.name}); {report.normals_copied} normal images copied")
    return 0


TRAIN_CONTROLNET_KEYS = ("data", "masks", "defects", "out", "pretrained", "resolution", "train_steps", "batch_size",
                         "gradient_accumulation_steps", "learning_rate", "mixed_precision", "gradient_checkpointing",
                         "checkpoint_every", "shots", "seed")
TRAIN_CSM_KEYS = ("data", "out", "pretrained", "clip_model", "clip_pretrained", "clip_checkpoint", "resolution",
                  "train_steps", "batch_size", "learning_rate", "mixed_precision", "seed")


def _parse_set(items: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs; values are YAML (``--set num_tokens=8``, ``--set 'class_names={a: b}'``)."""
    import yaml

    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set num_tokens=8.")
        try:
            values[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML{describe_yaml_error(exc)}") from None
    return values


def _add_diffusion_training_arguments(parser: argparse.ArgumentParser, config_name: str) -> None:
    parser.add_argument("--config", type=Path, help=f"YAML config (configs/{config_name}); flags override it")
    parser.add_argument("--data", type=Path, help="labeled defect set; its defect samples are the training pairs")
    parser.add_argument("--out", type=Path, help="output folder (weights, checkpoints/, train config)")
    parser.add_argument("--pretrained", help="SD inpainting model: hub id or local folder in diffusers layout")
    parser.add_argument("--resolution", type=int, help="training size in pixels (multiple of 8)")
    parser.add_argument("--train-steps", type=int, help="optimizer steps in total (raise it to continue a run)")
    parser.add_argument("--batch-size", type=int, help="samples per micro-step and process")
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"))
    parser.add_argument("--seed", type=int)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other config key, YAML value (repeatable)")


def _add_train_controlnet_arguments(parser: argparse.ArgumentParser) -> None:
    _add_diffusion_training_arguments(parser, "train_controlnet.yaml")
    parser.add_argument("--masks", type=Path, help="instead of --data: real defect masks <class>/<name>.png")
    parser.add_argument("--defects", type=Path, help="with --masks: the defect images the masks belong to")
    parser.add_argument("--gradient-accumulation-steps", type=int)
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None,
                        help="less GPU memory, ~25 %% more time")
    parser.add_argument("--checkpoint-every", type=int, help="steps between resumable checkpoints")
    parser.add_argument("--shots", type=int, help="use only the first N defect samples of each class")


def _add_train_csm_arguments(parser: argparse.ArgumentParser) -> None:
    _add_diffusion_training_arguments(parser, "train_csm.yaml")
    parser.add_argument("--clip-model", help="open_clip ViT name (default ViT-B-16) or model-config JSON")
    parser.add_argument("--clip-pretrained", help="open_clip pretrained tag (default laion2b_s34b_b88k)")
    parser.add_argument("--clip-checkpoint", type=Path, help="local open_clip checkpoint file (offline use)")


def _main_process() -> bool:
    """True in a plain run and on rank 0 under ``accelerate launch`` / torchrun (print once)."""
    return int(os.environ.get("RANK", "0")) == 0


def cmd_train_controlnet(args: argparse.Namespace) -> int:
    from synth.diffusion.controlnet import load_train_config, train_controlnet

    overrides = {k: getattr(args, k) for k in TRAIN_CONTROLNET_KEYS}
    overrides.update(_parse_set(args.set))
    cfg = load_train_config(args.config, overrides)
    path = train_controlnet(cfg, progress=not args.quiet)
    if _main_process():
        print(f"wrote {path} (ControlNet weights); generate with configs/generate_controlnet.yaml and "
              f"method_params.controlnet: {cfg.out}")
    return 0


def cmd_train_csm(args: argparse.Namespace) -> int:
    from synth.diffusion.train_csm import load_train_config, train_csm

    overrides = {k: getattr(args, k) for k in TRAIN_CSM_KEYS}
    overrides.update(_parse_set(args.set))
    out = train_csm(load_train_config(args.config, overrides), progress=not args.quiet)
    if _main_process():
        print(f"wrote {out}/csm_adapter.safetensors (+ csm_adapter.json); use it with "
              f"`synth generate --method csm` and method_params.adapter: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="synth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pixelvision {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate a labeled synthetic defect set")
    _add_generate_arguments(gen)
    add_common_arguments(gen)

    demo = sub.add_parser("demo", help="generate defects on the bundled example images (assets/demo)")
    demo.add_argument("--out", type=Path, default=Path("demo_out"))
    demo.add_argument("--seed", type=int, default=None)
    add_common_arguments(demo)

    toy = sub.add_parser("toyset", help="write the small real-texture defect set used by tests")
    toy.add_argument("--out", type=Path, required=True)
    toy.add_argument("--texture", choices=("brick", "grass", "gravel"), default="brick")
    toy.add_argument("--size", type=int, default=64)
    toy.add_argument("--n-train", type=int, default=16)
    toy.add_argument("--n-test-good", type=int, default=8)
    toy.add_argument("--n-test-per-class", type=int, default=8)
    toy.add_argument("--seed", type=int, default=0)
    add_common_arguments(toy)

    ins = sub.add_parser("inspect", help="validate and summarise a defect set (MVTec layout or manifest)")
    ins.add_argument("data", type=Path)
    ins.add_argument("--check", action="store_true", help="decode every image and mask")
    add_common_arguments(ins)

    filt = sub.add_parser("filter", help="keep generated defects close to real ones and far from normals")
    _add_filter_arguments(filt)
    add_common_arguments(filt)

    tcn = sub.add_parser("train-controlnet", help="train the mask ControlNet for learned defect inpainting "
                                                  "(GPUs: accelerate launch -m synth.cli train-controlnet ...)")
    _add_train_controlnet_arguments(tcn)
    add_common_arguments(tcn)

    tcsm = sub.add_parser("train-csm", help="train the CSM semantic-guidance adapter on a few real defects")
    _add_train_csm_arguments(tcsm)
    add_common_arguments(tcsm)

    hf = sub.add_parser("export-hf", help="save a defect set as a Hugging Face dataset (save_to_disk)")
    hf.add_argument("data", type=Path)
    hf.add_argument("--out", type=Path, required=True)
    add_common_arguments(hf)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv, {
        "generate": cmd_generate, "demo": cmd_demo, "toyset": cmd_toyset, "inspect": cmd_inspect,
        "export-hf": cmd_export_hf, "filter": cmd_filter,
        "train-controlnet": cmd_train_controlnet, "train-csm": cmd_train_csm,
    })


if __name__ == "__main__":
    raise SystemExit(main())
