"""Accuracy against cost: one panel per device cost (compute time, bytes, energy), one point
per run, the Pareto front drawn through the runs no other run beats on both.

Same rules as plots.py: matplotlib only through ``Figure`` + Agg, imported inside the function.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cotune.report.cost_plots import _save
from cotune.report.metrics import is_number
from cotune.report.plots import PALETTE, Plot
from cotune.report.runs import SHIPS_RAW_DATA
from cotune.report.units import fmt_bytes, fmt_energy, fmt_seconds

#: (comparison-row key of a cost, panel title, formatter).
COSTS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("device_compute_s", "device compute (sum)", fmt_seconds),
    ("device_bytes", "device traffic", fmt_bytes),
    ("device_energy_j", "device energy", fmt_energy),
)


def quality_key(rows: list[dict[str, Any]]) -> tuple[str, bool] | None:
    """(row key, higher is better) of the quality to plot: accuracy where two runs have it,
    else perplexity."""
    for key, higher in (("final_accuracy", True), ("final_perplexity", False)):
        if sum(is_number(r.get(key)) for r in rows) >= 2:
            return key, higher
    return None


def pareto_front(points: list[tuple[float, float]], higher: bool = True) -> list[int]:
    """Indices of the points (cost, quality) that no other point matches or beats on both with
    one strictly better, by increasing cost."""
    sign = 1.0 if higher else -1.0
    front = []
    for i, (c, q) in enumerate(points):
        beaten = any(
            c2 <= c and sign * q2 >= sign * q and (c2 < c or sign * q2 > sign * q)
            for j, (c2, q2) in enumerate(points)
            if j != i
        )
        if not beaten:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -sign * points[i][1]))


def front_names(rows: list[dict[str, Any]], cost: str) -> list[str]:
    """Names of the runs on the quality-vs-``cost`` front (empty when under two runs have both)."""
    qk = quality_key(rows)
    if qk is None:
        return []
    have = [r for r in rows if is_number(r.get(cost)) and is_number(r.get(qk[0]))]
    if len(have) < 2:
        return []
    pts = [(float(r[cost]), float(r[qk[0]])) for r in have]
    return [have[i]["name"] for i in pareto_front(pts, qk[1])]


def plot_pareto(rows: list[dict[str, Any]], plots_dir: Path) -> Plot | None:
    """The accuracy-vs-cost view of a comparison; None when fewer than two runs have a quality
    and a device cost."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    qk = quality_key(rows)
    if qk is None:
        return None
    quality, higher = qk
    panels = [
        p
        for p in COSTS
        if sum(is_number(r.get(p[0])) and is_number(r.get(quality)) for r in rows) >= 2
    ]
    if not panels:
        return None
    fig = Figure(figsize=(3.7 * len(panels) + 0.4, 3.9), dpi=110, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    for ax, (key, title, fmt) in zip(axes, panels):
        idx = [i for i, r in enumerate(rows) if is_number(r.get(key)) and is_number(r.get(quality))]
        pts = [(float(rows[i][key]), float(rows[i][quality])) for i in idx]
        # Runs of (nearly) equal quality sit side by side: their names alternate above/below.
        by_quality = sorted(range(len(pts)), key=lambda k: (pts[k][1], pts[k][0]))
        below = {k for n, k in enumerate(by_quality) if n % 2}
        for k, (i, (c, q)) in enumerate(zip(idx, pts)):
            raw = rows[i].get("paradigm") in SHIPS_RAW_DATA
            color = PALETTE[i % len(PALETTE)]
            ax.plot([c], [q], marker="o", markersize=8, linestyle="none", color=color,
                    markerfacecolor="white" if raw else color, markeredgewidth=1.8)  # fmt: skip
            ax.annotate(str(rows[i]["name"]) + (" (raw data)" if raw else ""), (c, q),
                        xytext=(5, -11 if k in below else 4), textcoords="offset points",
                        fontsize=7)  # fmt: skip
        front = [pts[k] for k in pareto_front(pts, higher)]
        if len(front) > 1:
            ax.plot([c for c, _ in front], [q for _, q in front], color="#888888",
                    linestyle="--", linewidth=1, drawstyle="steps-post", zorder=0)  # fmt: skip
        pos = [c for c, _ in pts if c > 0]
        if len(pos) >= 2 and max(pos) / min(pos) > 30:
            # A run that costs the devices nothing (central) must stay on the axis: symlog.
            if len(pos) < len(pts):
                # linthresh on a decade, so the ticks 0 and the first decade sit apart.
                ax.set_xscale("symlog", linthresh=10 ** math.floor(math.log10(min(pos))))
            else:
                ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p, f=fmt: f(v) if v >= 0 else ""))
        ax.margins(x=0.15, y=0.15)
        ax.set_xlabel(title + " (less is better)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    metric = quality.removeprefix("final_")
    axes[0].set_ylabel(f"{metric} ({'higher' if higher else 'lower'} is better)", fontsize=8)
    qs = [float(r[quality]) for r in rows if is_number(r.get(quality))]
    if not higher and min(qs) > 0 and max(qs) / min(qs) > 20:  # perplexities far apart
        for ax in axes:
            ax.set_yscale("log")
    fig.suptitle(f"{metric} against device cost", fontsize=11)
    note = (
        "Dashed: the Pareto front (no other run is both cheaper and better). Hollow: ships raw"
        " data off the devices, a reference rather than an option."
    )
    title = f"{metric} vs device cost (Pareto view)"
    return Plot(title, _save(fig, plots_dir / "pareto.png"), wide=True, note=note)


__all__ = ["COSTS", "front_names", "pareto_front", "plot_pareto", "quality_key"]
