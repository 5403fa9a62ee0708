"""Reading a run directory and turning its summary into table rows.

A run directory (written by ``run.py``) holds ``config.yaml``, ``metrics.jsonl`` and
``summary.json``; any of them may be missing (a run killed early has no summary), and every
summary field is optional. Missing finals are recovered from the metrics where possible.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cotune.errors import CotuneError, RunDirError
from cotune.report.metrics import is_number, main_series, read_metrics, series_by_role

#: Summary keys in display order; others follow in file order.
SUMMARY_ORDER = (
    "name", "paradigm", "peft_method", "model", "dataset", "task", "devices", "steps",
    "final", "best", "host_time_s", "sim_time_s", "bytes", "trainable_params", "partition",
)  # fmt: skip
#: Columns of the comparison table (compare.json / compare.csv use the same keys).
COMPARE_COLUMNS = (
    "name", "paradigm", "peft_method", "final_accuracy", "final_perplexity", "final_loss",
    "best_accuracy", "host_time_s", "sim_time_s", "bytes_total", "trainable_params",
)  # fmt: skip


@dataclass
class RunData:
    """Everything a report needs from one run directory."""

    run_dir: Path
    name: str
    summary: dict[str, Any] = field(default_factory=dict)
    config_text: str | None = None
    records: list[dict[str, Any]] = field(default_factory=list)


def load_run(run_dir: str | os.PathLike[str]) -> RunData:
    """Read a run directory; ``RunDirError`` if it holds none of the files a run writes."""
    d = Path(run_dir)
    files = [d / n for n in ("metrics.jsonl", "summary.json", "config.yaml")]
    if not d.is_dir() or not any(f.exists() for f in files):
        raise RunDirError(
            f"{d} is not a run directory (expected metrics.jsonl, summary.json or config.yaml)"
        )
    summary: dict[str, Any] = {}
    if files[1].exists():
        try:
            summary = json.loads(files[1].read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise CotuneError(f"{files[1]} is not valid JSON ({e})") from None
        if not isinstance(summary, dict):
            raise CotuneError(f"{files[1]} must hold a JSON object")
    records = read_metrics(files[0]) if files[0].exists() else []
    config = files[2].read_text(encoding="utf-8") if files[2].exists() else None
    return RunData(d, str(summary.get("name") or d.name), summary, config, records)


def final_from_metrics(records: list[dict[str, Any]], event: str, metric: str) -> float | None:
    """The run's last value of ``metric`` (main line: mean/devices/server)."""
    s = main_series(series_by_role(records, event, metric))
    return s[1][-1] if s and s[1] else None


def _get(d: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)  # type: ignore[assignment]
    return d


def compare_row(run: RunData) -> dict[str, Any]:
    """One comparison-table row; summary values first, metrics as the fallback."""
    s, recs = run.summary, run.records
    last_host = max(
        (r["host_time_s"] for r in recs if is_number(r.get("host_time_s"))), default=None
    )
    last_sim = max((r["sim_time_s"] for r in recs if is_number(r.get("sim_time_s"))), default=None)
    bytes_total = _get(s, "bytes", "total")
    if bytes_total is None and is_number(_get(s, "bytes", "up")):
        bytes_total = _get(s, "bytes", "up") + (_get(s, "bytes", "down") or 0)

    def final(metric: str) -> Any:
        v = _get(s, "final", metric)
        return v if v is not None else final_from_metrics(recs, "eval", metric)

    row = {
        "name": run.name,
        "paradigm": s.get("paradigm"),
        "peft_method": s.get("peft_method"),
        "final_accuracy": final("accuracy"),
        "final_perplexity": final("perplexity"),
        "final_loss": final("loss"),
        "best_accuracy": _get(s, "best", "accuracy"),
        "host_time_s": s.get("host_time_s", last_host),
        "sim_time_s": s.get("sim_time_s", last_sim),
        "bytes_total": bytes_total,
        "trainable_params": s.get("trainable_params"),
    }
    return {k: row[k] for k in COMPARE_COLUMNS}


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, Any]]:
    """Flatten the summary into (dotted key, value) rows, one level of nesting deep."""
    keys = [k for k in SUMMARY_ORDER if k in summary] + [
        k for k in summary if k not in SUMMARY_ORDER
    ]
    rows: list[tuple[str, Any]] = []
    for k in keys:
        v = summary[k]
        if isinstance(v, dict) and v:
            rows.extend((f"{k}.{sub}", sv) for sub, sv in v.items())
        else:
            rows.append((k, v))
    return rows


def fmt_value(key: str, v: Any) -> str:
    """Human form of a table value: bytes in KB/MB, seconds, 4 significant digits."""
    if v is None:
        return "—"
    if isinstance(v, bool | str):
        return str(v)
    if is_number(v) and math.isfinite(v):
        last = key.rsplit(".", 1)[-1]
        if "bytes" in key:
            return _human_bytes(float(v))
        if last.endswith("_s"):
            return f"{v:.4g} s" if abs(v) < 1000 else f"{v:,.0f} s"
        if isinstance(v, int):
            return f"{v:,}"
        return f"{v:.4g}"
    if is_number(v):
        return str(v)  # nan / inf
    text = json.dumps(v, separators=(",", ":"), default=str)
    return text if len(text) <= 160 else text[:157] + "..."


def _human_bytes(n: float) -> str:
    if abs(n) < 1000:
        return f"{n:,.0f} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if abs(n) < 1000 or unit == "TB":
            break
    return f"{n:.4g} {unit}"
