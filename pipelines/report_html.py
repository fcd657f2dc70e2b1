"""The HTML building blocks of the pipeline reports (escaped cells and tables, notes, sections, figures), shared
by :mod:`pipelines.report` and :mod:`pipelines.decision_report`."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from typing import Any


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return esc(value)
    if math.isnan(number):
        return "nan"
    return f"{number:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, numeric_from: int = 1,
           bold: set[tuple[int, int]] | None = None) -> str:
    """An HTML table; cells are escaped, numbers right-aligned (pass pre-formatted strings for text)."""
    bold = bold or set()
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for r, row in enumerate(rows):
        cells = []
        for c, cell in enumerate(row):
            text = num(cell) if c >= numeric_from and not isinstance(cell, str) else esc(cell)
            classes = ["num"] if c >= numeric_from else []
            if (r, c) in bold:
                classes.append("best")
            attr = f" class='{' '.join(classes)}'" if classes else ""
            cells.append(f"<td{attr}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def note(text: str) -> str:
    return f"<p class='note'>{esc(text)}</p>"


def section(section_id: str, title: str, body: str) -> str:
    return f"<section id='{section_id}'><h2>{esc(title)}</h2>\n{body}\n</section>\n"


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------

def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_uri(fig) -> str:
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def img(uri: str, alt: str, caption: str | None = None) -> str:
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f"<figure><img alt='{esc(alt)}' src='{uri}'>{cap}</figure>"
