"""The pipeline report: one self-contained ``report.html`` and a ``results.json`` of every number.

``report.html`` has no external resource: CSS is inline, images (sample grids, curves, ROC curves, confusion
matrices) are base64 PNG data URIs drawn with matplotlib's Agg backend, there is no JavaScript and no link
leaving the page, so it can be mailed or archived as is. Sections (each a ``<section id=...>``): ``summary``,
``config``, ``samples``, ``fewshot``, ``roc``, ``classification``, ``realism``; a stage that did not run shows
a short "not run" note. All text is HTML-escaped, and config values under keys whose name contains ``key``,
``token`` or ``secret`` (and strings that look like API tokens) are replaced by ``***`` in both files.

The result dict is what :func:`pipelines.run.run_pipeline` assembles; every part is optional.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.report_html import esc, figure_uri, img, note, num, pyplot, section, table
from synth.core.errors import InputError
from synth.core.io import write_json, write_text
from synth.masks import overlay_mask

if TYPE_CHECKING:
    from pipelines.run import RunResult

logger = logging.getLogger(__name__)

__all__ = ["SECTIONS", "redact", "redact_text", "write_report"]

# The decision table opens the report (when that stage ran); config and seeds close it, collapsed.
SECTIONS = ("decision", "summary", "samples", "fewshot", "roc", "classification", "realism", "config")
COLLAPSED = ("config",)
REDACTED = "***"
_SECRET_NAME = re.compile(r"key|token|secret", re.IGNORECASE)
# Shapes of common API tokens (OpenAI/Anthropic sk-, Hugging Face hf_, GitHub ghp_/gho_/github_pat_, AWS AKIA,
# Slack xox?-): redacted wherever they appear, whatever the key is called.
_TOKEN_VALUE = re.compile(r"\b(?:sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|"
                          r"github_pat_[A-Za-z0-9_]{20,}|AKIA[0-9A-Z]{16}|xox[abprs]-[A-Za-z0-9-]{10,})")
_YAML_SECRET_LINE = re.compile(r"^(\s*(?:-\s+)?[\"']?[\w.-]*(?:key|token|secret)[\w.-]*[\"']?\s*:)(\s*\S.*)$",
                               re.IGNORECASE)

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#23395d;color:#fff;padding:1em 2em}header h1{margin:0 0 .2em 0;font-size:1.5em}
nav{padding:.5em 2em;background:#e8edf4}nav a{margin-right:1.2em;color:#23395d;text-decoration:none}
main{padding:0 2em 2em 2em;max-width:1200px}section{margin-top:1.8em}h2{border-bottom:2px solid #23395d}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{border:1px solid #ccc;padding:3px 9px}
th{background:#eef1f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #ddd;background:#fff}pre{background:#f0f0f0;padding:.8em;overflow:auto;
font-size:.85em}.note{color:#666;font-style:italic}.best{font-weight:bold}figure{margin:.8em 0}
figcaption{color:#555;font-size:.9em}
"""


# --------------------------------------------------------------------------------------------------
# redaction and formatting
# --------------------------------------------------------------------------------------------------

def redact_text(text: str) -> str:
    """Replace token-shaped substrings and the values of YAML lines whose key names a secret."""
    lines = []
    for line in text.splitlines():
        match = _YAML_SECRET_LINE.match(line)
        if match:
            line = f"{match.group(1)} \"{REDACTED}\""
        lines.append(_TOKEN_VALUE.sub(REDACTED, line))
    return "\n".join(lines) + ("\n" if text.endswith("\n") else "")


def redact(obj: Any) -> Any:
    """A copy of ``obj`` with values under secret-named keys (key/token/secret) and token-shaped strings masked."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if isinstance(key, str) and _SECRET_NAME.search(key) and value not in (None, "", {}, []):
                out[key] = REDACTED
            else:
                out[key] = redact(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return _TOKEN_VALUE.sub(REDACTED, obj)
    return obj


def _pick_samples(samples: list, count: int) -> list:
    """Up to ``count`` samples, round-robin over the defect classes (so every class shows up), in set order."""
    by_class: dict[str, list] = {}
    for sample in samples:
        by_class.setdefault(sample.defect_class, []).append(sample)
    picked: list = []
    position = 0
    while len(picked) < count and any(position < len(v) for v in by_class.values()):
        for members in by_class.values():
            if position < len(members) and len(picked) < count:
                picked.append(members[position])
        position += 1
    return picked


def sample_grid(folder: str | Path, count: int) -> tuple[str | None, dict[str, int]]:
    """Data URI of an (image | mask | overlay) grid of ``count`` defects of a set, and its class counts."""
    from synth.core.defect_set import read_defect_set

    dataset = read_defect_set(folder)
    defects = dataset.select(anomalous=True)
    counts: dict[str, int] = {}
    for sample in defects:
        counts[sample.defect_class] = counts.get(sample.defect_class, 0) + 1
    picked = _pick_samples(defects, count)
    if not picked:
        return None, counts
    plt = pyplot()
    pairs = (len(picked) + 1) // 2  # two triplets per row keeps the grid compact
    cols = 6 if len(picked) > 1 else 3
    fig, axes = plt.subplots(pairs, cols, figsize=(cols * 1.35, pairs * 1.45), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for index, sample in enumerate(picked):
        image = dataset.load_image(sample)
        mask = dataset.load_mask(sample, image.shape[:2])
        row, col = index // 2, (index % 2) * 3
        cells = (image, mask, overlay_mask(image, mask))
        titles = (f"{sample.defect_class}", "mask", "overlay")
        for offset, (cell, title) in enumerate(zip(cells, titles, strict=True)):
            ax = axes[row, col + offset]
            ax.imshow(cell, cmap="gray" if cell.ndim == 2 else None, vmin=0, vmax=1 if cell.dtype == bool else 255)
            ax.set_title(title[:18], fontsize=7)
    fig.tight_layout(pad=0.3)
    return figure_uri(fig), counts


# --------------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------------

def _summary(result: RunResult) -> str:
    parts = [table(["", ""], [["name", str(result.get("name", ""))], ["data", str(result.get("data", ""))],
                               ["output", str(result.get("out", ""))],
                               ["config file", str(result.get("config_source", ""))],
                               ["top-level seed", str(result.get("seeds", {}).get("seed", ""))]], numeric_from=9)]
    stages = result.get("stages") or {}
    if stages:
        rows = [[name, info.get("status", ""), info.get("hash", "") or "", str(info.get("seed", "") or ""),
                 "" if info.get("elapsed_s") is None else f"{info['elapsed_s']:.1f} s"]
                for name, info in stages.items() if info.get("status") != "not run"]
        parts.append("<h3>Stages</h3>" + table(["stage", "status", "hash", "seed", "time"], rows, numeric_from=9))
        left_out = [name for name, info in stages.items() if info.get("status") == "not run"]
        if left_out:  # named once, not as table rows: a stage this config does not ask for is no failure
            parts.append(note("Stages this config leaves out: " + ", ".join(left_out) + "."))
    lines = []
    filt = result.get("filter")
    if filt:
        lines.append(f"Filter kept {filt.get('kept')} of {filt.get('candidates')} generated defects.")
    clf = result.get("classification")
    if clf and clf.get("methods"):
        chance = 1.0 / max(len(clf.get("classes") or []), 1)
        accs = ", ".join(f"{name} {num(m.get('mean_accuracy'))}" for name, m in clf["methods"].items())
        lines.append(f"Defect classification, mean per-class accuracy on held-out real defects: {accs} "
                     f"(chance {chance:.3f}).")
    few = result.get("fewshot")
    if few and few.get("rows"):
        best: dict[tuple[str, str], dict] = {}
        for row in few["rows"]:
            if row.get("image_auroc") is None:
                continue  # skipped or failed cell
            key = (str(row.get("model")), str(row.get("synthetic")))
            best[key] = row  # rows come in shot order, so the last one is the largest k
        text = "; ".join(f"{m} ({s}) k={r.get('k')}: {num(r.get('image_auroc'))}, FPR {num(r.get('image_fpr'))} "
                         f"/ recall {num(r.get('image_recall'))}" for (m, s), r in best.items())
        lines.append(f"Few-shot detection at the largest k, image AUROC and the decision's false-positive rate / "
                     f"recall at the tool's threshold on the real test split: {text}.")
    real = result.get("realism")
    if real and real.get("sets"):
        text = "; ".join(f"{name}: KID {num(m.get('kid_mean'), 4)}, IC-LPIPS {num(m.get('ic_lpips'))}"
                         for name, m in real["sets"].items() if "kid_mean" in m)
        if text:
            lines.append(f"Realism: {text}.")
    if lines:
        parts.append("<h3>Headline numbers</h3><ul>" + "".join(f"<li>{esc(x)}</li>" for x in lines) + "</ul>")
    return "".join(parts)


def _config(result: RunResult) -> str:
    parts = []
    text = result.get("config_text")
    if text:
        parts.append(f"<h3>Config file ({esc(result.get('config_source', ''))}), exactly as given</h3>"
                     f"<pre>{esc(redact_text(text))}</pre>")
    if result.get("config") is not None:
        parts.append("<h3>Resolved config (after command-line overrides)</h3>"
                     f"<pre>{esc(json.dumps(redact(result['config']), indent=2, sort_keys=True))}</pre>")
    if result.get("sections"):
        parts.append("<h3>Stage settings with defaults filled in</h3>"
                     f"<pre>{esc(json.dumps(redact(result['sections']), indent=2, sort_keys=True))}</pre>")
    seeds = result.get("seeds") or {}
    rows = [["top-level", str(seeds.get("seed", "")), "config"]]
    for stage, info in (seeds.get("stages") or {}).items():
        rows.append([stage, str(info.get("seed")), str(info.get("from", ""))])
    for name in ("classification", "fewshot"):
        inner = (result.get(name) or {}).get("seeds")
        if inner:
            rows.append([f"{name} (inner)", json.dumps(inner, sort_keys=True), "pipeline"])
    parts.append("<h3>Seeds</h3>" + table(["stage", "seed", "source"], rows, numeric_from=9))
    return "".join(parts) or note("no config recorded")


def _samples(result: RunResult) -> str:
    sets = result.get("synthetic_sets") or {}
    if not sets:
        return note("not run: no synthetic set was generated (no 'generate' or 'classification' section).")
    count = int((result.get("report_options") or {}).get("samples", 8))
    parts = []
    for label, folder in sets.items():
        try:
            uri, counts = sample_grid(folder, count)
        except InputError as exc:
            parts.append(f"<h3>{esc(label)}</h3>" + note(f"cannot read the set: {exc}"))
            continue
        summary = ", ".join(f"{c}: {n}" for c, n in sorted(counts.items())) or "no defects"
        parts.append(f"<h3>{esc(label)}</h3><p>{esc(folder)} — {esc(summary)}</p>")
        parts.append(img(uri, f"generated defects of {label}", "image | mask | overlay") if uri
                     else note("the set holds no defect samples"))
    return "".join(parts)


def _shot_label(k: Any) -> str:
    return str(k)


def _fewshot_curves(few: dict[str, Any]) -> str | None:
    rows = few.get("rows") or []
    shots = [_shot_label(k) for k in few.get("shots") or sorted({_shot_label(r.get("k")) for r in rows}, key=str)]
    if not rows or not shots:
        return None
    plt = pyplot()
    metrics = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"),
               ("image_fpr", "false-positive rate at the threshold"), ("image_recall", "recall at the threshold"))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), squeeze=False)
    lines: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        lines.setdefault((str(row.get("model")), str(row.get("synthetic"))), []).append(row)
    # Colour = model, line style = synthetic mode, so a model's three variants read as one family.
    models = list(dict.fromkeys(model for model, _ in lines))
    palette = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    styles = {"none": "-", "threshold": "--", "train": ":"}
    for ax, (metric, title) in zip(axes[0], metrics, strict=True):
        for (model, synthetic), members in lines.items():
            points = sorted(((shots.index(_shot_label(r.get("k"))), r.get(metric)) for r in members
                             if _shot_label(r.get("k")) in shots and r.get(metric) is not None),
                            key=lambda p: p[0])
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], styles.get(synthetic, "-."),
                        color=palette[models.index(model) % len(palette)],
                        marker={"none": "o", "threshold": "s", "train": "^"}.get(synthetic, "x"), markersize=4,
                        label=f"{model} / {synthetic}")
        ax.set_xticks(range(len(shots)))
        ax.set_xticklabels(shots)
        ax.set_xlabel("normal shots k")
        ax.set_title(title)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=8)
        fig.tight_layout(rect=(0, 0, 0.86, 1))
    else:
        fig.tight_layout()
    return figure_uri(fig)


def _fewshot(result: RunResult) -> str:
    few = result.get("fewshot")
    if not few:
        return note("not run (no 'fewshot' section in the config).")
    rows = few.get("rows") or []
    if not rows:
        return note("the few-shot pipeline returned no results.")
    table_rows = [[str(r.get("model")), str(r.get("synthetic")), _shot_label(r.get("k")), r.get("k_images"),
                   r.get("image_auroc"), r.get("pixel_auroc"), r.get("target_fpr"), r.get("image_fpr"),
                   r.get("image_recall"), r.get("oracle_recall"), r.get("estimated_recall"), r.get("image_f1"),
                   r.get("threshold"), r.get("fit_s"), r.get("seed"),
                   str(r.get("skipped") or r.get("error") or ("few normals: extrapolated threshold"
                                                             if r.get("threshold_warning") else ""))]
                  for r in rows]
    # Bold the best image AUROC per (model, k).
    bold = set()
    groups: dict[tuple[str, str], list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault((str(row.get("model")), _shot_label(row.get("k"))), []).append(index)
    for members in groups.values():
        scored = [i for i in members if isinstance(rows[i].get("image_auroc"), (int, float))]
        if len(scored) > 1:
            bold.add((max(scored, key=lambda i: rows[i]["image_auroc"]), 4))
    parts = ["<p>Synthetic: <b>none</b> = normal shots only (the threshold is set for the target false-positive "
             "rate on held-out normal scores); <b>threshold</b> = synthetic anomalies set the decision threshold "
             "(F1-optimal); <b>train</b> = synthetic anomalies also train models that accept labeled "
             "anomalies. <b>none</b> and <b>threshold</b> share one fitted model, so their AUROCs are equal; "
             "their decisions differ. The decision's operating point is measured on the real test split: "
             "<b>FPR</b> = share of good test parts flagged, <b>recall</b> = share of test defects flagged, "
             "<b>ROC recall</b> = the recall any threshold reaches at the target rate (set on the test split "
             "itself: the bound), <b>expected recall</b> = the calibration's own estimate on synthetic anomalies. "
             "Bold: best image AUROC per model and k.</p>",
             table(["model", "synthetic", "k", "normal images", "image AUROC", "pixel AUROC", "target FPR",
                     "FPR at threshold", "recall at threshold", "ROC recall at target", "expected recall",
                     "image F1", "threshold", "fit s", "seed", "note"], table_rows, numeric_from=3, bold=bold)]
    counts = few.get("test_counts") or {}
    if counts:
        good = int(counts.get("good", 0))
        defects = sum(int(n) for c, n in counts.items() if c != "good")
        listing = ", ".join(f"{c} {n}" for c, n in sorted(counts.items()))
        parts.append(f"<p>Test images: {esc(listing)}. For reference, calling every test image defective gives "
                     f"image F1 {num(2 * defects / max(2 * defects + good, 1))}.</p>")
    if few.get("synthetic_set"):
        parts.append(f"<p>Synthetic set: {esc(few['synthetic_set'])}</p>")
    uri = _fewshot_curves(few)
    if uri:
        parts.append(img(uri, "few-shot curves", "image AUROC, pixel AUROC, and false-positive rate and recall "
                                                  "at the threshold, against the number of normal shots"))
    return "".join(parts)


def _parse_roc_key(key: str) -> tuple[str, str, str]:
    parts = key.split("|")
    model = parts[0] if parts else key
    synthetic = parts[1] if len(parts) > 1 else ""
    k = parts[2].removeprefix("k=") if len(parts) > 2 else ""
    return model, synthetic, k


def _roc(result: RunResult) -> str:
    few = result.get("fewshot")
    if not few:
        return note("not run (ROC curves come from the few-shot detection stage).")
    roc = few.get("roc") or {}
    if not roc:
        return note("the few-shot pipeline recorded no ROC curves.")
    parsed = [(_parse_roc_key(k), v) for k, v in roc.items()]
    # "threshold" reuses the model fitted for "none": the same curve, drawn once.
    modes = {(m, k): {s for (m2, s, k2), _ in parsed if (m2, k2) == (m, k)} for (m, _, k), _ in parsed}
    merged = []
    for (model, synthetic, k), points in parsed:
        if synthetic == "threshold" and "none" in modes[(model, k)]:
            continue
        if synthetic == "none" and "threshold" in modes[(model, k)]:
            synthetic = "none = threshold"
        merged.append(((model, synthetic, k), points))
    parsed = merged
    models = list(dict.fromkeys(m for (m, _, _), _ in parsed))
    shots = list(dict.fromkeys(k for (_, _, k), _ in parsed))
    order = [_shot_label(k) for k in few.get("shots") or []]
    shots.sort(key=lambda k: order.index(k) if k in order else len(order))
    plt = pyplot()
    fig, axes = plt.subplots(len(models), len(shots), figsize=(2.6 * len(shots) + 1.5, 2.6 * len(models)),
                             squeeze=False, sharex=True, sharey=True)
    for (model, synthetic, k), points in parsed:
        ax = axes[models.index(model), shots.index(k)]
        ax.plot(points.get("fpr", []), points.get("tpr", []), label=synthetic)
    for r, model in enumerate(models):
        for c, k in enumerate(shots):
            ax = axes[r, c]
            ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
            ax.set_title(f"{model}, k={k}", fontsize=9)
            if r == len(models) - 1:
                ax.set_xlabel("FPR", fontsize=8)
            if c == 0:
                ax.set_ylabel("TPR", fontsize=8)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return ("<p>Image-level ROC curves on the real test split, one panel per model and number of normal shots, "
            "one curve per use of synthetic anomalies.</p>" + img(figure_uri(fig), "ROC curves"))


def _confusion_figure(methods: dict[str, Any], classes: list[str]) -> str | None:
    named = [(n, np.asarray(m.get("confusion"), dtype=float)) for n, m in methods.items() if m.get("confusion")]
    named = [(n, c) for n, c in named if c.ndim == 2 and c.size]
    if not named:
        return None
    plt = pyplot()
    side = max(2.8, 0.45 * len(classes) + 1.6)
    fig, axes = plt.subplots(1, len(named), figsize=(side * len(named), side), squeeze=False)
    for ax, (name, matrix) in zip(axes[0], named, strict=True):
        totals = matrix.sum(axis=1, keepdims=True)
        rates = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, f"{int(value)}", ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.6 else "black")
        labels = classes if len(classes) == matrix.shape[0] else [str(i) for i in range(matrix.shape[0])]
        ax.set_xticks(range(matrix.shape[1]))
        ax.set_xticklabels(labels[:matrix.shape[1]], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(matrix.shape[0]))
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    return figure_uri(fig)


def _classification(result: RunResult) -> str:
    clf = result.get("classification")
    if not clf:
        return note("not run (no 'classification' section in the config).")
    methods = clf.get("methods") or {}
    classes = list(clf.get("classes") or [])
    if not methods:
        return note("the classification pipeline returned no methods.")
    names = list(methods)
    rows: list[list[Any]] = []
    bold = set()
    for defect_class in classes:
        values = [methods[n].get("per_class", {}).get(defect_class) for n in names]
        rows.append([defect_class, *values])
    for label, key in (("mean accuracy", "mean_accuracy"), ("overall accuracy", "overall_accuracy"),
                       ("training images", "n_train")):
        rows.append([label, *[methods[n].get(key) for n in names]])
    for r, row in enumerate(rows[:len(classes) + 2]):
        values = [v for v in row[1:] if isinstance(v, (int, float))]
        if len(values) > 1:
            top = max(values)
            bold |= {(r, c + 1) for c, v in enumerate(row[1:]) if v == top}
    split = clf.get("split") or {}
    split_rows = [[c, len(p.get("generation", [])), len(p.get("test", []))] for c, p in split.items()]
    chance = 1.0 / max(len(classes), 1)
    parts = [f"<p>Per-class accuracy (recall) on the held-out real defects; chance = {chance:.3f}. "
             "Bold: best per row.</p>",
             table(["class", *names], rows, bold=bold)]
    if split_rows:
        parts.append("<h3>Split of the real defects</h3>" + table(["class", "generation", "test"], split_rows))
    uri = _confusion_figure(methods, classes)
    if uri:
        parts.append("<h3>Confusion matrices</h3>" + img(uri, "confusion matrices",
                                                          "rows: true class, columns: predicted class; colour: "
                                                          "row-normalised rate, numbers: counts"))
    return "".join(parts)


def _realism(result: RunResult) -> str:
    real = result.get("realism")
    if not real:
        return note("not run (set 'realism: true' in the config).")
    sets = real.get("sets") or {}
    if not sets:
        return note("no synthetic set to measure.")
    rows = []
    for name, m in sets.items():
        if "kid_mean" not in m:
            rows.append([name, str(m.get("skipped", "skipped")), None, None, None, None, None])
            continue
        rows.append([name, f"{num(m.get('kid_mean'), 4)} ± {num(m.get('kid_std'), 4)}",
                     m.get("ic_lpips"), m.get("ic_lpips_clusters"), m.get("n_real"), m.get("n_generated"),
                     str(m.get("crop_to_mask", ""))])
    options = real.get("options") or {}
    return (f"<p>KID (lower = closer to real) on {esc(options.get('backbone', 'backbone'))} features and "
            f"IC-LPIPS-style diversity (higher = more diverse), against {esc(real.get('reference', 'real defects'))}"
            f". Values are comparable only with numbers from pipelines.realism.</p>"
            + table(["synthetic set", "KID", "IC-LPIPS", "clusters", "real", "generated", "defect crops"], rows))


def _decision(result: RunResult) -> str:
    from pipelines.decision_report import decision_section  # imports this module: loaded on use

    return decision_section(result)


SECTION_BUILDERS = {
    "decision": ("Decision table: what synthetic defects buy", _decision),
    "summary": ("Summary", _summary),
    "config": ("Config and seeds", _config),
    "samples": ("Generated defects", _samples),
    "fewshot": ("Few-shot detection", _fewshot),
    "roc": ("ROC curves", _roc),
    "classification": ("Defect-class classification", _classification),
    "realism": ("Realism", _realism),
}


def render_report(result: RunResult) -> str:
    """The HTML page for a (redacted) result dict; a section that fails to draw shows the error, not a crash."""
    title = (result.get("report_options") or {}).get("title") or f"PixelVision pipeline: {result.get('name', '')}"
    body = []
    sections = [sid for sid in SECTIONS if sid != "decision" or result.get("decision")]
    nav = "".join(f"<a href='#{sid}'>{esc(SECTION_BUILDERS[sid][0])}</a>" for sid in sections)
    for sid in sections:
        heading, build = SECTION_BUILDERS[sid]
        try:
            content = build(result)
        except Exception as exc:  # noqa: BLE001 - a broken plot must not lose the other sections
            logger.warning("report section %s failed: %s", sid, exc)
            content = note(f"could not be drawn: {type(exc).__name__}: {exc}")
        if sid in COLLAPSED:
            content = f"<details><summary>show</summary>{content}</details>"
        body.append(section(sid, heading, content))
    return (f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head>\n<body><header><h1>{esc(title)}</h1>"
            f"<div>{esc(result.get('data', ''))}</div></header>\n<nav>{nav}</nav>\n<main>\n{''.join(body)}</main>"
            f"</body></html>\n")


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN/inf
    return obj


def write_report(result: RunResult, out_dir: Path) -> Path:
    """Write ``report.html`` and ``results.json`` (both redacted) into ``out_dir``; returns the HTML path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    safe = redact(_json_safe(result))
    if isinstance(safe.get("config_text"), str):
        safe["config_text"] = redact_text(safe["config_text"])
    write_json(out_dir / "results.json", safe)
    path = out_dir / "report.html"
    write_text(path, render_report(safe))
    return path
