"""metrics.jsonl: an append-only log of training records, and the tools to read it back.

One JSON object per line, flushed as soon as it is logged, so a killed run loses at most the
line being written. Record schema (fields beyond ``event`` and ``step`` are optional)::

    {"event": "train"|"eval"|"round", "step": int, "round": int|None, "role": "server"|"device-3"|"mean",
     "loss": float, "lr": float, "host_time_s": float, "accuracy"|"perplexity": float,
     "sim_time_s", "bytes_up", "bytes_down", "flops", "energy_j", "active_fraction", ...}
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from cotune.errors import CotuneError
from cotune.jsonsafe import finite_or_none, strict_json  # noqa: F401 - re-exported

log = logging.getLogger(__name__)


class MetricsLog:
    """Append records to ``path`` as JSON lines; usable as a context manager.

    Opening a log whose last line was cut off by a killed run removes that partial line first,
    so a resumed run appends clean records instead of gluing onto half a line.
    ``records`` holds every record in the file: those already there when it was opened (a
    resumed run) followed by those logged since, so a summary can be computed without re-reading.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_last_line(self.path)
        self.records: list[dict[str, Any]] = read_metrics(self.path) if self.path.exists() else []
        self._fh = self.path.open("a", encoding="utf-8")
        # Called after each record is written (cotune.run: the first record means "started").
        self.on_write: Callable[[], None] | None = None
        # Each record, once written, also goes to these (experiment trackers).
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    def log(self, record: dict[str, Any]) -> None:
        """Write one record as one line and flush it."""
        if not isinstance(record, dict) or "event" not in record:
            raise CotuneError(
                f"metrics record must be a dict with an 'event' field, got {record!r}"
            )
        try:
            line = strict_json(record, separators=(",", ":"))
        except (TypeError, ValueError) as e:
            raise CotuneError(
                f"metrics record is not JSON-serialisable ({e}): {record!r}"
            ) from None
        self._fh.write(line + "\n")
        self._fh.flush()
        self.records.append(json.loads(line))  # a copy, as a reader would see it
        if self.on_write is not None:
            self.on_write()
        for listener in self.listeners:
            listener(self.records[-1])

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _drop_partial_last_line(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    log.warning("%s: removing a partial last line left by an interrupted run", path)
    with path.open("r+b") as fh:
        fh.truncate(keep)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records in ``path``, in file order.

    A malformed line is a ``CotuneError`` naming the file and line number, except a malformed
    *last* line without a newline (a run killed mid-write), which is skipped with a warning.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CotuneError(f"metrics file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise CotuneError(f"metrics file {path} is not UTF-8 text ({e})") from None
    lines = text.split("\n")
    records: list[dict[str, Any]] = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
        except ValueError as e:
            if i == len(lines):  # no newline after it: the writer was killed mid-line
                log.warning("%s:%d: skipping a truncated last line (%s)", path, i, e)
                continue
            raise CotuneError(
                f"{path}:{i}: not a valid metrics record ({e}); fix or delete that line"
            ) from None
        records.append(rec)
    return records


def is_number(v: Any) -> bool:
    """A plottable value: int/float (not bool), finite or not."""
    return isinstance(v, int | float) and not isinstance(v, bool)


def numeric_fields(records: Iterable[dict[str, Any]]) -> list[str]:
    """Numeric field names present in ``records``, in first-seen order."""
    seen: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if is_number(v):
                seen.setdefault(k, None)
    return list(seen)


Series = tuple[list[float], list[float]]


def series_by_role(
    records: Iterable[dict[str, Any]], event: str, metric: str, x: str = "step"
) -> dict[str, Series]:
    """Per role, ``(xs, ys)`` sorted by ``x`` for records of ``event`` that have both fields.

    When the same (role, x) appears twice (a resumed run re-logging steps), the later record
    wins, so a resume does not draw a zig-zag.
    """
    points: dict[str, dict[float, float]] = {}
    for r in records:
        if r.get("event") != event or not is_number(r.get(metric)) or not is_number(r.get(x)):
            continue
        points.setdefault(str(r.get("role", "")), {})[float(r[x])] = float(r[metric])
    return {
        role: (sorted(p), [p[k] for k in sorted(p)])
        for role, p in sorted(points.items(), key=_role_key)
    }


def _role_key(item: tuple[str, Any]) -> tuple[str, int, str]:
    # device-2 before device-10
    prefix, _, num = item[0].rpartition("-")
    return (prefix, int(num), "") if num.isdigit() else (item[0], -1, "")


def is_device(role: str) -> bool:
    return role.startswith("device")


def main_series(by_role: dict[str, Series]) -> Series | None:
    """The one line that stands for a run: role ``mean`` if logged, else the average over
    device roles at each x, else the server, else the only or first role."""
    if not by_role:
        return None
    if "mean" in by_role:
        return by_role["mean"]
    devices = [s for r, s in by_role.items() if is_device(r)]
    if devices:
        return mean_series(devices)
    return by_role.get("server") or next(iter(by_role.values()))


def mean_series(series: list[Series]) -> Series:
    """Average of several series at each x any of them has (NaNs ignored)."""
    acc: dict[float, list[float]] = {}
    for xs, ys in series:
        for x, y in zip(xs, ys):
            acc.setdefault(x, []).append(y)
    xs = sorted(acc)
    ys = []
    for x in xs:
        vals = [v for v in acc[x] if not math.isnan(v)]
        ys.append(sum(vals) / len(vals) if vals else math.nan)
    return xs, ys
