"""Per-device behaviour: when a device is online, how slow it is, and how its reports reach
the server (a dispatch shaper in the spirit of SimDC's traffic controller).

All randomness is a pure function of ``(seed, device, round)`` (a hash, not a stream), so a
device's fate does not depend on the order in which the simulator asks.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cotune.errors import ConfigError, DataError


def _uniform(*keys: object) -> float:
    """A deterministic uniform [0, 1) draw keyed by ``keys``."""
    h = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


class Behaviour:
    """Base: always online, never slowed. Subclasses override one or both methods."""

    def available(self, device_index: int, round: int, time: float) -> bool:
        return True

    def slowdown(self, device_index: int, round: int) -> float:
        return 1.0


class AlwaysOn(Behaviour):
    pass


class RandomDrop(Behaviour):
    """Each device misses each round independently with probability ``p``."""

    def __init__(self, p: float, seed: int = 0) -> None:
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"availability.drop_p must be in [0, 1], got {p}")
        self.p, self.seed = p, seed

    def available(self, device_index: int, round: int, time: float) -> bool:
        return _uniform(self.seed, "drop", device_index, round) >= self.p


class Periodic(Behaviour):
    """Online for the first ``on_fraction`` of every ``period_s`` (shifted by ``phase_s``);
    ``stagger`` gives each device its own seeded phase, so the fleet is not in lockstep."""

    def __init__(
        self, period_s: float, on_fraction: float, phase_s: float = 0.0, *,
        stagger: bool = False, seed: int = 0,
    ) -> None:  # fmt: skip
        if period_s <= 0 or not 0.0 < on_fraction <= 1.0:
            raise ConfigError(
                f"availability: period_s must be > 0 and on_fraction in (0, 1], "
                f"got {period_s}, {on_fraction}"
            )
        self.period_s, self.on_fraction, self.phase_s = period_s, on_fraction, phase_s
        self.stagger, self.seed = stagger, seed

    def available(self, device_index: int, round: int, time: float) -> bool:
        phase = self.phase_s
        if self.stagger:
            phase += _uniform(self.seed, "phase", device_index) * self.period_s
        return ((time + phase) % self.period_s) < self.on_fraction * self.period_s


def _merge(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


class Trace(Behaviour):
    """Online intervals per device, ``[start_s, end_s)``; a device absent from the trace is
    never online."""

    def __init__(self, intervals: dict[int, list[tuple[float, float]]]) -> None:
        self.intervals = {d: _merge(v) for d, v in intervals.items()}
        self._starts = {d: [a for a, _ in v] for d, v in self.intervals.items()}

    @classmethod
    def from_csv(cls, path: str | Path) -> Trace:
        """Read ``device,start_s,end_s`` lines (an optional header, ``#`` comments)."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"availability trace file not found: {p}")
        out: dict[int, list[tuple[float, float]]] = {}
        with p.open(newline="", encoding="utf-8") as fh:
            for lineno, row in enumerate(csv.reader(fh), start=1):
                if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                    continue
                if lineno == 1 and row[0].strip().lower() == "device":
                    continue
                where = f"{p}:{lineno}"
                if len(row) != 3:
                    raise DataError(
                        f"{where}: expected device,start_s,end_s, got {len(row)} fields"
                    )
                try:
                    dev, start, end = int(row[0]), float(row[1]), float(row[2])
                except ValueError:
                    raise DataError(f"{where}: not numbers: {','.join(row)!r}") from None
                if dev < 0 or not (math.isfinite(start) and math.isfinite(end)) or end <= start:
                    raise DataError(
                        f"{where}: need device >= 0 and finite start_s < end_s, got {row!r}"
                    )
                out.setdefault(dev, []).append((start, end))
        return cls(out)

    def available(self, device_index: int, round: int, time: float) -> bool:
        spans = self.intervals.get(device_index)
        if not spans:
            return False
        i = bisect.bisect_right(self._starts[device_index], time)
        return i > 0 and time < spans[i - 1][1]  # spans are merged, so only one can hold


class Stragglers(Behaviour):
    """A ``fraction`` of devices run ``slowdown`` ∈ [lo, hi] times slower: the same devices
    every round, or (``per_round``) a fresh seeded draw each round."""

    def __init__(
        self, fraction: float, slowdown: tuple[float, float] = (2.0, 4.0), *,
        per_round: bool = False, seed: int = 0,
    ) -> None:  # fmt: skip
        lo, hi = slowdown
        if not 0.0 <= fraction <= 1.0 or not 1.0 <= lo <= hi:
            raise ConfigError(
                f"availability: straggler_fraction must be in [0, 1] and 1 <= slowdown lo <= hi, "
                f"got {fraction}, {slowdown}"
            )
        self.fraction, self.lo, self.hi = fraction, lo, hi
        self.per_round, self.seed = per_round, seed

    def slowdown(self, device_index: int, round: int) -> float:
        r = round if self.per_round else -1
        if _uniform(self.seed, "slow?", device_index, r) >= self.fraction:
            return 1.0
        return self.lo + (self.hi - self.lo) * _uniform(self.seed, "slow", device_index, r)


class Combined(Behaviour):
    """Online when every part says so; slowdowns multiply."""

    def __init__(self, *parts: Behaviour) -> None:
        self.parts = parts

    def available(self, device_index: int, round: int, time: float) -> bool:
        return all(p.available(device_index, round, time) for p in self.parts)

    def slowdown(self, device_index: int, round: int) -> float:
        return math.prod(p.slowdown(device_index, round) for p in self.parts)


RateFn = Callable[[float], float]


class DispatchShaper:
    """Decides when finished reports reach the server (SimDC's traffic controller, in
    simulated time): in batches of ``batch_size`` (a batch leaves when its last member is
    ready; a final partial batch is flushed at its last member), or at ``rate(t)`` reports per
    second (``t`` relative to ``origin``; a float is a constant rate, released report ``n``
    needs the integral of the positive part of the rate to reach ``n``). Each report is
    dropped with ``drop_p`` (seeded per round and report)."""

    def __init__(
        self, *, batch_size: int | None = None, rate: float | RateFn | None = None,
        drop_p: float = 0.0, seed: int = 0, dt: float = 0.01, horizon_s: float = 1e7,
    ) -> None:  # fmt: skip
        if (batch_size is None) == (rate is None):
            raise ConfigError("dispatch shaper: give exactly one of batch_size or rate")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"availability.dispatch_batch must be >= 1, got {batch_size}")
        if isinstance(rate, int | float) and rate <= 0:
            raise ConfigError(f"availability.dispatch_rate must be > 0, got {rate}")
        if not 0.0 <= drop_p < 1.0:
            raise ConfigError(f"availability.dispatch_drop_p must be in [0, 1), got {drop_p}")
        self.batch_size, self.rate, self.drop_p, self.seed = batch_size, rate, drop_p, seed
        self.dt, self.horizon_s = dt, horizon_s

    def release(
        self, ready: Sequence[float], *, origin: float = 0.0, round: int = 0
    ) -> list[float | None]:
        """Release time per report (same order as ``ready``); ``None`` = dropped."""
        order = sorted(range(len(ready)), key=lambda i: (ready[i], i))
        kept = [i for i in order if _uniform(self.seed, "dispatch", round, i) >= self.drop_p]
        out: list[float | None] = [None] * len(ready)
        if self.batch_size is not None:
            for b in range(0, len(kept), self.batch_size):
                group = kept[b : b + self.batch_size]
                for i in group:
                    out[i] = ready[group[-1]]
            return out
        prev = origin
        cum = self._allowance_times(len(kept), origin)
        for n, i in enumerate(kept):
            t = max(ready[i], prev, cum[n])
            out[i] = None if math.isinf(t) else t
            prev = t
        return out

    def _allowance_times(self, n: int, origin: float) -> list[float]:
        """Earliest time the cumulative allowance reaches 1, 2, ..., n."""
        if isinstance(self.rate, int | float):
            return [origin + k / self.rate for k in range(1, n + 1)]
        fn: RateFn = self.rate  # type: ignore[assignment]
        out: list[float] = []
        t, area, f0 = 0.0, 0.0, max(fn(0.0), 0.0)
        while len(out) < n and t < self.horizon_s:
            f1 = max(fn(t + self.dt), 0.0)
            step = 0.5 * (f0 + f1) * self.dt  # trapezoid rule on the positive part
            while len(out) < n and area + step >= len(out) + 1 and step > 0:
                frac = (len(out) + 1 - area) / step  # linear within the step
                out.append(origin + t + frac * self.dt)
            t, area, f0 = t + self.dt, area + step, f1
        return out + [math.inf] * (n - len(out))


def behaviour_from_config(cfg: Any, seed: int = 0) -> tuple[Behaviour, DispatchShaper | None]:
    """Build the behaviour and optional shaper from ``devices.availability``."""
    parts: list[Behaviour] = []
    if cfg.kind == "random":
        parts.append(RandomDrop(cfg.drop_p, seed))
    elif cfg.kind == "periodic":
        parts.append(
            Periodic(cfg.period_s, cfg.on_fraction, cfg.phase_s, stagger=cfg.stagger, seed=seed)
        )
    elif cfg.kind == "trace":
        if not cfg.trace_file:
            raise ConfigError(
                "devices.availability.kind=trace needs devices.availability.trace_file"
            )
        parts.append(Trace.from_csv(cfg.trace_file))
    if cfg.straggler_fraction > 0:
        parts.append(
            Stragglers(cfg.straggler_fraction, tuple(cfg.straggler_slowdown),
                       per_round=cfg.straggler_per_round, seed=seed)
        )  # fmt: skip
    behaviour: Behaviour = (
        parts[0] if len(parts) == 1 else Combined(*parts) if parts else AlwaysOn()
    )
    shaper = None
    if cfg.dispatch_batch is not None or cfg.dispatch_rate is not None:
        shaper = DispatchShaper(
            batch_size=cfg.dispatch_batch,
            rate=cfg.dispatch_rate,
            drop_p=cfg.dispatch_drop_p,
            seed=seed,
        )
    return behaviour, shaper
