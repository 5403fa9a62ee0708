"""The simulator under the Grid: the virtual clock, availability and quorum, outside any paradigm.

``SimulatedGrid`` wraps any grid. Every encoded message already reaches the clock through the
engine's listener (bytes on the links); on top of that this wrapper

- takes each node's meter reports (counted FLOPs, memory probes) and charges them to that
  node's timeline (stragglers run slower), out of band;
- decides availability: which devices are connected at a round's start (``connected``), and
  which drop out mid-round (``random`` availability: the device trains, then goes offline
  before uploading, so its reply is ``failed`` and never travels);
- closes a ``gather`` as a round in simulated time: the dispatch shaper releases reports in
  batches or at a rate (or drops them), the round ends at the quorum-th report or the
  deadline, later reports are ``late``;
- gives replies their simulated ``arrival`` and a gather its ``closed_at``, which a role may
  pass back to its meter (``after=``) without ever reading the clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cotune.runtime.engine_grid import EngineGrid
from cotune.runtime.grid import Future, Gathered, Grid, Reply, RoleFactory
from cotune.runtime.ids import SERVER
from cotune.runtime.messages import Message
from cotune.runtime.node import Meter, NodeContext
from cotune.sim.costs import MemoryEstimate
from cotune.sim.simulation import Simulation


class SimSink:
    """Meter reports → the simulator: compute on the node's timeline, memory estimates."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self._probes: dict[str, MemoryEstimate] = {}  # one probe per key (same model, same shape)

    def compute(
        self,
        role: str,
        flops: float,
        *,
        round: int,
        after: float | None,
        waits_for: str | None,
        label: str,
    ) -> None:
        start = after or 0.0
        if waits_for is not None:
            start = max(start, self.sim.clock.arrival(role, waits_for))
        self.sim.charge(role, flops, round=round, after=start, label=label)

    def memory(self, role: str, key: str, probe: Callable[[], MemoryEstimate]) -> None:
        if key not in self._probes:
            self._probes[key] = probe()
        self.sim.memory[role] = self._probes[key]


class SimulatedGrid(Grid):
    """``inner`` with the simulator underneath (see the module docstring)."""

    def __init__(self, inner: EngineGrid, sim: Simulation, availability: str = "always") -> None:
        self.inner, self.sim, self.availability = inner, sim, availability
        self.colocated = inner.colocated
        inner.sink = SimSink(sim)
        inner.outer = self
        inner.engine.before_reply = self._before_reply
        inner.engine.on_deliver = self._stamp
        # receiver → round of the requests in flight (one, or a batch submitted together)
        self._rounds: dict[str, int] = {}

    # --- roles and nodes: as the inner grid ----------------------------------------------
    def node_ids(self, prefix: str = "device-") -> list[str]:
        return self.inner.node_ids(prefix)

    def node_info(self, role_id: str) -> dict[str, Any]:
        """What the node declared, with the capabilities of its simulated profile (what a real
        node reports when it joins: compute speed, link bandwidths and latency)."""
        prof = self.sim.profiles[role_id]
        return {
            **self.inner.node_info(role_id),
            "profile": prof.name,
            "flops": prof.flops,
            "up_bps": prof.up_bps,
            "down_bps": prof.down_bps,
            "latency_s": prof.latency_s,
            "memory_bytes": prof.memory_bytes,
        }

    def start(self, role_id: str, factory: RoleFactory) -> None:
        self.inner.start(role_id, factory)

    def context(self, role_id: str) -> NodeContext:
        return self.inner.context(role_id)

    def meter(self, role_id: str) -> Meter:
        return self.inner.meter(role_id)

    def snapshot(self, role_id: str) -> Any:
        return self.inner.snapshot(role_id)

    def snapshots(self, role_ids: list[str]) -> dict[str, Any]:
        return self.inner.snapshots(role_ids)

    def restore(self, role_id: str, state: Any) -> None:
        self.inner.restore(role_id, state)

    def measurements(self, role_id: str) -> dict[str, float]:
        return self.inner.measurements(role_id)

    @property
    def transfers(self) -> Any:
        return self.inner.transfers

    def add_listener(self, listener: Any) -> None:
        self.inner.add_listener(listener)

    def tick(self, role_ids: list[str], kind: str, meta: dict[str, Any] | None = None) -> list[Any]:
        """A local event the driver starts on each role. The driver's word reaches a device
        one link latency after the driver is free, and the driver goes on once every role's
        "done" is back: what a deployed run's control frames cost (their bytes are noise). So
        a device does not start its next split step while the server still serves the last."""
        clock = self.sim.clock
        remote = [r for r in role_ids if r != SERVER]
        issued = clock.free_at(SERVER)
        for r in remote:
            clock.compute(r, 0.0, after=issued + clock.link_time(SERVER, r, 0), label="tick")
        out = self.inner.tick(role_ids, kind, meta)
        if remote:
            done = max(clock.free_at(r) + clock.link_time(r, SERVER, 0) for r in remote)
            clock.compute(SERVER, 0.0, after=done, label="tick-done")
        return out

    def close(self) -> None:
        self.inner.close()

    def host(self, role: Any) -> None:
        self.inner.host(role)

    # --- messages on the clock -----------------------------------------------------------
    def _stamp(self, msg: Message) -> None:
        msg.arrival = self.sim.clock.arrival(msg.receiver, msg.sender)

    def _before_reply(self, role: str, request: Message, reply: Message) -> str | None:
        """A device in a round may go offline after its work, before its upload leaves."""
        if role not in self._rounds:
            return None
        rnd = self._rounds[role]
        if not self.sim.online(role, rnd, self.sim.clock.free_at(role)):
            return f"{role} went offline in round {rnd} before uploading"
        return None

    def submit(self, msg: Message, *, codec: str | None = None, round: int | None = None) -> Future:
        return self._submitted(
            [msg], round, lambda: [self.inner.submit(msg, codec=codec, round=round)]
        )[0]

    def submit_many(
        self, msgs: list[Message], *, codec: str | None = None, round: int | None = None
    ) -> list[Future]:
        if not self.inner.pipelines(msgs):
            return [self.submit(m, codec=codec, round=round) for m in msgs]
        # One batch: every device's download, work and upload land on its own timeline as
        # they would one by one (the hub's sends do not queue), so the clock is unchanged.
        return self._submitted(
            msgs, round, lambda: self.inner.submit_many(msgs, codec=codec, round=round)
        )

    def _submitted(
        self, msgs: list[Message], round: int | None, submit: Callable[[], list[Future]]
    ) -> list[Future]:
        at = self.sim.clock.free_at(msgs[0].sender)
        outer = self._rounds
        self._rounds = {m.receiver: round for m in msgs} if round is not None else {}
        try:
            futures = submit()
        finally:
            self._rounds = outer
        for msg, fut in zip(msgs, futures):
            fut.submitted_at = at
            reply = fut.result()
            if reply.ok:
                reply.arrival = self.sim.clock.arrival(msg.sender, msg.receiver)
        return futures

    def gather(
        self, futures: list[Future], *, quorum: int | None = None, deadline_s: float | None = None
    ) -> Gathered:
        replies = [f.result() for f in futures]
        if not futures:
            return Gathered(replies, closed_at=self.sim.clock.free_at(SERVER))
        server = futures[0].request.sender
        t0 = min(f.submitted_at for f in futures if f.submitted_at is not None)
        rnd = futures[0].round or 0
        ok = [r for r in replies if r.ok]
        for reply, why in zip(ok, self._shape(ok, t0, rnd)):
            if why is not None:
                reply.outcome, reply.error = "failed", why
        failed = [r.role for r in replies if r.outcome == "failed"]
        outcome = self.sim.clock.round_end(
            [r.role for r in replies],
            quorum=min(quorum, len(replies)) if quorum is not None else None,
            deadline=t0 + deadline_s if deadline_s is not None else None,
            failed=failed,
            server=server,
        )
        reported = set(outcome.reported)
        for r in replies:
            if r.ok and r.role not in reported:
                r.outcome, r.error = "late", "arrived after the round closed"
        return Gathered(replies, closed_at=outcome.end_time)

    def _shape(self, ok: list[Reply], t0: float, rnd: int) -> list[str | None]:
        """The dispatch shaper (SimDC's traffic controller): reports reach the server in batches
        or at a rate, so a report counts from its release time; a dropped one is a failure."""
        shaper, clock = self.sim.shaper, self.sim.clock
        why: dict[str, str] = {}
        if shaper is not None and ok:
            ready = [clock.free_at(r.role) for r in ok]
            for reply, t in zip(ok, shaper.release(ready, origin=t0, round=rnd)):
                if t is None:
                    why[reply.role] = "dropped by the dispatch shaper"
                else:
                    clock.compute(reply.role, 0.0, after=t, label="dispatch-wait")
        return [why.get(r.role) for r in ok]

    def send(self, msg: Message, *, codec: str | None = None) -> None:
        self.inner.send(msg, codec=codec)

    def connected(self, role_ids: list[str], *, round: int) -> list[str]:
        if self.availability == "random":  # random drops are not known in advance: mid-round
            return list(role_ids)
        t = self.sim.clock.free_at(SERVER)
        return [r for r in role_ids if self.sim.online(r, round, t)]

    def wait(self, seconds: float, *, label: str = "idle") -> None:
        self.sim.charge(SERVER, 0.0, after=self.sim.clock.free_at(SERVER) + seconds, label=label)
