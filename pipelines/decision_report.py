"""The decision-table section of ``report.html``: the table, metric-vs-k plots per task, exemplar grids.

Kept beside :mod:`pipelines.report` (which owns the page, the escaping and the figure helpers) so the report module
does not grow a second topic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.decision import ARMS
from pipelines.report_html import esc, figure_uri, img, note, num, pyplot, table
from synth.masks import overlay_mask

__all__ = ["PLOTS", "decision_section"]

# (task of the rows, metric, title) of every plot, in the order shown.
PLOTS = (
    ("classification", "mean_accuracy", "classification: balanced accuracy"),
    ("detection", "image_auroc", "detection: image AUROC"),
    ("detection", "image_fpr", "detection: FPR at the threshold"),
    ("detection", "image_recall", "detection: recall at the threshold"),
    ("detection", "pixel_ap", "segmentation: pixel AP"),
    ("detection", "aupro", "segmentation: AUPRO"),
)
_STYLE = {"normals_only": ("k", ":"), "real": ("C0", "-"), "synthetic": ("C1", "--"), "real+synthetic": ("C2", "-"),
          "real+filtered": ("C3", "-"), "real+crop_paste": ("C4", "-."), "generic": ("C7", ":")}


def _cell(row: dict[str, Any] | None, metric: str) -> str:
    if row is None or row.get(metric) is None:
        return "–"
    std = row.get(f"{metric}_std")
    return f"{num(row[metric])} ± {num(std)}" if std is not None else num(row[metric])


def _table_html(summary: dict[str, Any]) -> str:
    rows = summary.get("rows") or []
    shots = summary.get("shots") or []
    index = {(r["task"], r["arm"], r["k"]): r for r in rows}
    header = ["task", "arm", *[f"k = {k}" for k in shots], "KID (k max)", "IC-LPIPS (k max)"]
    body, bold = [], set()
    for task, metric, title in (("classification", "mean_accuracy", "classification (balanced accuracy)"),
                                ("detection", "image_auroc", "detection (image AUROC)"),
                                ("detection", "image_fpr", "FPR at the threshold (target "
                                 f"{(summary.get('config') or {}).get('target_fpr', 0.05):.2f})"),
                                ("detection", "pixel_ap", "segmentation (pixel AP)")):
        arms = [a for a in ARMS if any((task, a, k) in index and index[(task, a, k)].get(metric) is not None
                                       for k in shots)]
        start = len(body)
        for arm in arms:
            last = index.get((task, arm, shots[-1])) if shots else None
            body.append([title if arm == arms[0] else "", arm, *[_cell(index.get((task, arm, k)), metric)
                                                                   for k in shots],
                         _cell(last, "kid_mean") if last and last.get("kid_mean") is not None else "–",
                         _cell(last, "ic_lpips") if last and last.get("ic_lpips") is not None else "–"])
        if metric == "image_fpr":
            continue  # lower is not simply better here: the target is what matters
        for c, k in enumerate(shots):
            values = [(index[(task, a, k)].get(metric), r) for r, a in enumerate(arms, start=start)
                      if (task, a, k) in index and index[(task, a, k)].get(metric) is not None]
            if values:
                top = max(v for v, _ in values)
                bold |= {(r, c + 2) for v, r in values if v == top}
    return table(header, body, numeric_from=2, bold=bold)


def _verdicts_html(summary: dict[str, Any]) -> str:
    items = []
    for v in summary.get("verdicts") or []:
        line = f"{v['task']}, k = {v['k']}: best arm <b>{esc(v['best_arm'])}</b> ({num(v['best'])})"
        if "gain" in v:
            word = ("pays" if v["synthetic_pays"] else "loses" if v["synthetic_loses"] else
                    "makes no difference beyond the seed spread")
            line += (f"; real + synthetic vs real: {v['gain']:+.3f} (seed spread {num(v['spread'])}): synthetic "
                     f"data {word}")
        items.append(f"<li>{line}</li>")
    return f"<ul>{''.join(items)}</ul>" if items else ""


def _plots(summary: dict[str, Any]) -> str | None:
    rows = summary.get("rows") or []
    shots = summary.get("shots") or []
    plots = [p for p in PLOTS if any(r["task"] == p[0] and r.get(p[1]) is not None for r in rows)]
    if not plots or not shots:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(plots), figsize=(3.6 * len(plots), 3.4), squeeze=False)
    for ax, (task, metric, title) in zip(axes[0], plots, strict=True):
        for arm in ARMS:
            points = sorted((r["k"], r[metric], r.get(f"{metric}_std") or 0.0) for r in rows
                            if r["task"] == task and r["arm"] == arm and r.get(metric) is not None)
            if not points:
                continue
            color, style = _STYLE.get(arm, ("C9", "-"))
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], color=color,
                        linestyle=style, marker="o", markersize=3, capsize=3, label=arm)
        ax.set_xscale("log")
        ax.set_xticks(shots)
        ax.set_xticklabels([str(k) for k in shots])
        ax.set_xlabel("known real defects per class (k)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return figure_uri(fig)


def _exemplar_grid(summary: dict[str, Any], per_class: int = 4) -> str | None:
    """Per class: the known real defects of repeat 0 at the largest k beside synthetic defects made from them."""
    from synth.core.defect_set import read_defect_set
    from synth.core.io import list_images, read_image, read_mask

    shots = summary.get("shots") or []
    if not shots:
        return None
    k = shots[-1]
    exemplars = Path((summary.get("exemplars") or {}).get(f"r0/k{k}", ""))
    synthetic_root = exemplars.parent / "synthetic" / "set"
    if not exemplars.is_dir() or not (synthetic_root / "manifest.jsonl").is_file():
        return None
    generated = read_defect_set(synthetic_root)
    classes = summary.get("classes") or []
    plt = pyplot()
    cols = 2 * per_class
    fig, axes = plt.subplots(len(classes), cols, figsize=(cols * 1.2, len(classes) * 1.35), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, defect_class in enumerate(classes):
        images = list_images(exemplars / defect_class / "images" / defect_class, allow_empty=True)[:per_class]
        masks_dir = exemplars / defect_class / "masks" / defect_class
        for c, path in enumerate(images):
            image = read_image(path)
            mask = read_mask(masks_dir / f"{path.stem}.png", shape=image.shape[:2])
            axes[r, c].imshow(overlay_mask(image, mask))
            axes[r, c].set_title(f"real {defect_class}"[:16], fontsize=6)
        made = generated.select(defect_class=defect_class, anomalous=True)[:per_class]
        for c, sample in enumerate(made):
            image = generated.load_image(sample)
            mask = generated.load_mask(sample, image.shape[:2])
            axes[r, per_class + c].imshow(overlay_mask(image, mask))
            axes[r, per_class + c].set_title(f"synthetic {defect_class}"[:16], fontsize=6)
    fig.tight_layout(pad=0.2)
    return figure_uri(fig)


def decision_section(result: dict[str, Any]) -> str:
    """HTML of the decision table section (the first section of the report when the stage ran)."""
    summary = result.get("decision")
    if not summary:
        return note("not run (no 'decision' section in the config).")
    cfg = summary.get("config") or {}
    leak = summary.get("leak_check") or {}
    parts = [
        f"<p>What do synthetic defects buy with k known real defects per class? Every arm trains the same model "
        f"with the same steps; evaluation on held-out real defects and test/good ({leak.get('evaluation_images')} "
        f"images per repeat, never read by generation: {leak.get('shared', 0)} shared files). Mean ± std over "
        f"{summary.get('repeats')} repeats; bold: best arm per column. Classifier: detect.classify "
        f"({esc(cfg.get('classifier'))}); detector-segmenter: {esc(cfg.get('detector'))}; normals only: "
        f"{esc(cfg.get('unsupervised'))}. Run time {summary.get('elapsed_s')} s.</p>",
        _table_html(summary),
        _verdicts_html(summary),
    ]
    uri = _plots(summary)
    if uri:
        parts.append(img(uri, "metric vs k per arm", "mean ± std over repeats; x: k (log scale)"))
    try:
        grid = _exemplar_grid(summary)
    except Exception as exc:  # noqa: BLE001 - a missing work folder must not hide the table
        grid = None
        parts.append(note(f"exemplar grid not drawn: {type(exc).__name__}: {exc}"))
    if grid:
        k = (summary.get("shots") or [0])[-1]
        parts.append("<h3>Known real defects (left) and synthetic defects made from them (right)</h3>"
                     + img(grid, "exemplars and synthetic defects", f"repeat 0, k = {k}; red: mask"))
    return "".join(parts)
