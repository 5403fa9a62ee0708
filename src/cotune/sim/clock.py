"""A discrete-event virtual clock: simulated time from counted FLOPs and encoded bytes.

Modelling choices (simulated seconds only; host wall time never enters):

* Each role has a profile and a timeline cursor (when it is next free).
* **Devices are serial**: compute and transfers on one device happen one after another
  (a phone does not train while it uploads; client code awaits its send). Different devices
  run in parallel.
* **Hubs** (the server by default) have one serial *compute* timeline served in the order
  work is submitted (use :meth:`VirtualClock.queue` for arrival order), but their network is
  not a bottleneck: a hub sends and receives many transfers at once and while computing
  (datacenter NICs are ≫ device links). A hub's send starts when its data is ready (its
  compute cursor, or ``after``).
* A transfer takes ``latency(src) + latency(dst) + nbytes / min(src.up_bps, dst.down_bps)``:
  device→server is limited by the device uplink, server→device by its downlink.
* A transfer that answers a request (``Transfer.in_reply_to``) cannot start before that
  request arrived (causality for :meth:`on_transfer`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cotune.errors import ConfigError
from cotune.sim.profiles import DeviceProfile

if TYPE_CHECKING:  # the engine imports torch; the clock must not
    from cotune.runtime.engine import Transfer


@dataclass(frozen=True)
class Interval:
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Event:
    kind: str  # "compute" | "transfer"
    role: str  # the computing role, or the sender
    peer: str | None  # the receiver of a transfer
    start: float
    end: float
    flops: float = 0.0
    nbytes: int = 0
    label: str = ""


@dataclass
class RoleStats:
    compute_s: float = 0.0  # time spent computing
    comm_s: float = 0.0  # time its transfers took (both directions)
    busy_s: float = 0.0  # time its own timeline was occupied (hubs: compute only)
    flops: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    energy_j: float = 0.0


def _add_exact(partials: list[float], x: float) -> None:
    """Add ``x`` to a sum kept as non-overlapping partials (Shewchuk's algorithm, the one
    behind ``math.fsum``), so the total is exact and does not depend on the order of adds."""
    i = 0
    for y in partials:
        if abs(x) < abs(y):
            x, y = y, x
        hi = x + y
        lo = y - (hi - x)
        if lo:
            partials[i] = lo
            i += 1
        x = hi
    partials[i:] = [x]


class _Ledger:
    """One role's running totals. The sums are exact: independent events (two devices' uploads
    in one tick) reach a hub in an order engines choose by convention (a batched handler sends
    all of one kind first, a network engine takes each device's effects in turn), and a role's
    totals must not depend on it."""

    SUMS = ("compute_s", "comm_s", "busy_s", "flops", "energy_j")
    __slots__ = ("_parts", "bytes_up", "bytes_down")

    def __init__(self) -> None:
        self._parts: dict[str, list[float]] = {k: [] for k in self.SUMS}
        self.bytes_up = 0
        self.bytes_down = 0

    def add(self, name: str, x: float) -> None:
        _add_exact(self._parts[name], float(x))

    def parts(self, name: str) -> list[float]:
        """The partials whose exact sum is the total of ``name``."""
        return self._parts[name]

    def snapshot(self) -> RoleStats:
        sums = {k: math.fsum(v) for k, v in self._parts.items()}
        return RoleStats(bytes_up=self.bytes_up, bytes_down=self.bytes_down, **sums)


@dataclass(frozen=True)
class RoundOutcome:
    end_time: float
    reported: list[str]
    dropped: list[str]
    met_quorum: bool = True


@dataclass
class VirtualClock:
    """Timelines for ``roles`` (role id → profile); ``hubs`` are roles with parallel I/O."""

    roles: dict[str, DeviceProfile]
    hubs: frozenset[str] = frozenset({"server"})
    events: list[Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.roles = dict(self.roles)
        self.hubs = frozenset(self.hubs)
        # Entries appear when a role first does something: a population of 100,000 devices,
        # most never sampled, costs the clock nothing for those.
        self._free: dict[str, float] = defaultdict(float)
        self._stats: dict[str, _Ledger] = defaultdict(_Ledger)
        self._arrivals: dict[tuple[str, str], float] = {}  # (dst, src) → last arrival
        self._seq_end: dict[int, float] = {}  # engine transfer seq → arrival time

    # --- roles -------------------------------------------------------------------------
    def add_role(self, role: str, profile: DeviceProfile, *, hub: bool = False) -> None:
        if role in self.roles:
            raise ConfigError(f"clock: role {role!r} already has a profile")
        self.roles[role] = profile
        if hub:
            self.hubs = self.hubs | {role}

    def _profile(self, role: str) -> DeviceProfile:
        try:
            return self.roles[role]
        except KeyError:
            raise ConfigError(
                f"clock: no device profile for role {role!r} (roles: {', '.join(self.roles)})"
            ) from None

    def free_at(self, role: str) -> float:
        """When ``role``'s timeline is next free (hubs: their compute timeline)."""
        self._profile(role)
        return self._free[role]

    def last_arrival(self, role: str, src: str | None = None) -> float:
        """Latest arrival at ``role`` (from ``src``, or from anyone); 0.0 if none."""
        times = [t for (d, s), t in self._arrivals.items() if d == role and src in (None, s)]
        return max(times, default=0.0)

    def arrival(self, role: str, src: str) -> float:
        """Latest arrival at ``role`` from ``src`` (0.0 if none), in constant time."""
        return self._arrivals.get((role, src), 0.0)

    @property
    def now(self) -> float:
        """The latest time any timeline or transfer reaches."""
        return max([*self._free.values(), *self._arrivals.values(), 0.0])

    # --- work --------------------------------------------------------------------------
    def compute(
        self, role: str, flops: float, *, after: float = 0.0, slowdown: float = 1.0, label: str = ""
    ) -> Interval:
        """Run ``flops`` on ``role`` once it is free and not before ``after``."""
        prof = self._profile(role)
        if flops < 0 or not math.isfinite(flops) or slowdown <= 0:
            raise ValueError(f"compute({role!r}): bad flops={flops} or slowdown={slowdown}")
        start = max(self._free[role], after)
        end = start + flops / prof.flops * slowdown
        self._free[role] = end
        st = self._stats[role]
        st.add("compute_s", end - start)
        st.add("busy_s", end - start)
        st.add("flops", flops)
        st.add("energy_j", flops * prof.energy_per_flop_j)
        self.events.append(Event("compute", role, None, start, end, flops=flops, label=label))
        return Interval(start, end)

    def queue(
        self, role: str, jobs: Iterable[tuple[float, float]], *, label: str = ""
    ) -> list[Interval]:
        """Serve ``(arrival_time, flops)`` jobs in arrival order (FIFO, ties in given order);
        returns the intervals in the order the jobs were given."""
        jobs = list(jobs)
        order = sorted(range(len(jobs)), key=lambda i: (jobs[i][0], i))
        out: dict[int, Interval] = {}
        for i in order:
            arrival, flops = jobs[i]
            out[i] = self.compute(role, flops, after=arrival, label=label)
        return [out[i] for i in range(len(jobs))]

    def link_time(self, src: str, dst: str, nbytes: int) -> float:
        """Seconds one transfer of ``nbytes`` takes on the src→dst link (no queueing)."""
        s, d = self._profile(src), self._profile(dst)
        return s.latency_s + d.latency_s + nbytes / min(s.up_bps, d.down_bps)

    def transfer(
        self, src: str, dst: str, nbytes: int, *, after: float = 0.0, label: str = ""
    ) -> Interval:
        """Send ``nbytes`` from ``src`` to ``dst``; serial endpoints are busy for the duration."""
        if nbytes < 0:
            raise ValueError(f"transfer({src!r}->{dst!r}): negative byte count {nbytes}")
        duration = self.link_time(src, dst, nbytes)
        start = max(after, self._free[src])  # a hub's data is ready when its compute is
        if dst not in self.hubs:
            start = max(start, self._free[dst])
        end = start + duration
        for role in (src, dst):
            if role not in self.hubs:
                self._free[role] = end
                self._stats[role].add("busy_s", duration)
            self._stats[role].add("comm_s", duration)
        self._stats[src].bytes_up += nbytes
        self._stats[dst].bytes_down += nbytes
        self._stats[src].add("energy_j", nbytes * self.roles[src].energy_per_byte_j)
        self._stats[dst].add("energy_j", nbytes * self.roles[dst].energy_per_byte_j)
        key = (dst, src)
        self._arrivals[key] = max(self._arrivals.get(key, 0.0), end)
        self.events.append(Event("transfer", src, dst, start, end, nbytes=nbytes, label=label))
        return Interval(start, end)

    def on_transfer(self, t: Transfer) -> None:
        """Engine listener: ``engine.add_listener(clock.on_transfer)`` charges every transfer."""
        after = self._seq_end.get(t.in_reply_to, 0.0) if t.in_reply_to is not None else 0.0
        iv = self.transfer(t.sender, t.receiver, t.nbytes, after=after, label=t.kind)
        self._seq_end[t.seq] = iv.end

    # --- synchronisation ---------------------------------------------------------------
    def _done(self, role: str) -> float:
        self._profile(role)
        if role in self.hubs:
            return max(self._free[role], self.last_arrival(role))
        return self._free[role]

    def barrier(self, roles: Iterable[str]) -> float:
        """All ``roles`` wait for the slowest (hubs: also for their last arrival); returns that time."""
        roles = list(roles)
        t = max((self._done(r) for r in roles), default=0.0)
        for r in roles:
            self._free[r] = t
        return t

    def round_end(
        self,
        participants: Iterable[str],
        quorum: int | None = None,
        deadline: float | None = None,
        *,
        failed: Iterable[str] = (),
        server: str = "server",
    ) -> RoundOutcome:
        """Close a round on ``server``. A participant reports at the end of its timeline
        (normally its upload's arrival); ``failed`` ones never report. Without a quorum the
        round waits for all reports; with one it ends at the ``quorum``-th report. A
        ``deadline`` (absolute simulated seconds) cuts the wait. Late devices stay busy."""
        self._profile(server)
        participants = list(participants)
        failed_set = set(failed)
        finish = {p: (math.inf if p in failed_set else self._done(p)) for p in participants}
        times = sorted(t for t in finish.values() if math.isfinite(t))
        need = len(participants) if quorum is None else quorum
        if not 1 <= need <= len(participants):
            raise ValueError(f"round_end: quorum {quorum} with {len(participants)} participants")
        end = times[need - 1] if need <= len(times) else math.inf
        if deadline is not None:
            end = min(end, deadline)
        if math.isinf(end):  # unreachable quorum, no deadline: noticed once the rest reported
            end = times[-1] if times else self._free[server]
        reported = [p for p in participants if finish[p] <= end]
        dropped = [p for p in participants if finish[p] > end]
        self._free[server] = max(self._free[server], end)
        return RoundOutcome(end, reported, dropped, met_quorum=len(reported) >= need)

    # --- accounting --------------------------------------------------------------------
    def stats(self, *, idle: bool = True) -> dict[str, RoleStats]:
        """Per role: busy/compute/comm seconds, FLOPs, bytes up/down, energy (copies); with
        ``idle=False`` only the roles that did something."""
        if not idle:
            return {r: s.snapshot() for r, s in self._stats.items()}
        return {
            r: self._stats[r].snapshot() if r in self._stats else RoleStats() for r in self.roles
        }

    def used(self) -> set[str]:
        """The roles that computed, sent or received something."""
        return set(self._stats)

    def total_energy_j(self) -> float:
        return math.fsum(x for s in self._stats.values() for x in s.parts("energy_j"))
