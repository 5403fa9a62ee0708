"""Human units for table cells and plot axes: B/KB/MB/GB, FLOP/GFLOP/TFLOP, ms/s/min/h, mJ/J/kJ.

The unit is chosen from the field *name* (``bytes_up``, ``flops``, ``busy_s``, ``energy_j``), so
a summary, a cost table and a comparison row all format the same field the same way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from cotune.report.metrics import is_number

# Decimal prefixes: network and memory sizes in the simulator are decimal too.
_SI = (("", 1.0), ("k", 1e3), ("M", 1e6), ("G", 1e9), ("T", 1e12), ("P", 1e15), ("E", 1e18))


def _scaled(n: float, unit: str, prefixes: tuple[tuple[str, float], ...] = _SI) -> str:
    """``n`` with the largest prefix that keeps the mantissa >= 1, 4 significant digits."""
    if n == 0:
        return f"0 {unit}"
    prefix, scale = prefixes[0]
    for p, s in prefixes:
        if abs(n) >= s:
            prefix, scale = p, s
    return f"{n / scale:.4g} {prefix}{unit}"


def fmt_bytes(n: float) -> str:
    if abs(n) < 1000:
        return f"{n:,.0f} B"
    # "KB" rather than SI "kB": what people write for sizes.
    return _scaled(n, "B", (("", 1.0), ("K", 1e3), *_SI[2:]))


def fmt_flops(n: float) -> str:
    return _scaled(n, "FLOP")


def fmt_energy(j: float) -> str:
    if j != 0 and abs(j) < 1:
        return f"{j * 1e3:.4g} mJ" if abs(j) >= 1e-3 else f"{j * 1e6:.4g} µJ"
    return _scaled(j, "J")


def fmt_seconds(s: float) -> str:
    a = abs(s)
    if s == 0:
        return "0 s"
    if a < 1e-6:
        return f"{s * 1e9:.3g} ns"
    if a < 1e-3:
        return f"{s * 1e6:.3g} µs"
    if a < 1:
        return f"{s * 1e3:.3g} ms"
    if a < 120:
        return f"{s:.4g} s"
    if a < 2 * 3600:
        return f"{s / 60:.3g} min"
    return f"{s / 3600:,.3g} h" if a < 1000 * 3600 else f"{s / 3600:,.0f} h"


def formatter_for(key: str) -> Callable[[float], str] | None:
    """The unit formatter a field name implies, or None for a plain number."""
    last = key.rsplit(".", 1)[-1]
    if "bytes" in key:  # also bytes.up / bytes.total
        return fmt_bytes
    if "flops" in last:
        return fmt_flops
    if last.endswith("energy_j"):
        return fmt_energy
    if last.endswith("_s"):
        return fmt_seconds
    return None


def fmt_value(key: str, v: Any) -> str:
    """Human form of a table value: units from the key, else 4 significant digits."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return ("yes" if v else "NO") if key.endswith("fits") else ("yes" if v else "no")
    if isinstance(v, str):
        return v
    if is_number(v) and math.isfinite(v):
        unit = formatter_for(key)
        if unit is not None:
            return unit(float(v))
        return f"{v:,}" if isinstance(v, int) else f"{v:.4g}"
    if is_number(v):
        return str(v)  # nan / inf
    text = json.dumps(v, separators=(",", ":"), default=str)
    return text if len(text) <= 160 else text[:157] + "..."
