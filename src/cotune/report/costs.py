"""What a run cost, read back from its directory: per-role costs and per-round traffic.

Sources, newest first: ``summary.json`` ``costs.roles``, else ``costs.csv`` (a run killed before
its summary still has neither, and older runs have no costs at all: everything here then returns
empty and the reports simply leave the cost sections out).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotune.report.metrics import is_device, is_number

#: Numeric fields of one role's cost row, as run.py writes them.
COST_FIELDS = ("flops", "bytes_up", "bytes_down", "compute_s", "comm_s", "busy_s", "energy_j",
               "memory_bytes")  # fmt: skip


def _device_index(role: str) -> tuple[int, str]:
    num = role.rpartition("-")[2]
    return (int(num), role) if num.isdigit() else (-1, role)


def _parse_csv_value(key: str, text: str) -> Any:
    if text == "":
        return None
    if key == "memory_fits":
        return text.lower() == "true"
    if key in COST_FIELDS:
        try:
            return float(text)
        except ValueError:
            return None
    return text


def role_costs(summary: dict[str, Any], run_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """``{role: {profile, flops, bytes_up, ...}}``: the server (if any) first, then devices by
    index (device-2 before device-10)."""
    roles = (summary.get("costs") or {}).get("roles") if isinstance(summary, dict) else None
    if not isinstance(roles, dict) or not roles:
        roles = {}
        path = run_dir / "costs.csv" if run_dir is not None else None
        if path is not None and path.is_file():
            with path.open(newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh):
                    role = row.pop("role", None) or f"role-{len(roles)}"
                    roles[role] = {k: _parse_csv_value(k, v or "") for k, v in row.items()}
    roles = {r: c for r, c in roles.items() if isinstance(c, dict)}
    order = sorted(roles, key=lambda r: (is_device(r), *_device_index(r)))
    return {r: roles[r] for r in order}


def device_costs(roles: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r: c for r, c in roles.items() if is_device(r)}


def num(c: dict[str, Any], key: str) -> float:
    """A cost field as a float; missing or null counts as 0 (nothing spent)."""
    v = c.get(key)
    return float(v) if is_number(v) else 0.0


def device_totals(devices: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Sums over devices (memory: the peak; fits: whether every device fits)."""
    tot: dict[str, Any] = {k: sum(num(c, k) for c in devices.values()) for k in COST_FIELDS}
    mems = [c["memory_bytes"] for c in devices.values() if is_number(c.get("memory_bytes"))]
    tot["memory_bytes"] = max(mems) if mems else None
    fits = [c["memory_fits"] for c in devices.values() if isinstance(c.get("memory_fits"), bool)]
    tot["memory_fits"] = all(fits) if fits else None
    return tot


@dataclass(frozen=True)
class RoundTraffic:
    round: int
    bytes_up: float
    bytes_down: float
    reported: int | None = None
    dropped: int | None = None


def round_traffic(records: list[dict[str, Any]]) -> list[RoundTraffic]:
    """One entry per ``round`` record, by round number; a resumed run's re-logged round wins."""
    by_round: dict[int, RoundTraffic] = {}
    for r in records:
        if r.get("event") != "round" or not is_number(r.get("round")):
            continue
        if not (is_number(r.get("bytes_up")) or is_number(r.get("bytes_down"))):
            continue
        k = int(r["round"])
        by_round[k] = RoundTraffic(
            k,
            num(r, "bytes_up"),
            num(r, "bytes_down"),
            r.get("reported") if is_number(r.get("reported")) else None,
            r.get("dropped") if is_number(r.get("dropped")) else None,
        )
    return [by_round[k] for k in sorted(by_round)]
