"""HTML and Markdown building blocks shared by the run and comparison reports."""

from __future__ import annotations

import html
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cotune import __version__
from cotune.report.plots import Plot
from cotune.report.units import fmt_value

#: One table cell: (key that picks the unit, value, optional link).
Cell = tuple[str, Any, str | None]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.1em}.sub{color:#666;margin-top:0}
.scroll{overflow:auto;max-height:40em;margin:1em 0}
table{border-collapse:collapse;font-size:.92em}
th,td{border:1px solid #ddd;padding:.3em .7em;text-align:left}
th{background:#f4f4f4;position:sticky;top:0;vertical-align:bottom}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.plots{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0;border:1px solid #eee;padding:.4em}figure img{max-width:520px;width:100%}
figure.wide img{max-width:1000px}
figcaption{font-size:.85em;color:#555;text-align:center;max-width:520px}
figure.wide figcaption{max-width:1000px}.note{color:#a05a00}
pre{background:#f7f7f7;border:1px solid #e3e3e3;padding:1em;overflow:auto;font-size:.85em}
footer{color:#999;font-size:.8em;margin-top:2em}
"""


def clear_pngs(plots_dir: Path) -> None:
    # A re-render may draw fewer plots (fields gone); stale PNGs would be misleading.
    if plots_dir.is_dir():
        for p in plots_dir.glob("*.png"):
            p.unlink()


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def html_list(items: Sequence[str]) -> str:
    return "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>"


def html_table(header: Sequence[str], rows: Iterable[Sequence[Cell]]) -> str:
    """rows: cells of (key, value, optional link). Wrapped in a box that scrolls, so a wide or
    long table never widens the page (the header row stays in view)."""
    out = ['<div class="scroll"><table><thead><tr>']
    out += [f"<th>{html.escape(h)}</th>" for h in header]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>")
        for key, v, link in row:
            text = html.escape(fmt_value(key, v))
            if link:
                text = f'<a href="{html.escape(link)}">{text}</a>'
            cls = ' class="num"' if _is_num(v) else ""
            out.append(f"<td{cls}>{text}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Iterable[Sequence[Cell]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = []
        for key, v, link in row:
            text = _md_cell(fmt_value(key, v))
            cells.append(f"[{text}]({link})" if link else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def html_page(title: str, subtitle: str, sections: list[tuple[str, str]]) -> str:
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{content}\n" for h, content in sections)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
        f'<h1>{html.escape(title)}</h1><p class="sub">{html.escape(subtitle)}</p>\n{body}'
        f"<footer>rendered by cotune {html.escape(__version__)}</footer></body></html>\n"
    )


def html_plots(plots: list[Plot], base: Path) -> str:
    if not plots:
        return "<p>No metrics to plot.</p>"
    figs = [
        ('<figure class="wide">' if p.wide else "<figure>")
        + f'<img src="{html.escape(rel(p.path, base))}" alt="{html.escape(p.title)}">'
        + f"<figcaption>{html.escape(p.title)}"
        + (f'<br><span class="note">{html.escape(p.note)}</span>' if p.note else "")
        + "</figcaption></figure>"
        for p in plots
    ]
    return '<div class="plots">' + "".join(figs) + "</div>"


def md_plots(plots: list[Plot], base: Path) -> str:
    if not plots:
        return "No metrics to plot."
    return "\n\n".join(
        f"![{p.title}]({rel(p.path, base)})" + (f"\n\n*{p.note}*" if p.note else "") for p in plots
    )
