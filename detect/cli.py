"""``detect``: train, apply, evaluate and compare anomaly detectors.

Subcommands:
  fit        train a model on normal images (train/good of a dataset, or an image folder) and save it
  predict    score images or folders; writes scores.csv and anomaly-map overlays
  eval       metrics (image/pixel AUROC, AUPRO, F1-max, AP) on a labeled test split + ROC plot
  benchmark  fit + evaluate several models on one dataset: metrics, fit time, images/s, peak memory
  models     list registered models
  backbone   load a backbone offline and print its feature maps
  export     export a saved model to ONNX, checked against PyTorch with onnxruntime
  classify   defect-class classifier: classify fit | predict | eval | export
  inspect    a saved detector and classifier together: defective?, where, which defect (CSV, overlays, HTML)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from synth import __version__
from synth.core.cli_utils import add_common_arguments, run_cli
from synth.core.config import describe_yaml_error, read_yaml
from synth.core.errors import ConfigError


def parse_options(config: Path | None, sets: Sequence[str] | None, image_size: int | None) -> dict[str, Any]:
    """Model options from a YAML file (``--config``), ``--set key=value`` pairs and ``--image-size``."""
    options: dict[str, Any] = dict(read_yaml(config)) if config else {}
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set coreset_ratio=0.05")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML{describe_yaml_error(exc)}") from None
    if image_size is not None:
        options["image_size"] = image_size
    return options


def cmd_fit(args: argparse.Namespace) -> int:
    from detect.runner import fit_model

    options = parse_options(args.config, args.set, args.image_size)
    name = args.model or options.pop("model", None)
    options.pop("model", None)
    if not name:
        raise ConfigError("no model given: pass --model NAME (see `detect models`) or `model:` in --config")
    fit_model(name, args.data, args.out, options=options, val=args.val, anomalies=args.anomalies,
              progress=not args.quiet, force=args.force)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from detect.runner import predict_to_folder

    predict_to_folder(args.model_dir, args.images, args.out, overlays=not args.no_overlays,
                      batch_size=args.batch_size, progress=not args.quiet)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from detect.runner import evaluate_model

    metrics = evaluate_model(args.model_dir, args.data, args.out, progress=not args.quiet)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}, indent=2))
    threshold = metrics.get("threshold")
    if threshold:  # the decision's operating point, beside AUROC
        line = (f"at the model's threshold ({threshold['method']}): false-positive rate "
                f"{threshold['false_positive_rate']:.3f}, recall {threshold['recall']:.3f}")
        if threshold.get("target_fpr") is not None:
            line += f"; target false-positive rate {threshold['target_fpr']:.3f}"
        if threshold.get("roc_recall_at_target") is not None:
            line += f", recall at that rate on the ROC {threshold['roc_recall_at_target']:.3f}"
        if threshold.get("estimated_recall") is not None:
            line += f", expected recall from calibration {threshold['estimated_recall']:.3f}"
        print(line)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from detect.runner import calibrate_model

    calibrate_model(args.model_dir, args.data, args.out, target_fpr=args.target_fpr)
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from detect.runner import benchmark

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    table = benchmark(names, args.data, args.out, options=parse_options(args.config, args.set, args.image_size),
                      max_train=args.max_train, progress=not args.quiet)
    print(table)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from detect.registry import get_model_class, list_models

    for name in list_models():
        cls = get_model_class(name)
        extra = "  (also trains on labeled anomalies: --anomalies)" if cls.supports_anomalies else ""
        print(f"{name:24s} {cls.paradigm}{extra}")
    return 0


def cmd_backbone(args: argparse.Namespace) -> int:
    import torch

    from synth.core.backbones import create_feature_extractor

    if args.size < 32:  # smaller inputs vanish inside the stride-32 stages of the CNN backbones
        raise ConfigError(f"--size {args.size}: must be >= 32 (the default is 224).")
    model = create_feature_extractor(args.name, out_indices=tuple(args.out_indices), weights=args.weights,
                                     pretrained=not args.random)
    with torch.no_grad():
        features = model(torch.zeros(1, 3, args.size, args.size))
    print(f"{args.name}: weights from {model.weights_source}")
    for index, feature in zip(args.out_indices, features, strict=True):
        print(f"  stage {index}: {tuple(feature.shape[1:])}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from detect.export import FORMATS, METADATA_FILE, export_onnx

    if args.format not in FORMATS:
        raise ConfigError(f"--format {args.format!r}: unsupported export format; allowed: {', '.join(FORMATS)}.")
    out = export_onnx(args.model_dir, args.out, opset=args.opset, check=not args.no_check, exporter=args.exporter,
                      rtol=args.rtol)
    print(f"wrote {out} and {out.parent / METADATA_FILE}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from detect.classify.runner import evaluate_classifier, fit_classifier, predict_classes

    if args.classify_command == "fit":
        options = parse_options(args.config, args.set, args.image_size)
        if args.include_good:
            options["include_good"] = True
        fit_classifier(args.data, args.out, synthetic=args.synthetic or [], options=options,
                       progress=not args.quiet, force=args.force)
    elif args.classify_command == "predict":
        predict_classes(args.model_dir, args.images, args.out, top_k=args.top_k, batch_size=args.batch_size,
                        progress=not args.quiet)
    elif args.classify_command == "eval":
        metrics = evaluate_classifier(args.model_dir, args.data, args.out, progress=not args.quiet)
        per_class = ", ".join(f"{c} {'-' if v is None else f'{v:.3f}'}" for c, v in metrics["per_class"].items())
        print(f"balanced accuracy {metrics['balanced_accuracy']:.3f}, accuracy {metrics['overall_accuracy']:.3f} "
              f"on {metrics['n_images']} images (per class: {per_class}); ECE {metrics['reliability']['ece']:.3f}"
              + (f"; not in the model: {metrics['unseen_classes']}" if metrics["unseen_classes"] else ""))
    elif args.classify_command == "export":
        from detect.classify.export import METADATA_FILE, export_classifier_onnx

        out = export_classifier_onnx(args.model_dir, args.out, opset=args.opset, check=not args.no_check)
        print(f"wrote {out} and {out.parent / METADATA_FILE}")
    else:
        raise ConfigError("detect classify needs a subcommand: fit, predict, eval or export (see detect classify -h).")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from detect.inspect import inspect_images

    inspect_images(args.detector, args.classifier, args.images, args.out, batch_size=args.batch_size,
                   overlays=not args.no_overlays, top_k=args.top_k, progress=not args.quiet)
    return 0


def _add_classify_parser(sub: Any) -> None:
    parser = sub.add_parser("classify", help="defect-class classifier: fit | predict | eval | export")
    commands = parser.add_subparsers(dest="classify_command", metavar="SUBCOMMAND")
    fit = commands.add_parser("fit", help="train on labeled defect sets and save the classifier")
    fit.add_argument("--data", type=Path, action="append", required=True,
                     help="real labeled defect set (MVTec layout: test/<class>/), repeatable")
    fit.add_argument("--synthetic", type=Path, action="append",
                     help="synthetic defect set (synth generate output), repeatable; weight: --set synthetic_weight=W")
    fit.add_argument("--include-good", action="store_true", help="add the normal images as a class 'good'")
    fit.add_argument("--out", type=Path, required=True, help="classifier folder to write")
    fit.add_argument("--force", action="store_true", help="overwrite an existing classifier folder")
    fit.add_argument("--config", type=Path, help="YAML with classifier options (detect.classify.ClassifierConfig)")
    fit.add_argument("--set", action="append", metavar="KEY=VALUE", help="classifier option, repeatable")
    fit.add_argument("--image-size", type=int, help="square input size")
    add_common_arguments(fit)
    pred = commands.add_parser("predict", help="classify images; writes predictions.csv")
    pred.add_argument("--model-dir", type=Path, required=True)
    pred.add_argument("images", nargs="+", type=Path, help="image files and/or folders")
    pred.add_argument("--out", type=Path, required=True)
    pred.add_argument("--top-k", type=int, default=3, help="classes listed per image (default 3)")
    pred.add_argument("--batch-size", type=int, default=32)
    add_common_arguments(pred)
    ev = commands.add_parser("eval", help="accuracy, confusion matrix and reliability on a labeled defect set")
    ev.add_argument("--model-dir", type=Path, required=True)
    ev.add_argument("--data", type=Path, required=True, help="labeled defect set (test/<class>/)")
    ev.add_argument("--out", type=Path, help="folder for metrics.json, confusion.png, reliability.png")
    add_common_arguments(ev)
    exp = commands.add_parser("export", help="export the classifier to ONNX (checked against PyTorch)")
    exp.add_argument("--model-dir", type=Path, required=True)
    exp.add_argument("--out", type=Path, help="file to write (default: MODEL_DIR/model.onnx)")
    exp.add_argument("--opset", type=int, default=18)
    exp.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-PyTorch check")
    add_common_arguments(exp)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML with model options (and optionally `model:`)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="model option, repeatable")
    parser.add_argument("--image-size", type=int, help="square input size (every image is resized to it)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"pixelvision {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    fit = sub.add_parser("fit", help="train a model on normal images and save it")
    fit.add_argument("--model", help="model name (detect models)")
    fit.add_argument("--data", type=Path, required=True, help="MVTec-layout dataset (train/good) or image folder")
    fit.add_argument("--val", type=Path, help="validation data for the threshold (default: held-out normals)")
    fit.add_argument("--anomalies", type=Path, help="labeled anomalies to train on (defect set from `synth generate` "
                     "or MVTec folder; supervised models only, e.g. supersimplenet)")
    fit.add_argument("--out", type=Path, required=True, help="model folder to write")
    fit.add_argument("--force", action="store_true", help="overwrite an existing model folder")
    _add_model_options(fit)
    add_common_arguments(fit)

    pred = sub.add_parser("predict", help="score images; writes scores.csv and overlays")
    pred.add_argument("--model-dir", type=Path, required=True)
    pred.add_argument("images", nargs="+", type=Path, help="image files and/or folders")
    pred.add_argument("--out", type=Path, required=True)
    pred.add_argument("--no-overlays", action="store_true", help="write scores.csv only")
    pred.add_argument("--batch-size", type=int, default=None)
    add_common_arguments(pred)

    ev = sub.add_parser("eval", help="metrics on a labeled test split (metrics.json, roc.png)")
    ev.add_argument("--model-dir", type=Path, required=True)
    ev.add_argument("--data", type=Path, required=True, help="MVTec-layout dataset with test/ and ground_truth/")
    ev.add_argument("--out", type=Path, help="folder for metrics.json and roc.png (default: MODEL_DIR/eval)")
    add_common_arguments(ev)

    cal = sub.add_parser("calibrate", help="re-set a saved model's threshold on good parts it did not train on")
    cal.add_argument("--model-dir", type=Path, required=True, help="model folder written by `detect fit --out`")
    cal.add_argument("--data", type=Path, required=True,
                     help="folder of normal images (or a defect set / MVTec folder: its test split)")
    cal.add_argument("--target-fpr", type=float, default=None,
                     help="false-positive rate on normals the threshold aims at (default: the model's)")
    cal.add_argument("--out", type=Path, help="model folder to write (default: MODEL_DIR, replaced atomically)")
    add_common_arguments(cal)

    bench = sub.add_parser("benchmark", help="compare models on one dataset")
    bench.add_argument("--models", required=True, help="comma-separated model names")
    bench.add_argument("--data", type=Path, required=True)
    bench.add_argument("--out", type=Path, default=Path("benchmark_out"))
    bench.add_argument("--max-train", type=int, default=None, help="use at most this many training images")
    _add_model_options(bench)
    add_common_arguments(bench)

    models = sub.add_parser("models", help="list registered models")
    add_common_arguments(models)

    bb = sub.add_parser("backbone", help="load a backbone offline and print its feature map shapes")
    bb.add_argument("name", nargs="?", default="tf_efficientnet_lite0", help="any timm model name")
    bb.add_argument("--weights", type=Path, help="local weights file (.safetensors/.pth) for offline use")
    bb.add_argument("--random", action="store_true", help="random initialisation (no weights)")
    bb.add_argument("--out-indices", type=int, nargs="+", default=[1, 2, 3])
    bb.add_argument("--size", type=int, default=224)
    add_common_arguments(bb)

    exp = sub.add_parser("export", help="export a saved model to ONNX (verified against PyTorch)")
    exp.add_argument("--model-dir", type=Path, required=True, help="model folder written by `detect fit --out`")
    exp.add_argument("--format", default="onnx", help="export format (onnx)")
    exp.add_argument("--out", type=Path, help="file to write (default: MODEL_DIR/model.onnx)")
    exp.add_argument("--opset", type=int, default=18, help="ONNX opset version (default 18)")
    exp.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                     help="torch.onnx exporter (default torchscript, falling back to dynamo when it fails)")
    exp.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-PyTorch check")
    exp.add_argument("--rtol", type=float, default=None,
                     help="check tolerance relative to the score scale (default 1e-4; per-model for a few)")
    add_common_arguments(exp)
    _add_classify_parser(sub)
    ins = sub.add_parser("inspect", help="detector + classifier: defective?, where, which defect")
    ins.add_argument("--detector", type=Path, required=True, help="model folder written by `detect fit`")
    ins.add_argument("--classifier", type=Path, required=True, help="folder written by `detect classify fit`")
    ins.add_argument("images", nargs="+", type=Path, help="image files and/or folders")
    ins.add_argument("--out", type=Path, required=True)
    ins.add_argument("--batch-size", type=int, default=16)
    ins.add_argument("--top-k", type=int, default=3)
    ins.add_argument("--no-overlays", action="store_true", help="CSV (and a gallery without pictures) only")
    add_common_arguments(ins)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv, {
        "fit": cmd_fit, "predict": cmd_predict, "eval": cmd_eval, "calibrate": cmd_calibrate,
        "benchmark": cmd_benchmark, "models": cmd_models, "backbone": cmd_backbone, "export": cmd_export,
        "classify": cmd_classify, "inspect": cmd_inspect,
    })


if __name__ == "__main__":
    raise SystemExit(main())
