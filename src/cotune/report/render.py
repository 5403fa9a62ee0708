"""report.html and report.md for one run or a comparison of runs.

The HTML is self-contained apart from the PNGs, which it references relatively
(``plots/<name>.png``), so a run directory can be copied or zipped as a whole. The Markdown
file carries the same content. Output is deterministic (no timestamps) so re-rendering an
unchanged run gives identical files.
"""

from __future__ import annotations

import csv
import html
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cotune import __version__
from cotune.report.plots import Plot, plot_compare, plot_run
from cotune.report.runs import (
    COMPARE_COLUMNS,
    RunData,
    compare_row,
    fmt_value,
    load_run,
    summary_rows,
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.1em}.sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:1em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:.3em .7em;text-align:left}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.plots{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0;border:1px solid #eee;padding:.4em}figure img{max-width:520px;width:100%}
figcaption{font-size:.85em;color:#555;text-align:center}
pre{background:#f7f7f7;border:1px solid #e3e3e3;padding:1em;overflow:auto;font-size:.85em}
footer{color:#999;font-size:.8em;margin-top:2em}
"""


def _clear_pngs(plots_dir: Path) -> None:
    # A re-render may draw fewer plots (fields gone); stale PNGs would be misleading.
    if plots_dir.is_dir():
        for p in plots_dir.glob("*.png"):
            p.unlink()


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _html_table(
    header: Sequence[str], rows: Iterable[Sequence[tuple[str, Any, str | None]]]
) -> str:
    """rows: cells of (key, value, optional link)."""
    out = ["<table><thead><tr>"]
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
    out.append("</tbody></table>")
    return "".join(out)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[tuple[str, Any, str | None]]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = []
        for key, v, link in row:
            text = _md_cell(fmt_value(key, v))
            cells.append(f"[{text}]({link})" if link else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _html_page(title: str, subtitle: str, sections: list[tuple[str, str]]) -> str:
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{content}\n" for h, content in sections)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        f'<h1>{html.escape(title)}</h1><p class="sub">{html.escape(subtitle)}</p>\n{body}'
        f"<footer>rendered by cotune {html.escape(__version__)}</footer></body></html>\n"
    )


def _html_plots(plots: list[Plot], base: Path) -> str:
    if not plots:
        return "<p>No metrics to plot.</p>"
    figs = [
        f'<figure><img src="{html.escape(_rel(p.path, base))}" alt="{html.escape(p.title)}">'
        f"<figcaption>{html.escape(p.title)}</figcaption></figure>"
        for p in plots
    ]
    return '<div class="plots">' + "".join(figs) + "</div>"


def _md_plots(plots: list[Plot], base: Path) -> str:
    if not plots:
        return "No metrics to plot."
    return "\n\n".join(f"![{p.title}]({_rel(p.path, base)})" for p in plots)


def _subtitle(summary: dict[str, Any]) -> str:
    parts = [summary.get(k) for k in ("paradigm", "peft_method", "model", "dataset", "task")]
    return " · ".join(str(p) for p in parts if p)


def write_run_report(run_dir: str | os.PathLike[str]) -> Path:
    """Render ``plots/*.png``, ``report.html`` and ``report.md`` in ``run_dir``; return the HTML path."""
    run = load_run(run_dir)
    d = run.run_dir
    _clear_pngs(d / "plots")
    plots = plot_run(run.records, d / "plots")
    rows = [[(k, k, None), (k, v, None)] for k, v in summary_rows(run.summary)]
    n_rec = len(run.records)
    table_html = _html_table(["field", "value"], rows) if rows else "<p>No summary.json yet.</p>"
    table_md = _md_table(["field", "value"], rows) if rows else "No summary.json yet."
    config = run.config_text if run.config_text is not None else "(no config.yaml)"
    title = f"cotune run: {run.name}"
    sections = [
        ("Summary", table_html + f"<p>{n_rec} metric records.</p>"),
        ("Plots", _html_plots(plots, d)),
        ("Config", f"<pre>{html.escape(config)}</pre>"),
    ]
    html_path = d / "report.html"
    html_path.write_text(_html_page(title, _subtitle(run.summary), sections), encoding="utf-8")
    md = [
        f"# {title}",
        _subtitle(run.summary),
        "## Summary",
        table_md,
        f"{n_rec} metric records.",
        "## Plots",
        _md_plots(plots, d),
        "## Config",
        f"```yaml\n{config.rstrip()}\n```",
    ]
    (d / "report.md").write_text("\n\n".join(s for s in md if s) + "\n", encoding="utf-8")
    return html_path


def _labels(runs: list[RunData]) -> list[str]:
    """Run names, disambiguated when two runs share one: by directory name, then by the last
    two path parts, then by position."""
    labels = [r.name for r in runs]
    for depth in (1, 2):
        dup = {lab for lab in labels if labels.count(lab) > 1}
        tails = ["/".join(r.run_dir.resolve().parts[-depth:]) for r in runs]
        labels = [
            f"{r.name} ({tail})" if lab in dup else lab for lab, r, tail in zip(labels, runs, tails)
        ]
    dup = {lab for lab in labels if labels.count(lab) > 1}
    return [f"{lab} #{i + 1}" if lab in dup else lab for i, lab in enumerate(labels)]


def write_compare_report(
    run_dirs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str]
) -> Path:
    """Plot all runs together and tabulate them in ``out_dir`` (report.html/.md,
    compare.json/.csv, plots/); return the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(d) for d in run_dirs]
    labels = _labels(runs)
    rows = []
    for run, label in zip(runs, labels):
        row = compare_row(run)
        row["name"] = label
        row["run_dir"] = str(run.run_dir)
        rows.append(row)
    (out / "compare.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    with (out / "compare.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*COMPARE_COLUMNS, "run_dir"])
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)

    _clear_pngs(out / "plots")
    plots = plot_compare([(lab, r.records) for r, lab in zip(runs, labels)], out / "plots")
    # Show only columns some run has a value for; the CSV/JSON keep them all.
    cols = [c for c in COMPARE_COLUMNS if c == "name" or any(r[c] is not None for r in rows)]

    def cells(row: dict[str, Any], run: RunData) -> list[tuple[str, Any, str | None]]:
        report = run.run_dir / "report.html"
        link = _rel(report, out) if report.exists() else None
        return [(c, row[c], link if c == "name" else None) for c in cols]

    table_rows = [cells(row, run) for row, run in zip(rows, runs)]
    md_rows = [
        [(k, v, (link.removesuffix(".html") + ".md") if link else None) for k, v, link in r]
        for r in table_rows
    ]
    title = f"cotune comparison: {len(runs)} runs"
    sections = [
        ("Runs", _html_table(cols, table_rows)),
        ("Plots", _html_plots(plots, out)),
    ]
    html_path = out / "report.html"
    html_path.write_text(_html_page(title, ", ".join(labels), sections), encoding="utf-8")
    md = [f"# {title}", "## Runs", _md_table(cols, md_rows), "## Plots", _md_plots(plots, out)]
    (out / "report.md").write_text("\n\n".join(md) + "\n", encoding="utf-8")
    return html_path
