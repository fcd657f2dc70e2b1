"""A self-contained HTML report of a generated defect set (counts, preview grid, config, skipped files)."""

from __future__ import annotations

import base64
import html
import json
from collections import Counter
from pathlib import Path

from synth.core.defect_set import DefectSet
from synth.core.io import write_text


def defect_set_report(dataset: DefectSet, *, title: str, config: dict | None = None,
                      skipped: list[str] | None = None) -> Path:
    """Write ``report.html`` into the dataset root and return its path."""
    counts = Counter((s.split, s.defect_class) for s in dataset.samples)
    rows = "".join(f"<tr><td>{html.escape(split)}</td><td>{html.escape(cls)}</td><td>{n}</td></tr>"
                   for (split, cls), n in sorted(counts.items()))
    preview = dataset.root / "preview.png"
    image_html = ""
    if preview.exists():
        data = base64.b64encode(preview.read_bytes()).decode("ascii")
        image_html = (f"<h2>Samples (image | mask | overlay)</h2>"
                      f"<img alt='preview grid' src='data:image/png;base64,{data}'>")
    skipped_html = ""
    if skipped:
        items = "".join(f"<li>{html.escape(s)}</li>" for s in skipped)
        skipped_html = f"<h2>Skipped files</h2><ul>{items}</ul>"
    config_html = ""
    if config is not None:
        config_html = f"<h2>Config</h2><pre>{html.escape(json.dumps(config, indent=2, sort_keys=True))}</pre>"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px}}img{{max-width:100%}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>Dataset: {html.escape(str(dataset.root))} — {len(dataset)} samples,
defect classes: {html.escape(', '.join(dataset.defect_classes) or 'none')}</p>
<h2>Counts</h2><table><tr><th>split</th><th>class</th><th>images</th></tr>{rows}</table>
{image_html}{skipped_html}{config_html}
</body></html>
"""
    path = dataset.root / "report.html"
    write_text(path, page)
    return path
