"""``EngineGrid``: the Grid contract (``cotune.runtime.grid``) over a message ``Engine`` whose
roles it builds from their nodes' contexts: futures settled in submission order, a round's
requests sent together (and, where the engine can, as one batched handler: device cohorts),
failures turned into outcomes. The local, isolated, gRPC and Ray engines all run under it.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from cotune.errors import PeerUnavailable, ProtocolError
from cotune.runtime.messages import Message
from cotune.runtime.node import Meter, MeterSink, NodeContext

if TYPE_CHECKING:
    from cotune.runtime.engine import Engine, Listener, Role
    from cotune.sim.costs import FlopCounter

from cotune.runtime.grid import Future, Gathered, Grid, NodeHost, Reply, RoleFactory


class EngineGrid(Grid):
    """The Grid over a message ``Engine`` whose roles run in this process (``local`` and
    ``isolated``): requests are exchanged synchronously, in submission order."""

    def __init__(self, engine: Engine, host: NodeHost, flops: FlopCounter) -> None:
        self.engine, self.nodes, self.flops = engine, host, flops
        self.colocated = engine.colocated and not host.isolated
        # A host that places no node elsewhere (all on the CPU) may leave device_of out.
        engine.placement = getattr(host, "device_of", None)
        self.sink: MeterSink | None = None  # set by a SimulatedGrid before roles start
        # The grid roles get for nested calls: the outermost wrapper (the simulated grid), so
        # a role's own requests are simulated exactly like the driver's.
        self.outer: Grid = self
        self._pending: dict[str, RoleFactory] = {}  # started, not built yet (see ``start``)

    def node_ids(self, prefix: str = "device-") -> list[str]:
        return [n for n in self.nodes.node_ids() if n.startswith(prefix)]

    def node_info(self, role_id: str) -> dict[str, Any]:
        return self.nodes.info(role_id)

    def meter(self, role_id: str) -> Meter:
        return Meter(role_id, self.flops, self.sink)

    def context(self, role_id: str) -> NodeContext:
        return self.nodes.context(role_id, grid=self.outer, meter=self.meter(role_id))

    def start(self, role_id: str, factory: RoleFactory) -> None:
        """The role is built on first use (a message, a local event, a snapshot): a device
        that is never sampled costs nothing, so a population of 100,000 devices costs what the
        devices that trained do. Building it later gives the same role, since a role's
        initial state depends only on its node (its seed, its shard, the run's initial
        adapter values), never on when it was built."""
        if getattr(self.nodes, "is_remote", None) is not None and self.nodes.is_remote(role_id):
            self.nodes.start_remote(role_id, factory)  # built on its own machine
            return
        if role_id in self._pending or role_id in self.engine.roles:
            raise ProtocolError(f"role {role_id!r} is already registered")
        prepare = getattr(self.nodes, "prepare", None)
        if prepare is not None:
            prepare(role_id)  # checks the node exists; what a node copies, copied now
        self._pending[role_id] = factory

    def _build(self, role_id: str, factory: RoleFactory) -> Role:
        from cotune.runtime.local import build_on_node

        role = build_on_node(factory, self.context(role_id))
        if role.role_id != role_id:
            raise ProtocolError(f"factory for {role_id!r} built a role named {role.role_id!r}")
        self.engine.register(role)
        return role

    def submit(self, msg: Message, *, codec: str | None = None, round: int | None = None) -> Future:
        fut = Future(msg, round)
        self._deliverable(msg)
        try:
            fut._reply = Reply(msg.receiver, "ok", self.engine.request(msg, codec=codec))
        except PeerUnavailable as err:
            fut._reply = Reply(msg.receiver, "failed", error=str(err))
        return fut

    def pipelines(self, msgs: list[Message]) -> bool:
        """Whether ``submit_many(msgs)`` sends them all before the first reply."""
        return (
            len(msgs) > 1
            and len({m.receiver for m in msgs}) == len(msgs)
            and hasattr(self.engine, "request_batch")
        )

    def batch_handler(self, msgs: list[Message]) -> Any:
        """The class-level ``batch_on_<kind>`` that may answer ``msgs`` together (None: not
        here: roles on their own nodes, one message, mixed kinds or role types, no handler)."""
        if not self.colocated or not self.pipelines(msgs) or len({m.kind for m in msgs}) != 1:
            return None
        roles = [self._role(m.receiver) for m in msgs]
        if len({type(r) for r in roles}) != 1:
            return None
        cls, kind = type(roles[0]), msgs[0].kind
        batch = getattr(cls, f"batch_on_{kind}", None)
        # The class may decline these roles (its own options say one by one): then nothing,
        # not even the order of the transfers, differs from submitting them one by one.
        wants = getattr(cls, f"can_batch_{kind}", None)
        if batch is None or (wants is not None and not wants(roles)):
            return None
        return lambda delivered: batch(roles, delivered)

    def submit_many(
        self, msgs: list[Message], *, codec: str | None = None, round: int | None = None
    ) -> list[Future]:
        """All requests leave, the receivers work (in parallel where they can: a batch on
        colocated roles, separate processes on a network engine), the replies come back in
        order. Counted and simulated the same on every engine: every request, then every
        reply; the receivers must not depend on each other's work within one call."""
        if not self.pipelines(msgs):
            return [self.submit(m, codec=codec, round=round) for m in msgs]
        for m in msgs:
            self._deliverable(m)
        handler = self.batch_handler(msgs)
        if handler is None:
            roles = [self._role(m.receiver) for m in msgs]
            handler = lambda delivered: [r.handle(d) for r, d in zip(roles, delivered)]  # noqa: E731
        futures = []
        for m, answer in zip(msgs, self.engine.request_batch(msgs, handler, codec=codec)):
            fut = Future(m, round)
            if isinstance(answer, PeerUnavailable):
                fut._reply = Reply(m.receiver, "failed", error=str(answer))
            else:
                fut._reply = Reply(m.receiver, "ok", answer)
            futures.append(fut)
        return futures

    def gather(
        self, futures: list[Future], *, quorum: int | None = None, deadline_s: float | None = None
    ) -> Gathered:
        replies = [f.result() for f in futures]
        if quorum is not None:  # no clock: the first `quorum` answers in submission order
            seen = 0
            for r in replies:
                if r.ok:
                    seen += 1
                    if seen > quorum:
                        r.outcome = "late"
        return Gathered(replies)

    def send(self, msg: Message, *, codec: str | None = None) -> None:
        self.engine.send(self._deliverable(msg), codec=codec)

    def tick(self, role_ids: list[str], kind: str, meta: dict[str, Any] | None = None) -> list[Any]:
        roles = [self._role(r) for r in role_ids]
        if not roles:
            return []
        meta = dict(meta or {})
        batch = getattr(type(roles[0]), f"batch_{kind}", None)
        if self.colocated and batch is not None and len({type(r) for r in roles}) == 1:
            return list(batch(roles, meta))
        many = getattr(self.engine, "tick_many", None)
        if many is not None and len(roles) > 1 and all(hasattr(r, "local_event") for r in roles):
            return list(many([r.role_id for r in roles], kind, meta))  # remote: in parallel
        out = []
        for role in roles:
            remote = getattr(role, "local_event", None)  # a role on another machine
            if remote is not None:
                out.append(remote(kind, meta))
                continue
            out.append(role.local_tick(kind, meta))
        return out

    def host(self, role: Role) -> None:
        self.engine.register(role)

    def _role(self, role_id: str) -> Role:
        role = self.engine.roles.get(role_id)
        if role is not None:
            return role
        factory = self._pending.pop(role_id, None)
        if factory is None:
            raise ProtocolError(f"no role {role_id!r} was started on this grid")
        return self._build(role_id, factory)

    def _deliverable(self, msg: Message) -> Message:
        """``msg``, its receiver built if it was only started."""
        if msg.receiver in self._pending:
            self._role(msg.receiver)
        return msg

    def close(self) -> None:
        """End the run on every node (a network engine says goodbye to its devices)."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    def snapshots(self, role_ids: list[str]) -> dict[str, Any]:
        out = {}
        for r in role_ids:
            if r in self._pending:
                continue
            role = self._role(r)
            peek = getattr(role, "snapshot_if_built", None)  # a remote role (its node may not
            if peek is not None:  # have built it yet): what it sends is a copy already
                state = peek()
            else:
                state = role.snapshot()
                state = copy.deepcopy(state) if self.nodes.isolated else state
            if state is not None:
                out[r] = state
        return out

    def snapshot(self, role_id: str) -> Any:
        state = self._role(role_id).snapshot()
        # Isolated nodes share nothing, not even with the experimenter's view of them.
        return copy.deepcopy(state) if self.nodes.isolated else state

    def restore(self, role_id: str, state: Any) -> None:
        if state is None:  # a checkpoint holds no state of this role: it starts afresh
            return
        self._role(role_id).restore(copy.deepcopy(state) if self.nodes.isolated else state)

    def measurements(self, role_id: str) -> dict[str, float]:
        return dict(self._role(role_id).measurements())

    @property
    def transfers(self) -> Any:
        return self.engine.transfers

    def add_listener(self, listener: Listener) -> None:
        self.engine.add_listener(listener)
