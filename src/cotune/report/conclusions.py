"""The comparison's answer in a few sentences: who is most accurate (and whether by more than
the test set's noise), who reaches the target first in simulated time, who costs the devices
least in compute, bytes and energy, and which paradigms ship raw data off the devices."""

from __future__ import annotations

from typing import Any

from cotune.report.metrics import is_number
from cotune.report.pareto import front_names
from cotune.report.runs import SHIPS_RAW_DATA
from cotune.report.units import fmt_value


def _best(rows: list[dict[str, Any]], key: str, low: bool) -> dict[str, Any] | None:
    have = [r for r in rows if is_number(r.get(key))]
    if not have:
        return None
    return (min if low else max)(have, key=lambda r: float(r[key]))


def conclusions(rows: list[dict[str, Any]]) -> list[str]:
    """Plain sentences over comparison rows (``compare_row``'s keys plus ``name``)."""
    out: list[str] = []
    if len(rows) < 2:
        return out
    acc = [r for r in rows if is_number(r.get("final_accuracy"))]
    if len(acc) >= 2:
        ranked = sorted(acc, key=lambda r: -float(r["final_accuracy"]))
        top, second = ranked[0], ranked[1]
        gap = float(top["final_accuracy"]) - float(second["final_accuracy"])
        noise = max(float(r.get("accuracy_ci95") or 0.0) for r in (top, second))
        verdict = (
            f"by {gap:.3f}, within the test set's noise (±{noise:.3f}, 95%)"
            if gap <= noise
            else f"by {gap:.3f}, more than the test set's noise (±{noise:.3f}, 95%)"
        )
        out.append(f"Most accurate: {top['name']} ({float(top['final_accuracy']):.3f}), ahead of "
                   f"{second['name']} {verdict}.")  # fmt: skip
    else:
        best = _best(rows, "final_perplexity", low=True)
        if best is not None:
            out.append(
                f"Lowest perplexity: {best['name']} ({float(best['final_perplexity']):.3g})."
            )
        best = _best(rows, "final_exact_match", low=False)
        if best is not None:
            out.append(f"Most instructions answered exactly: {best['name']} "
                       f"({float(best['final_exact_match']):.3f}).")  # fmt: skip
    first = _best(rows, "time_to_target_sim_s", low=True)
    if first is not None:
        missed = [r["name"] for r in rows if not is_number(r.get("time_to_target_sim_s"))]
        tail = f"; never reached it: {', '.join(missed)}" if missed else ""
        out.append(f"First to the target accuracy in simulated time: {first['name']} "
                   f"({fmt_value('sim_time_s', first['time_to_target_sim_s'])}){tail}.")  # fmt: skip
    for key, what in (("device_compute_s", "device compute"), ("device_bytes", "bytes moved"),
                      ("device_energy_j", "device energy")):  # fmt: skip
        fed = [r for r in rows if r.get("paradigm") not in SHIPS_RAW_DATA]
        best = _best(fed, key, low=True)
        if best is not None and len(fed) >= 2:
            out.append(f"Least {what} (of the paradigms that keep data on the devices): "
                       f"{best['name']} ({fmt_value(key, best[key])}).")  # fmt: skip
    kept = [r for r in rows if r.get("paradigm") not in SHIPS_RAW_DATA]
    front = front_names(kept, "device_compute_s")
    if 1 <= len(front) < len(kept):
        out.append(f"Best trade-offs of quality against device compute, of the paradigms that keep "
                   f"data on the devices (no other is both cheaper and better): "
                   f"{', '.join(front)}.")  # fmt: skip
    raw = [r["name"] for r in rows if r.get("paradigm") in SHIPS_RAW_DATA]
    if raw:
        out.append(f"Ships raw data off the devices (a reference, not a deployable option): "
                   f"{', '.join(raw)}.")  # fmt: skip
    return out
