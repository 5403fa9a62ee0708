"""A comparison over seeds: per config, every figure's mean and 95% confidence interval across
its seeds (Student's t), and each run's accuracy with the binomial (Wilson) interval of its
evaluation set, so a reader sees whether two paradigms differ by more than noise."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from cotune.report.metrics import is_number

#: Two-sided 95% Student's t quantiles by degrees of freedom (1..30); above, the normal's.
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042]  # fmt: skip


def t95(dof: int) -> float:
    return _T95[dof - 1] if 1 <= dof <= len(_T95) else 1.960


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """``(mean, half-width of its 95% interval)``; no interval from one value."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, None
    return m, t95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson interval of an accuracy ``p`` measured on ``n`` examples."""
    if n <= 0:
        return (0.0, 1.0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def seed_rows(rows: list[dict[str, Any]], groups: dict[str, list[int]]) -> list[dict[str, Any]]:
    """One row per config: ``<figure>_mean`` and ``<figure>_ci95`` over its seeds' rows."""
    out = []
    for name, idx in groups.items():
        members = [rows[i] for i in idx]
        row: dict[str, Any] = {"name": name, "seeds": len(members),
                               "paradigm": members[0].get("paradigm")}  # fmt: skip
        for key in members[0]:
            vals = [float(m[key]) for m in members if is_number(m.get(key))]
            if key in ("name", "paradigm", "peft_method", "run_dir") or not vals:
                continue
            mean, ci = mean_ci(vals)
            row[f"{key}_mean"], row[f"{key}_ci95"] = mean, ci
        out.append(row)
    return out


def write_seed_summary(
    rows: list[dict[str, Any]], groups: dict[str, list[int]], out: Path
) -> tuple[list[str], list[list[str]]]:
    """seeds.json and seeds.csv in ``out``; returns the headline table (columns, rows)."""
    table = seed_rows(rows, groups)
    (out / "seeds.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    fields = sorted({k for r in table for k in r}, key=lambda k: (k != "name", k))
    with (out / "seeds.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in fields} for r in table)
    heads = ("final_accuracy", "final_perplexity", "sim_time_s", "device_bytes",
             "device_compute_s")  # fmt: skip
    shown = [h for h in heads if any(f"{h}_mean" in r for r in table)]
    cols = ["config", "seeds", *(f"{h} (mean ± 95% CI)" for h in shown)]
    body = []
    for r in table:
        cells = [str(r["name"]), str(r["seeds"])]
        for h in shown:
            m, ci = r.get(f"{h}_mean"), r.get(f"{h}_ci95")
            cells.append("" if m is None else f"{m:.4g}" + (f" ± {ci:.2g}" if ci else ""))
        body.append(cells)
    return cols, body
