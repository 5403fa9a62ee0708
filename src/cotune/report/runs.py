"""Reading a run directory and turning its summary into table rows.

A run directory (written by ``run.py``) holds ``config.yaml``, ``metrics.jsonl`` and
``summary.json``; any of them may be missing (a run killed early has no summary), and every
summary field is optional. Missing finals are recovered from the metrics where possible.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cotune.errors import CotuneError, RunDirError
from cotune.report.costs import device_costs, device_totals, role_costs
from cotune.report.metrics import is_number, main_series, read_metrics, series_by_role
from cotune.report.units import fmt_value

__all__ = [
    "COMPARE_COLUMNS",
    "SHIPS_RAW_DATA",
    "RunData",
    "compare_row",
    "fmt_value",
    "load_run",
    "summary_rows",
]

#: Summary keys in display order; others follow in file order.
SUMMARY_ORDER = (
    "name", "paradigm", "peft_method", "model", "dataset", "task", "devices", "steps",
    "final", "best", "host_time_s", "sim_time_s", "target_accuracy", "time_to_target", "bytes",
    "costs", "trainable_params", "partition",
)  # fmt: skip
#: Columns of the comparison table (compare.json / compare.csv use the same keys).
COMPARE_COLUMNS = (
    "name", "paradigm", "peft_method", "final_accuracy", "final_exact_match", "final_perplexity",
    "final_loss",
    "best_accuracy", "host_time_s", "sim_time_s", "time_to_target_sim_s", "time_to_target_step",
    "device_compute_s", "device_flops", "device_bytes", "device_energy_j",
    "device_peak_memory_bytes", "trainable_params", "eval_examples", "accuracy_ci95",
    "devices", "device_accuracy_min", "device_accuracy_mean", "device_accuracy_max",
    "server_compute_s", "server_flops", "server_energy_j", "raw_data_off_devices",
)  # fmt: skip
#: Paradigms whose devices hand their raw examples to the server: a reference point for the
#: others, not a deployable option where the data must stay on the devices.
SHIPS_RAW_DATA = frozenset({"central"})


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


def _device_summary(run: RunData) -> dict[str, Any]:
    """Device totals: the summary's ``costs.devices`` where present, else summed from the
    per-role costs (summary or costs.csv), else the old ``bytes`` block for traffic."""
    s = run.summary
    devs = device_costs(role_costs(s, run.run_dir))
    tot = device_totals(devs) if devs else {}
    given = _get(s, "costs", "devices") or {}
    out = {
        "compute_s": tot.get("compute_s"),
        "flops": given.get("flops", tot.get("flops")),
        "energy_j": given.get("energy_j", tot.get("energy_j")),
        "peak_memory_bytes": _get(s, "costs", "device_peak_memory_bytes")
        or tot.get("memory_bytes"),
        "bytes": None,
    }
    if is_number(given.get("bytes_up")) or is_number(given.get("bytes_down")):
        out["bytes"] = (given.get("bytes_up") or 0) + (given.get("bytes_down") or 0)
    elif tot:
        out["bytes"] = tot["bytes_up"] + tot["bytes_down"]
    elif _get(s, "bytes", "total") is not None:
        out["bytes"] = _get(s, "bytes", "total")
    elif is_number(_get(s, "bytes", "up")):
        out["bytes"] = _get(s, "bytes", "up") + (_get(s, "bytes", "down") or 0)
    return out


def _per_device_accuracy(summary: dict[str, Any]) -> dict[str, Any]:
    """min/mean/max of the devices' own final accuracies, for paradigms where every device
    ends with its own adapter (``per_device_eval`` in the summary: local, dlora)."""
    spread = summary.get("per_device_accuracy")
    if isinstance(spread, dict) and all(is_number(spread.get(k)) for k in ("min", "mean", "max")):
        return {f"device_accuracy_{k}": float(spread[k]) for k in ("min", "mean", "max")}
    per = summary.get("per_device_eval")
    accs = [
        float(v["accuracy"])
        for v in (per.values() if isinstance(per, dict) else ())
        if isinstance(v, dict) and is_number(v.get("accuracy"))
    ]
    if not accs:
        return {"device_accuracy_min": None, "device_accuracy_mean": None,
                "device_accuracy_max": None}  # fmt: skip
    return {"device_accuracy_min": min(accs), "device_accuracy_mean": sum(accs) / len(accs),
            "device_accuracy_max": max(accs)}  # fmt: skip


def _server_costs(summary: dict[str, Any]) -> dict[str, Any]:
    server = _get(summary, "costs", "server") or {}
    return {
        "server_compute_s": server.get("compute_s"),
        "server_flops": server.get("flops"),
        "server_energy_j": server.get("energy_j"),
    }


def compare_row(run: RunData) -> dict[str, Any]:
    """One comparison-table row; summary values first, metrics as the fallback."""
    s, recs = run.summary, run.records
    last_host = max(
        (r["host_time_s"] for r in recs if is_number(r.get("host_time_s"))), default=None
    )
    last_sim = max((r["sim_time_s"] for r in recs if is_number(r.get("sim_time_s"))), default=None)
    dev = _device_summary(run)

    def final(metric: str) -> Any:
        v = _get(s, "final", metric)
        return v if v is not None else final_from_metrics(recs, "eval", metric)

    row = {
        "name": run.name,
        "paradigm": s.get("paradigm"),
        "peft_method": s.get("peft_method"),
        "final_accuracy": final("accuracy"),
        "final_exact_match": final("exact_match"),
        "final_perplexity": final("perplexity"),
        "final_loss": final("loss"),
        "best_accuracy": _get(s, "best", "accuracy"),
        "host_time_s": s.get("host_time_s", last_host),
        "sim_time_s": s.get("sim_time_s", last_sim),
        "time_to_target_sim_s": _get(s, "time_to_target", "sim_time_s"),
        "time_to_target_step": _get(s, "time_to_target", "step"),
        "device_compute_s": dev["compute_s"],
        "device_flops": dev["flops"],
        "device_bytes": dev["bytes"],
        "device_energy_j": dev["energy_j"],
        "device_peak_memory_bytes": dev["peak_memory_bytes"],
        "trainable_params": s.get("trainable_params"),
        "eval_examples": final("examples"),
        "accuracy_ci95": None,
        "devices": s.get("devices"),
        **_per_device_accuracy(s),
        **_server_costs(s),
        "raw_data_off_devices": (s["paradigm"] in SHIPS_RAW_DATA) if s.get("paradigm") else None,
    }
    acc, n = row["final_accuracy"], row["eval_examples"]
    if is_number(acc) and is_number(n) and n > 0:  # the test set's own noise (Wilson, 95%)
        from cotune.report.seeds import wilson

        lo, hi = wilson(float(acc), int(n))
        row["accuracy_ci95"] = (hi - lo) / 2
    return {k: row[k] for k in COMPARE_COLUMNS}


#: Top-level summary keys shown under a friendlier label.
_LABELS = {"host_time_s": "host time", "sim_time_s": "simulated time"}
#: (label, path in summary) of the cost figures the summary table shows.
_COST_ROWS = (
    ("device FLOPs", ("devices", "flops")),
    ("device bytes up", ("devices", "bytes_up")),
    ("device bytes down", ("devices", "bytes_down")),
    ("device energy", ("devices", "energy_j")),
    ("peak device memory", ("device_peak_memory_bytes",)),
    ("server FLOPs", ("server", "flops")),
    ("server energy", ("server", "energy_j")),
    ("total FLOPs", ("total", "flops")),
    ("total energy", ("total", "energy_j")),
    ("total compute time", ("total", "compute_s")),
    ("total comm time", ("total", "comm_s")),
)

SummaryRow = tuple[str, str, Any]


def _time_to_target_rows(summary: dict[str, Any]) -> list[SummaryRow]:
    target, hit = summary.get("target_accuracy"), summary.get("time_to_target")
    if target is None and not hit:
        return []
    if not isinstance(hit, dict):
        return [("time to target", "time_to_target", "not reached")]
    rows: list[SummaryRow] = []
    for sub, label in (("sim_time_s", "simulated"), ("host_time_s", "host"), ("step", "step"),
                       ("round", "round")):  # fmt: skip
        if sub in hit:
            rows.append((f"time to target ({label})", f"time_to_target.{sub}", hit[sub]))
    return rows


def summary_rows(summary: dict[str, Any]) -> list[SummaryRow]:
    """(label, key for units, value) rows: one level of nesting flattened into dotted keys;
    ``costs`` and ``time_to_target`` as a fixed set of readable rows (per-role costs have
    their own table)."""
    keys = [k for k in SUMMARY_ORDER if k in summary] + [
        k for k in summary if k not in SUMMARY_ORDER
    ]
    rows: list[SummaryRow] = []
    for k in keys:
        v = summary[k]
        if k == "costs":
            for label, path in _COST_ROWS:
                cv = _get(v, *path)
                if cv is not None:
                    rows.append((label, f"costs.{'.'.join(path)}", cv))
        elif k == "bytes" and _get(summary, "costs", "devices", "bytes_up") is not None:
            continue  # the same device traffic as the cost rows' device bytes up/down
        elif k == "time_to_target":
            rows.extend(_time_to_target_rows(summary))
        elif k in ("per_device_eval", "per_device_accuracy"):  # a summary has one of them
            acc = _per_device_accuracy(summary)
            if acc["device_accuracy_mean"] is not None:
                text = " · ".join(
                    f"{acc[f'device_accuracy_{s}']:.3f}" for s in ("min", "mean", "max")
                )
                rows.append(("per-device accuracy (min · mean · max)", "per_device", text))
        elif isinstance(v, dict) and v:
            rows.extend((f"{k}.{sub}", f"{k}.{sub}", sv) for sub, sv in v.items())
        else:
            rows.append((_LABELS.get(k, k), k, v))
    return rows
