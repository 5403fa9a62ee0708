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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cotune.report.conclusions import conclusions
from cotune.report.cost_plots import plot_bytes_per_round, plot_compare_costs, plot_device_costs
from cotune.report.costs import device_costs, device_totals, role_costs
from cotune.report.page import (
    Cell,
    clear_pngs,
    html_list,
    html_page,
    html_plots,
    html_table,
    md_plots,
    md_table,
    rel,
)
from cotune.report.pareto import plot_pareto
from cotune.report.plots import Plot, plot_compare, plot_run
from cotune.report.runs import COMPARE_COLUMNS, RunData, compare_row, load_run, summary_rows
from cotune.report.steps import step_note
from cotune.report.tables import compare_tables

#: Device rows shown in a report's cost table; the rest are in costs.csv.
MAX_TABLE_DEVICES = 20
#: (header, key) of the per-role cost table.
COST_COLUMNS = (
    ("role", "role"), ("profile", "profile"), ("FLOPs", "flops"), ("bytes up", "bytes_up"),
    ("bytes down", "bytes_down"), ("busy", "busy_s"), ("energy", "energy_j"),
    ("memory", "memory_bytes"), ("fits", "memory_fits"),
)  # fmt: skip


def _subtitle(summary: dict[str, Any]) -> str:
    parts = [summary.get(k) for k in ("paradigm", "peft_method", "model", "dataset", "task")]
    return " · ".join(str(p) for p in parts if p)


def _cost_rows(roles: dict[str, dict[str, Any]]) -> tuple[list[list[Cell]], int]:
    """Cost-table rows: the server, the first ``MAX_TABLE_DEVICES`` devices, then the device
    totals; and how many device rows were left out."""
    devices = device_costs(roles)
    shown = [r for r in roles if r not in devices] + list(devices)[:MAX_TABLE_DEVICES]
    rows = [[(k, role if k == "role" else roles[role].get(k), None) for _, k in COST_COLUMNS]
            for role in shown]  # fmt: skip
    hidden = len(devices) - min(len(devices), MAX_TABLE_DEVICES)
    if hidden:
        rows.append([("role", f"… {hidden} more devices", None)]
                    + [(k, None, None) for _, k in COST_COLUMNS[1:]])  # fmt: skip
    if len(devices) > 1:
        tot = {"role": f"all {len(devices)} devices", "profile": "", **device_totals(devices)}
        rows.append([(k, tot.get(k), None) for _, k in COST_COLUMNS])
    return rows, hidden


def _cost_section(run: RunData, roles: dict[str, dict[str, Any]]) -> tuple[str, str] | None:
    """(html, md) of the per-role cost table, or None for a run without cost data."""
    if not roles:
        return None
    rows, hidden = _cost_rows(roles)
    header = [h for h, _ in COST_COLUMNS]
    has_csv = (run.run_dir / "costs.csv").is_file()
    note = (
        "busy: compute + communication time; memory: peak training memory. In the all-devices"
        " row, memory is the largest device's and fits means every device fits"
    )
    if hidden:
        note = f"showing the first {MAX_TABLE_DEVICES} devices; " + note
    link_html = ' Every role: <a href="costs.csv">costs.csv</a>.' if has_csv else ""
    link_md = " Every role: [costs.csv](costs.csv)." if has_csv else ""
    return (
        html_table(header, rows) + f"<p>{html.escape(note)}.{link_html}</p>",
        md_table(header, rows) + f"\n\n{note}.{link_md}",
    )


_HEADLINES = ("eval_accuracy_vs_sim_time.png", "eval_perplexity_vs_sim_time.png")


def _headline_first(plots: list[Plot]) -> list[Plot]:
    # Quality vs simulated time answers "what does this paradigm buy": show it first.
    return sorted(plots, key=lambda p: p.path.name not in _HEADLINES)  # stable sort


def _deployment_table(summary: dict[str, Any] | None) -> tuple[list[str], list[list[Any]]] | None:
    """A deployed run's per-device prediction (simulator) beside its measurement."""
    dep = (summary or {}).get("deployment")
    if not dep:
        return None
    header = ["node", "predicted busy", "measured busy", "measured FLOP/s", "message bytes up",
              "wire bytes up", "message bytes down", "wire bytes down"]  # fmt: skip
    whole = [("role", "whole run", None), ("busy_s", dep.get("predicted_time_s"), None),
             ("busy_s", dep.get("measured_wall_s"), None)] + [("bytes_up", None, None)] * 5  # fmt: skip
    rows: list[list[Any]] = [whole]
    for node, n in dep.get("nodes", {}).items():
        rows.append([
            ("role", node, None), ("busy_s", n.get("predicted_busy_s"), None),
            ("busy_s", n.get("measured_busy_s"), None),
            ("flops", n.get("measured_flops_per_s"), None),
            ("bytes_up", n.get("message_bytes_up"), None), ("bytes_up", n.get("wire_bytes_up"), None),
            ("bytes_down", n.get("message_bytes_down"), None),
            ("bytes_down", n.get("wire_bytes_down"), None),
        ])  # fmt: skip
    return header, rows


def write_run_report(run_dir: str | os.PathLike[str]) -> Path:
    """Render ``plots/*.png``, ``report.html`` and ``report.md`` in ``run_dir``; return the HTML path."""
    run = load_run(run_dir)
    d = run.run_dir
    clear_pngs(d / "plots")
    plots = _headline_first(plot_run(run.records, d / "plots"))
    roles = role_costs(run.summary, d)
    extra = [plot_device_costs(roles, d / "plots"), plot_bytes_per_round(run.records, d / "plots")]
    n_head = sum(1 for p in plots if p.path.name in _HEADLINES)
    plots[n_head:n_head] = [p for p in extra if p is not None]
    rows = [[(label, label, None), (key, v, None)] for label, key, v in summary_rows(run.summary)]
    n_rec = len(run.records)
    table_html = html_table(["field", "value"], rows) if rows else "<p>No summary.json yet.</p>"
    table_md = md_table(["field", "value"], rows) if rows else "No summary.json yet."
    costs = _cost_section(run, roles)
    config = run.config_text if run.config_text is not None else "(no config.yaml)"
    title = f"cotune run: {run.name}"
    deployed = _deployment_table(run.summary)
    sections = [
        ("Summary", table_html + f"<p>{n_rec} metric records.</p>"),
        *([("Cost per role", costs[0])] if costs else []),
        *([("Predicted vs measured (deployed run)", html_table(*deployed))] if deployed else []),
        ("Plots", html_plots(plots, d)),
        ("Config", f"<pre>{html.escape(config)}</pre>"),
    ]
    html_path = d / "report.html"
    html_path.write_text(html_page(title, _subtitle(run.summary), sections), encoding="utf-8")
    md = [
        f"# {title}",
        _subtitle(run.summary),
        "## Summary",
        table_md,
        f"{n_rec} metric records.",
        *(["## Cost per role", costs[1]] if costs else []),
        "## Plots",
        md_plots(plots, d),
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
    run_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    groups: dict[str, list[int]] | None = None,
) -> Path:
    """Plot all runs together and tabulate them in ``out_dir`` (report.html/.md,
    compare.json/.csv, plots/); return the HTML path. ``groups``: config name → the indices of
    its runs over seeds, summarised as mean ± 95% CI (seeds.json/.csv and a table)."""
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

    clear_pngs(out / "plots")
    note = step_note(r["paradigm"] for r in rows)
    plots = plot_compare([(lab, r.records) for r, lab in zip(runs, labels)], out / "plots", note)
    extra = [plot_compare_costs([(r["name"], r) for r in rows], out / "plots"),
             plot_pareto(rows, out / "plots")]  # fmt: skip
    # Right after the headline (quality vs simulated time): what each run cost, and the trade-off.
    plots[min(1, len(plots)) : min(1, len(plots))] = [p for p in extra if p is not None]

    def link(i: int, suffix: str = ".html") -> str | None:
        report = runs[i].run_dir / "report.html"
        return rel(report, out).removesuffix(".html") + suffix if report.exists() else None

    tables = compare_tables(rows, link)
    md_tables = compare_tables(rows, lambda i: link(i, ".md"))
    title = f"cotune comparison: {len(runs)} runs"
    sections = [(t, html_table(cols, body)) for t, cols, body in tables]
    sections.append(("Plots", html_plots(plots, out)))
    md = [f"# {title}"]
    for t, cols, body in md_tables:
        md += [f"## {t}", md_table(cols, body)]
    md += ["## Plots", md_plots(plots, out)]
    said = conclusions(rows)
    if said:  # the answer first: who is best at what, and whether it is more than noise
        sections.insert(0, ("Conclusions", html_list(said)))
        md[1:1] = ["## Conclusions", "\n".join(f"- {line}" for line in said)]
    if groups and any(len(v) > 1 for v in groups.values()):
        from cotune.report.seeds import write_seed_summary

        scols, sbody = write_seed_summary(rows, groups, out)
        srows = [[(c, v, None) for c, v in zip(scols, r)] for r in sbody]
        sections.insert(0, ("Over seeds (mean ± 95% CI)", html_table(scols, srows)))
        md[1:1] = ["## Over seeds (mean ± 95% CI)", md_table(scols, srows)]
    html_path = out / "report.html"
    html_path.write_text(html_page(title, ", ".join(labels), sections), encoding="utf-8")
    (out / "report.md").write_text("\n\n".join(md) + "\n", encoding="utf-8")
    return html_path
