"""The comparison page's tables: what each run reached (quality) and what it cost, with
human column titles; compare.json / compare.csv keep the machine keys.

Two tables rather than one row of twenty-five columns, so each fits the page; a column no run
has a value for is left out (the CSV keeps it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cotune.report.metrics import is_number
from cotune.report.page import Cell

#: Column key → the title a reader sees.
TITLES = {
    "name": "run",
    "paradigm": "paradigm",
    "peft_method": "method",
    "final_accuracy": "accuracy",
    "accuracy_ci95": "± (95%, eval set)",
    "best_accuracy": "best accuracy",
    "device_accuracy": "per-device accuracy (min · mean · max)",
    "final_exact_match": "exact match (instructions)",
    "final_perplexity": "perplexity",
    "final_loss": "eval loss",
    "eval_examples": "eval examples",
    "time_to_target_sim_s": "time to target (simulated)",
    "time_to_target_step": "step at target",
    "sim_time_s": "simulated time",
    "host_time_s": "host time",
    "devices": "devices",
    "device_compute_s": "device compute (sum)",
    "device_flops": "device FLOPs",
    "device_bytes": "device traffic (up + down)",
    "device_energy_j": "device energy",
    "device_peak_memory_bytes": "peak device memory",
    "server_compute_s": "server compute",
    "server_flops": "server FLOPs",
    "server_energy_j": "server energy",
    "trainable_params": "trainable parameters",
    "raw_data_off_devices": "raw data leaves the devices",
}

QUALITY = ("name", "paradigm", "peft_method", "final_accuracy", "accuracy_ci95", "best_accuracy",
           "device_accuracy", "final_exact_match", "final_perplexity", "final_loss", "eval_examples",
           "time_to_target_sim_s", "time_to_target_step")  # fmt: skip
COSTS = ("name", "sim_time_s", "host_time_s", "devices", "device_compute_s", "device_flops",
         "device_bytes", "device_energy_j", "device_peak_memory_bytes", "server_compute_s",
         "server_flops", "server_energy_j", "trainable_params", "raw_data_off_devices")  # fmt: skip


def _device_accuracy(row: dict[str, Any]) -> str | None:
    parts = [row.get(f"device_accuracy_{k}") for k in ("min", "mean", "max")]
    if not all(is_number(p) for p in parts):
        return None
    return " · ".join(f"{float(p):.3f}" for p in parts)


def _value(row: dict[str, Any], key: str) -> Any:
    if key == "device_accuracy":
        return _device_accuracy(row)
    v = row.get(key)
    if key == "accuracy_ci95" and is_number(v):
        return f"±{float(v):.3f}"
    return v


def compare_tables(
    rows: list[dict[str, Any]], link: Callable[[int], str | None]
) -> list[tuple[str, list[str], list[list[Cell]]]]:
    """(section title, column titles, cells) of the quality and cost tables; ``link(i)``: the
    page row ``i``'s run name links to, if any."""
    out = []
    for title, keys in (("What each run reached", QUALITY), ("What each run cost", COSTS)):
        cols = [k for k in keys if k == "name" or any(_value(r, k) is not None for r in rows)]
        if len(cols) <= 1:
            continue
        body = [
            [(k, _value(r, k), link(i) if k == "name" else None) for k in cols]
            for i, r in enumerate(rows)
        ]
        out.append((title, [TITLES[k] for k in cols], body))
    return out
