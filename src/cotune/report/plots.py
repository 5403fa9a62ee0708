"""PNG plots for one run and for a comparison of runs.

matplotlib is imported inside the functions (``cotune --help`` stays fast) and only through
``Figure`` + the Agg canvas, so no GUI backend or global pyplot state is touched.
Every plot is made from whatever fields the records have; missing fields just mean fewer plots.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotune.report.metrics import (
    Series,
    is_device,
    main_series,
    mean_series,
    numeric_fields,
    series_by_role,
)
from cotune.report.units import fmt_seconds

#: Fields used as x axes or bookkeeping, never plotted as a metric of their own.
AXIS_FIELDS = ("step", "round", "epoch", "host_time_s", "sim_time_s", "examples")
#: (event, field) pairs drawn by a dedicated plot instead (cost_plots.plot_bytes_per_round).
DEDICATED = {("round", "bytes_up"), ("round", "bytes_down")}
#: The order metrics appear in; anything else follows alphabetically.
METRIC_ORDER = ("loss", "accuracy", "exact_match", "perplexity", "lr")
EVENT_ORDER = ("train", "eval", "round")
X_LABELS = {"step": "step", "sim_time_s": "simulated time (s)", "host_time_s": "host time (s)"}
_TIME_LABELS = (X_LABELS["sim_time_s"], X_LABELS["host_time_s"])
X_TITLES = {"step": "step", "sim_time_s": "simulated time", "host_time_s": "host time"}
PALETTE = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
    "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22",
]  # fmt: skip


@dataclass(frozen=True)
class Plot:
    """A written PNG and the caption the reports show with it."""

    title: str
    path: Path
    #: Multi-panel figures: shown at full page width rather than in the grid of small plots.
    wide: bool = False
    #: A caveat the reader needs (shown under the caption), e.g. what the x axis means.
    note: str = ""


@dataclass
class _Line:
    label: str | None
    series: Series
    color: str
    thin: bool = False
    #: Its points span a sliver of the x axis (central on simulated time): drawn as a marker
    #: at its last point and a dotted level across the axis, so it does not vanish.
    flat: bool = False


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "metric"


def _log_scale(metric: str, lines: list[_Line]) -> bool:
    # Perplexity starts near the vocabulary size and ends near 1-10: linear hides the end.
    ys = [y for ln in lines for y in ln.series[1] if not math.isnan(y)]
    return metric == "perplexity" and bool(ys) and min(ys) > 0 and max(ys) / min(ys) > 20


def stage_marks(records: list[dict[str, Any]], x: str) -> list[tuple[float, str]]:
    """(x where a training stage starts, stage name) for staged runs (`peft.stages`), the first
    stage excepted: the report draws each as a labelled vertical line."""
    marks: list[tuple[float, str]] = []
    current = None
    for r in records:
        stage = r.get("stage")
        if stage is None or stage == current or not isinstance(r.get(x), int | float):
            continue
        if current is not None:
            marks.append((float(r[x]), str(stage)))
        current = stage
    return marks


def _draw(
    path: Path,
    title: str,
    xlabel: str,
    metric: str,
    lines: list[_Line],
    marks: list[tuple[float, str]] = (),  # type: ignore[assignment]
) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.8), dpi=110, layout="constrained")
    ax = fig.subplots()
    for at, name in marks:
        ax.axvline(at, color="#999999", linestyle="--", linewidth=0.9)
        ax.annotate(name, (at, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -10),
                    textcoords="offset points", fontsize=8, color="#666666")  # fmt: skip
    for ln in lines:
        xs, ys = ln.series
        if ln.flat:
            ax.axhline(ys[-1], color=ln.color, linestyle=":", linewidth=1.4)
            at = fmt_seconds(xs[-1]) if xlabel in _TIME_LABELS else f"{xs[-1]:g}"
            ax.plot([xs[-1]], [ys[-1]], color=ln.color, marker="D", markersize=7,
                    linestyle="none", label=f"{ln.label} (all at ≤ {at})")  # fmt: skip
            continue
        style = {"linewidth": 0.8, "alpha": 0.35} if ln.thin else {"linewidth": 1.8}
        marker = "o" if len(xs) <= 25 and not ln.thin else None
        ax.plot(xs, ys, color=ln.color, label=ln.label, marker=marker, markersize=3, **style)
    if _log_scale(metric, lines):
        ax.set_yscale("log")
    if xlabel in _TIME_LABELS:
        # Seconds as ms/s/min/h: a long simulated run would otherwise read "2e4" with an offset.
        from matplotlib.ticker import FuncFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: fmt_seconds(v) if v >= 0 else ""))
        xlabel = xlabel.removesuffix(" (s)")
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    if any(ln.label for ln in lines):
        ax.legend(fontsize=8, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _metric_key(m: str) -> tuple[int, str]:
    return (METRIC_ORDER.index(m) if m in METRIC_ORDER else len(METRIC_ORDER), m)


def _event_key(e: str) -> tuple[int, str]:
    return (EVENT_ORDER.index(e) if e in EVENT_ORDER else len(EVENT_ORDER), e)


def _run_lines(by_role: dict[str, Series]) -> list[_Line]:
    """Thin lines per device plus their mean; other roles (server, mean) as full lines."""
    devices = {r: s for r, s in by_role.items() if is_device(r)}
    others = {r: s for r, s in by_role.items() if not is_device(r)}
    lines: list[_Line] = []
    few = len(devices) <= 8
    for i, (role, s) in enumerate(devices.items()):
        label = role if few else (f"devices ({len(devices)})" if i == 0 else None)
        lines.append(_Line(label, s, PALETTE[i % len(PALETTE)] if few else "#7f7f7f", True))
    if devices and "mean" not in others:
        lines.append(_Line("device mean", mean_series(list(devices.values())), "black"))
    for j, (role, s) in enumerate(others.items()):
        color = "black" if role == "mean" else PALETTE[(j + 1) % len(PALETTE)]
        label = role if (devices or len(others) > 1) else None
        lines.append(_Line(label, s, color))
    return lines


def plot_run(records: list[dict[str, Any]], plots_dir: Path) -> list[Plot]:
    """One PNG per (event, metric) vs step, plus eval metrics vs simulated time when logged."""
    plots: list[Plot] = []
    events = sorted({str(r.get("event")) for r in records if "event" in r}, key=_event_key)
    for event in events:
        recs = [r for r in records if r.get("event") == event]
        metrics = sorted(
            (
                m
                for m in numeric_fields(recs)
                if m not in AXIS_FIELDS and (event, m) not in DEDICATED
            ),
            key=_metric_key,
        )
        for metric in metrics:
            # The headline "quality vs simulated time" plots; other fields only vs step.
            quality = event == "eval" and metric in (
                "loss",
                "accuracy",
                "exact_match",
                "perplexity",
            )
            axes = ["step", "sim_time_s"] if quality else ["step"]
            for x in axes:
                by_role = series_by_role(recs, event, metric, x)
                if not by_role or all_zero(by_role.values()):
                    continue  # e.g. "round dropped" in a run where nothing dropped
                suffix = "" if x == "step" else f"_vs_{x.removesuffix('_s')}"
                title = f"{event} {metric}" + ("" if x == "step" else f" vs {X_TITLES[x]}")
                path = plots_dir / f"{_slug(event)}_{_slug(metric)}{suffix}.png"
                marks = stage_marks(records, x)
                _draw(path, title, X_LABELS[x], metric, _run_lines(by_role), marks)
                plots.append(Plot(title, path))
    return plots


#: What a comparison plots: (event, metric, x axes), in display order. Quality vs simulated
#: time comes first: it is the comparison across paradigms that host time cannot give.
COMPARE_METRICS = (
    ("eval", "accuracy", ("sim_time_s", "step", "host_time_s")),
    ("eval", "exact_match", ("sim_time_s", "step", "host_time_s")),
    ("eval", "perplexity", ("sim_time_s", "step", "host_time_s")),
    ("eval", "loss", ("sim_time_s", "step", "host_time_s")),
    ("train", "loss", ("step",)),
)


def all_zero(series: Iterable[Series]) -> bool:
    """Every value is 0: a plot of it says nothing a sentence could not."""
    return all(y == 0 for _, ys in series for y in ys)


#: A line whose x span is below this fraction of the axis's is drawn flat (see ``_Line.flat``).
FLAT_FRACTION = 0.02


def _mark_flat(lines: list[_Line]) -> None:
    lows = [ln.series[0][0] for ln in lines if ln.series[0]]
    highs = [ln.series[0][-1] for ln in lines if ln.series[0]]
    span = max(highs, default=0.0) - min(lows, default=0.0)
    if span <= 0 or len(lines) < 2:
        return
    for ln in lines:
        xs = ln.series[0]
        ln.flat = bool(xs) and xs[-1] <= FLAT_FRACTION * max(highs)


def plot_compare(
    runs: list[tuple[str, list[dict[str, Any]]]], plots_dir: Path, step_note: str = ""
) -> list[Plot]:
    """All runs on one plot per metric and x axis; each run drawn as its main line.
    ``step_note``: what "step" means in each run, shown under the step-axis plots when the
    runs' steps are not the same unit of work."""
    plots: list[Plot] = []
    for event, metric, xs in COMPARE_METRICS:
        for x in xs:
            lines = []
            for i, (label, records) in enumerate(runs):
                s = main_series(series_by_role(records, event, metric, x))
                if s is not None:
                    lines.append(_Line(label, s, PALETTE[i % len(PALETTE)]))
            if not lines or all_zero(ln.series for ln in lines):
                continue
            if x != "step":
                _mark_flat(lines)
            title = f"{event} {metric} vs {X_TITLES[x]}"
            suffix = "" if x == "step" else f"_vs_{x.removesuffix('_s')}"
            path = plots_dir / f"{event}_{metric}{suffix}.png"
            note = step_note if x == "step" else ""
            plots.append(Plot(title, _draw(path, title, X_LABELS[x], metric, lines), note=note))
    return plots
