"""Cost plots: cost per device, bytes per round (one run) and device cost per run (comparison).

Same rules as plots.py: matplotlib only through ``Figure`` + Agg, imported inside the functions.
Axes carry human units (ms, MB, GFLOP, J) through tick formatters, not a 1e9 offset label.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cotune.report.costs import device_costs, num, round_traffic
from cotune.report.metrics import is_number
from cotune.report.plots import PALETTE, Plot
from cotune.report.units import fmt_bytes, fmt_energy, fmt_flops, fmt_seconds

#: Past this many devices one bar per device is unreadable: draw distributions instead.
MAX_BARS = 40
#: Past this many rounds bars merge into a smear: draw stacked areas instead.
MAX_ROUND_BARS = 60
_HATCH = "///"


def _unit_axis(ax: Any, fmt: Callable[[float], str], axis: str = "y") -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(FuncFormatter(lambda v, _pos: fmt(v) if v >= 0 else ""))
    target.set_minor_formatter(NullFormatter())  # log axes: label decades only


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _profile_colors(devices: dict[str, dict[str, Any]]) -> dict[str, str]:
    profiles = list(dict.fromkeys(str(c.get("profile") or "?") for c in devices.values()))
    return {p: PALETTE[i % len(PALETTE)] for i, p in enumerate(profiles)}


# (title, solid field, hatched field stacked on top or None, formatter)
_PANELS: tuple[tuple[str, str, str | None, Callable[[float], str]], ...] = (
    ("time busy: compute (solid) + communication (hatched)", "compute_s", "comm_s", fmt_seconds),
    ("compute", "flops", None, fmt_flops),
    ("traffic: up (solid) + down (hatched)", "bytes_up", "bytes_down", fmt_bytes),
    ("energy", "energy_j", None, fmt_energy),
)


def plot_device_costs(roles: dict[str, dict[str, Any]], plots_dir: Path) -> Plot | None:
    """Cost per device, coloured by device profile: bars per device up to ``MAX_BARS``
    devices, histograms over devices beyond that. None when there are no device costs."""
    devices = device_costs(roles)
    if not devices:
        return None
    path = plots_dir / "cost_per_device.png"
    if len(devices) > MAX_BARS:
        title = f"cost per device: distribution over {len(devices)} devices"
        return Plot(title, _device_histograms(devices, path, title), wide=True)
    title = f"cost per device ({len(devices)} devices)"
    return Plot(title, _device_bars(devices, path, title), wide=len(devices) > 12)


def _device_bars(devices: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    n = len(devices)
    colors = _profile_colors(devices)
    bar_colors = [colors[str(c.get("profile") or "?")] for c in devices.values()]
    xs = list(range(n))
    fig = Figure(figsize=(max(6.4, 1.5 + 0.2 * n), 8.0), dpi=110, layout="constrained")
    axes = fig.subplots(len(_PANELS), 1, sharex=True)
    for ax, (panel, solid, hatched, fmt) in zip(axes, _PANELS):
        low = [num(c, solid) for c in devices.values()]
        ax.bar(xs, low, color=bar_colors, width=0.8)
        if hatched is not None:
            high = [num(c, hatched) for c in devices.values()]
            ax.bar(xs, high, bottom=low, color=bar_colors, alpha=0.45, hatch=_HATCH, width=0.8,
                   edgecolor="white", linewidth=0)  # fmt: skip
        ax.set_title(panel, fontsize=9, loc="left")
        _unit_axis(ax, fmt)
        ax.tick_params(labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    labels = [r.rpartition("-")[2] for r in devices]
    axes[-1].set_xticks(xs, labels, fontsize=8 if n <= 20 else 6)
    axes[-1].set_xlabel("device")
    handles = [Patch(color=c, label=p) for p, c in colors.items()]
    fig.legend(handles=handles, loc="outside upper right", fontsize=8, frameon=False,
               ncols=min(len(handles), 4), title="profile", title_fontsize=8)  # fmt: skip
    fig.suptitle(title, fontsize=11, x=0.02, ha="left")
    return _save(fig, path)


def _device_histograms(devices: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    colors = _profile_colors(devices)
    fig = Figure(figsize=(9.0, 6.4), dpi=110, layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    panels = (
        ("busy time", lambda c: num(c, "busy_s") or num(c, "compute_s") + num(c, "comm_s"),
         fmt_seconds),
        ("compute", lambda c: num(c, "flops"), fmt_flops),
        ("traffic (up + down)", lambda c: num(c, "bytes_up") + num(c, "bytes_down"), fmt_bytes),
        ("energy", lambda c: num(c, "energy_j"), fmt_energy),
    )  # fmt: skip
    for ax, (panel, value, fmt) in zip(axes, panels):
        per_profile = {p: [value(c) for c in devices.values() if (c.get("profile") or "?") == p]
                       for p in colors}  # fmt: skip
        everything = [v for vs in per_profile.values() for v in vs]
        low, top = min(everything), max(everything)
        # All equal: numpy's default ±0.5 range gives ticks that all format to the same text.
        span = (low * 0.9, top * 1.1 + (top == 0)) if top - low <= 1e-9 * abs(top) else None
        ax.hist(list(per_profile.values()), bins=min(30, max(5, len(everything) // 4)),
                range=span, stacked=True, color=list(colors.values()), label=list(colors),
                edgecolor="white", linewidth=0.4)  # fmt: skip
        med = statistics.median(everything)
        ax.set_title(f"{panel}\nmin {fmt(low)} · median {fmt(med)} · max {fmt(top)}",
                     fontsize=9, loc="left")  # fmt: skip
        _unit_axis(ax, fmt, "x")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))  # unit labels are wide
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.set_ylabel("devices", fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, frameon=False, title="profile", title_fontsize=8)
    fig.suptitle(title, fontsize=11, x=0.02, ha="left")
    return _save(fig, path)


def plot_bytes_per_round(records: list[dict[str, Any]], plots_dir: Path) -> Plot | None:
    """Bytes sent up and down in each round, stacked; None when no round records."""
    from matplotlib.figure import Figure

    traffic = round_traffic(records)
    if not traffic:
        return None
    rounds = [t.round for t in traffic]
    up = [t.bytes_up for t in traffic]
    down = [t.bytes_down for t in traffic]
    fig = Figure(figsize=(6.4, 3.8), dpi=110, layout="constrained")
    ax = fig.subplots()
    if len(traffic) <= MAX_ROUND_BARS:
        ax.bar(rounds, up, color=PALETTE[0], label="up (devices → server)")
        ax.bar(rounds, down, bottom=up, color=PALETTE[3], label="down (server → devices)")
        if len(rounds) <= 20:
            ax.set_xticks(rounds)
    else:
        ax.stackplot(rounds, up, down, colors=[PALETTE[0], PALETTE[3]],
                     labels=["up (devices → server)", "down (server → devices)"])  # fmt: skip
    dropped = sum(t.dropped or 0 for t in traffic)
    note = f", {dropped} dropped report{'s' if dropped != 1 else ''}" if dropped else ""
    ax.set_title(f"bytes per round (total {fmt_bytes(sum(up) + sum(down))}{note})", fontsize=11)
    ax.set_xlabel("round")
    ax.set_ylabel("bytes")
    _unit_axis(ax, fmt_bytes)
    ax.grid(True, axis="y", alpha=0.3)
    # Below the axes: inside, it would sit on the bars, which fill the height.
    fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return Plot("bytes per round", _save(fig, plots_dir / "bytes_per_round.png"))


#: (column of a comparison row, panel title, formatter) for the device-cost comparison.
COMPARE_COSTS = (
    ("device_compute_s", "device compute time (sum)", fmt_seconds),
    ("device_bytes", "device traffic (up + down)", fmt_bytes),
    ("device_energy_j", "device energy (sum)", fmt_energy),
    ("device_peak_memory_bytes", "peak device memory", fmt_bytes),
)


def _wide(values: Sequence[float]) -> bool:
    # Log scale only when bars would otherwise vanish next to the largest one.
    pos = [v for v in values if v > 0]
    return len(pos) >= 2 and max(pos) / min(pos) > 30


def plot_compare_costs(rows: list[tuple[str, dict[str, Any]]], plots_dir: Path) -> Plot | None:
    """One panel per device cost, one bar per run (same colours as the line plots)."""
    from matplotlib.figure import Figure

    panels = [p for p in COMPARE_COSTS if any(is_number(r.get(p[0])) for _, r in rows)]
    if not panels:
        return None
    labels = [lab for lab, _ in rows]
    xs = list(range(len(rows)))
    long = len(rows) > 3 or max(len(lab) for lab in labels) > 10
    ncols = 2 if len(panels) > 2 else len(panels)  # 2x2 stays legible at report width
    nrows = math.ceil(len(panels) / ncols)
    height = 3.2 + (min(1.2, 0.05 * max(len(lab) for lab in labels)) if long else 0)
    fig = Figure(figsize=(3.6 * ncols + 0.4, height * nrows), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax, (key, panel, fmt) in zip(axes, panels):
        vals = [float(r[key]) if is_number(r.get(key)) else math.nan for _, r in rows]
        finite = [0.0 if math.isnan(v) else v for v in vals]
        colors = [PALETTE[i % len(PALETTE)] for i in xs]
        bars = ax.bar(xs, finite, color=colors)
        log = _wide(finite)
        if log:
            ax.set_yscale("log")
        texts = ["n/a" if math.isnan(v) else fmt(v) for v in vals]
        ax.bar_label(bars, texts, fontsize=7, padding=2)
        ax.margins(y=0.25 if not log else 0.0)
        if log:  # headroom for the labels on a log axis
            pos = [v for v in finite if v > 0]
            ax.set_ylim(min(pos) / 3, max(pos) * 8)
        _unit_axis(ax, fmt)
        ax.set_title(panel + (" (log)" if log else ""), fontsize=9)
        ax.set_xticks(xs, labels, fontsize=8, rotation=30 if long else 0,
                      ha="right" if long else "center")  # fmt: skip
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("device cost per run", fontsize=11)
    return Plot("device cost per run", _save(fig, plots_dir / "device_cost.png"), wide=True)
