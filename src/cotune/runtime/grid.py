"""The Grid: a driver's only view of the other roles (in the spirit of Flower's ``Grid``).

A paradigm's driver runs on the server node. It starts roles on their nodes (``start``: the
engine builds each role from its own ``NodeContext``), talks to them only with messages
(``submit`` → ``Future``, ``gather``, one-way ``send``), and reads them for measurement only
through ``snapshot`` / ``measurements`` (never counted as traffic). Timeouts and failures are
data: ``gather`` returns one ``Reply`` per future with an outcome (``ok`` / ``failed`` /
``late``) and never raises because a peer failed.

``EngineGrid`` (``engine_grid.py``) implements the contract over any message ``Engine`` (local,
isolated, gRPC and Ray). ``cotune.sim.grid.SimulatedGrid`` wraps a grid and
puts everything on the virtual clock; paradigms never see the clock.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from cotune.errors import PeerUnavailable
from cotune.runtime.messages import Message
from cotune.runtime.node import Meter, NodeContext

if TYPE_CHECKING:
    from cotune.runtime.engine import Listener, Role

Outcome = Literal["ok", "failed", "late"]
RoleFactory = Callable[[NodeContext], "Role"]


@dataclass
class Reply:
    """What came back for one submitted message."""

    role: str
    outcome: Outcome
    message: Message | None = None
    error: str | None = None
    arrival: float | None = None  # when it reached the sender (simulated seconds; None if real)

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


@dataclass
class Future:
    """A submitted message's pending reply. In-process engines resolve it at once."""

    request: Message
    round: int | None = None
    submitted_at: float | None = None  # simulated seconds (SimulatedGrid), else None
    _reply: Reply | None = field(default=None, repr=False)

    def done(self) -> bool:
        return self._reply is not None

    def result(self) -> Reply:
        if self._reply is None:
            raise RuntimeError(f"no reply yet for {self.request.describe()}")
        return self._reply


@dataclass
class Gathered:
    """The replies of one ``gather``, in submission order, and when the wait ended."""

    replies: list[Reply]
    closed_at: float | None = None  # simulated seconds when the gather closed (None if real)

    def with_outcome(self, outcome: Outcome) -> list[Reply]:
        return [r for r in self.replies if r.outcome == outcome]

    @property
    def ok(self) -> list[Reply]:
        return self.with_outcome("ok")


class NodeHost(Protocol):
    """Builds node contexts: which nodes exist, what each holds (engine-specific)."""

    isolated: bool  # every node holds its own copy of everything (no shared Python object)

    def node_ids(self) -> list[str]: ...

    def info(self, role_id: str) -> dict[str, Any]: ...

    def context(self, role_id: str, *, grid: Grid, meter: Meter) -> NodeContext: ...

    def device_of(self, role_id: str) -> Any:
        """The torch device node ``role_id`` computes on (decoded messages land there)."""
        ...


class Grid(ABC):
    """The contract every engine implements for drivers (and for nested calls from roles)."""

    #: Roles share this process and its model objects: a role class may batch colocated
    #: roles' work (splitfed's device cohort). False on ``isolated`` and network engines.
    colocated: bool = False

    @abstractmethod
    def node_ids(self, prefix: str = "device-") -> list[str]:
        """The nodes of this run whose id starts with ``prefix``, connected or not."""

    @abstractmethod
    def node_info(self, role_id: str) -> dict[str, Any]:
        """What a node declared when it joined (``examples``: the size of its data)."""

    @abstractmethod
    def start(self, role_id: str, factory: RoleFactory) -> None:
        """Build a role on node ``role_id`` from that node's own context."""

    @abstractmethod
    def context(self, role_id: str) -> NodeContext:
        """A node context for a role the driver keeps on its own node (the server's)."""

    @abstractmethod
    def meter(self, role_id: str) -> Meter:
        """The compute meter of node ``role_id`` (the driver reports its own work on it)."""

    @abstractmethod
    def submit(self, msg: Message, *, codec: str | None = None, round: int | None = None) -> Future:
        """Send ``msg`` as a request. ``round``: it belongs to that federated round, so the
        receiver may drop out of it (the reply is then ``failed``)."""

    def submit_many(
        self, msgs: list[Message], *, codec: str | None = None, round: int | None = None
    ) -> list[Future]:
        """``submit`` each message (a round's requests, sent together). An engine whose roles
        are colocated may let their class answer them in one batch (``batch_on_<kind>``:
        several simulated devices' work as one computation); the messages are the same."""
        return [self.submit(m, codec=codec, round=round) for m in msgs]

    @abstractmethod
    def gather(
        self, futures: list[Future], *, quorum: int | None = None, deadline_s: float | None = None
    ) -> Gathered:
        """Wait for the replies as a round: closes at the ``quorum``-th reply or ``deadline_s``
        after the first submission; later replies are ``late``. Never raises for a peer."""

    @abstractmethod
    def tick(self, role_ids: list[str], kind: str, meta: dict[str, Any] | None = None) -> list[Any]:
        """A node-local event on each of ``role_ids``: its own loop deciding to do ``kind``
        now (a split device's next step). Nothing travels and nothing is counted; on a network
        engine it is the device's own loop. Calls ``tick_<kind>(meta)`` on each role, or, where
        the roles share this process (``colocated``) and their class offers a batched handler
        ``batch_<kind>(roles, meta)``, that once. Returns each role's result (measurement)."""

    @abstractmethod
    def host(self, role: Role) -> None:
        """Register a role the driver built on its own node (``context(SERVER)``), so other
        roles' messages reach it."""

    @abstractmethod
    def send(self, msg: Message, *, codec: str | None = None) -> None:
        """One-way: deliver ``msg``; a reply, if the handler gives one, waits in the sender's
        inbox (the engine's ``pull``)."""

    def request(self, msg: Message, *, codec: str | None = None) -> Message:
        """One request, its reply; a failed peer is a ``PeerUnavailable``."""
        reply = self.submit(msg, codec=codec).result()
        if not reply.ok or reply.message is None:
            raise PeerUnavailable(reply.error or f"{msg.receiver} did not answer")
        return reply.message

    def request_many(
        self, msgs: Iterable[Message], *, codec: str | None = None, together: bool = False
    ) -> list[Message]:
        """Requests answered in order, without round semantics; a failed peer is a
        ``PeerUnavailable``. One after another by default: each request leaves once the one
        before was answered, so a receiver may call back into the sender's node while it
        works (DLoRA's devices ask the cloud). ``together``: the receivers work at once (on a
        network engine, in parallel), as ``submit_many`` sends a round, counted the same way
        (every request, then every reply); only for receivers that neither call back nor
        depend on each other's work, where the simulated clock is that of one by one."""
        msgs = list(msgs)
        if not together:
            return [self.request(m, codec=codec) for m in msgs]
        replies = [f.result() for f in self.submit_many(msgs, codec=codec)]
        for m, reply in zip(msgs, replies):
            if not reply.ok or reply.message is None:
                raise PeerUnavailable(reply.error or f"{m.receiver} did not answer")
        return [r.message for r in replies if r.message is not None]

    def close(self) -> None:  # noqa: B027 - optional hook: in-process grids hold nothing
        """The run is over: release the nodes (nothing to do in-process)."""

    def connected(self, role_ids: list[str], *, round: int) -> list[str]:
        """Those of ``role_ids`` that can be reached at the start of ``round``."""
        return list(role_ids)

    def wait(self, seconds: float, *, label: str = "idle") -> None:  # noqa: B027 - optional
        """The driver has nothing to do for ``seconds`` (nobody connected, ...)."""

    @abstractmethod
    def snapshot(self, role_id: str) -> Any:
        """Measurement: the role's state (for evaluation and checkpoints), not counted."""

    def snapshots(self, role_ids: list[str]) -> dict[str, Any]:
        """Measurement: the states of those of ``role_ids`` that have one (a checkpoint's):
        a role started but never used yet is left out (it holds only its initial state, which
        it rebuilds itself; ``restore(role, None)`` leaves it so)."""
        return {r: self.snapshot(r) for r in role_ids}

    @abstractmethod
    def restore(self, role_id: str, state: Any) -> None:
        """Measurement: put a checkpointed state back into the role (resume); ``None``: the
        checkpoint holds none (the role was never used), so there is nothing to put back."""

    @abstractmethod
    def measurements(self, role_id: str) -> dict[str, float]:
        """Measurement: host-side numbers a role keeps (e.g. its training host seconds)."""

    # --- accounting, as the engine keeps it -----------------------------------------------
    @property
    @abstractmethod
    def transfers(self) -> Any: ...

    @abstractmethod
    def add_listener(self, listener: Listener) -> None: ...
