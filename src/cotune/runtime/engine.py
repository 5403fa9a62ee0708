"""Roles and the abstract engine that carries Messages between them.

Delivery semantics (shared by every engine):

* ``request(msg)`` delivers ``msg`` to its receiver and returns the handler's reply; a handler
  that returns ``None`` to a request is a ``ProtocolError``.
* ``request_many(msgs)`` does the same for several messages and returns the replies in order
  (an in-process engine runs them one after another; a distributed one may overlap them).
* ``send(msg)`` is one-way. If the handler replies anyway, the reply is still encoded and
  counted, then queued in the sender's inbox, which ``pull(role_id)`` drains.

Senders need not be registered (a paradigm's driver loop may speak as ``"server"``); receivers
must be. Every message and every reply is encoded, and each encoding is one :class:`Transfer`
in ``engine.transfers`` (a ``TransferLog``: totals of all, the last million in full); listeners see each transfer as it happens, so a simulated clock can
place the request before the handler's work and the reply after it.

Codec choice per message: ``msg.meta["codec"]`` if present, else the ``codec`` argument of the
call (it applies to the request and its reply), else the engine's default.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from cotune.errors import DivergenceError, ProtocolError
from cotune.runtime.codecs import get_codec
from cotune.runtime.messages import Message
from cotune.runtime.transfers import TransferLog

#: Scalar meta entries copied into each Transfer, so cost accounting can group by them.
TRANSFER_META_KEYS = ("round", "step", "epoch", "layer", "group", "phase")


def place_message(msg: Message, device: Any) -> Message:
    """``msg`` with its tensors moved to ``device`` (decoded tensors are on the CPU)."""
    if device is not None and device.type != "cpu":
        msg.tensors = {k: v.to(device) for k, v in msg.tensors.items()}
    return msg


class Role:
    """A participant (device, server, group). Subclasses implement ``on_<kind>(msg)``."""

    def __init__(self, role_id: str) -> None:
        self.role_id = role_id

    def handle(self, msg: Message) -> Message | None:
        """Dispatch ``msg`` to ``on_<kind>``; return its reply (or ``None``)."""
        if msg.receiver != self.role_id:
            raise ProtocolError(f"{msg.describe()} was handed to role {self.role_id!r}")
        handler = getattr(self, f"on_{msg.kind}", None)
        if not callable(handler):
            known = sorted(a[3:] for a in dir(self) if a.startswith("on_"))
            raise ProtocolError(
                f"role {self.role_id!r} ({type(self).__name__}) cannot handle {msg.describe()}; "
                f"kinds it handles: {', '.join(known) or '(none)'}"
            )
        with self.in_role():
            return handler(msg)

    def local_tick(self, kind: str, meta: dict[str, Any]) -> Any:
        """Run the node-local event ``kind`` (``tick_<kind>(meta)``), as ``handle`` runs a
        message: an unknown event is a ``ProtocolError``, a divergence names this role."""
        handler = getattr(self, f"tick_{kind}", None)
        if not callable(handler):
            raise ProtocolError(f"role {self.role_id!r} has no local event {kind!r}")
        with self.in_role():
            return handler(meta)

    @contextlib.contextmanager
    def in_role(self) -> Iterator[None]:
        """This role's work (a handler, a local event, what a driver calls on its own role):
        the trainer knows a divergence's step, the role adds its name."""
        try:
            yield
        except DivergenceError as err:
            raise err.for_role(self.role_id) from None

    # --- measurement (the engine's snapshot/restore channel, never counted as traffic) ---
    def snapshot(self) -> Any:
        """The role's state, for evaluation and checkpoints."""
        raise ProtocolError(f"role {self.role_id!r} ({type(self).__name__}) keeps no state")

    def restore(self, state: Any) -> None:
        """Put a checkpointed state back."""
        raise ProtocolError(f"role {self.role_id!r} ({type(self).__name__}) keeps no state")

    def measurements(self) -> dict[str, float]:
        """Host-side numbers the role keeps (they never ride in messages)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.role_id!r})"


@dataclass(frozen=True)
class Transfer:
    """One encoded message that crossed between roles. ``nbytes`` is the encoded length."""

    seq: int
    sender: str
    receiver: str
    kind: str
    nbytes: int
    codec: str
    in_reply_to: int | None = None  # seq of the request transfer this answers
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def round(self) -> int | None:
        return self.meta.get("round")

    @property
    def step(self) -> int | None:
        return self.meta.get("step")


Listener = Callable[[Transfer], None]


class Engine(ABC):
    """Carries Messages between registered roles and records every transfer."""

    # Roles live in this process and share its model objects (lets a paradigm batch the work of
    # several simulated devices; the messages are still real).
    colocated: ClassVar[bool] = False

    def __init__(self, codec: str = "fp32") -> None:
        get_codec(codec)  # fail early on an unknown default codec
        self.codec = codec
        self.transfers = TransferLog()  # totals of all, the most recent ones in full
        self._roles: dict[str, Role] = {}
        self._listeners: list[Listener] = []
        self._inbox: dict[str, list[Message]] = defaultdict(list)
        # Asked after a handler replied, before the reply leaves: a reason to drop it (the
        # receiver went offline mid-round: the simulator decides) or None. Raises
        # PeerUnavailable in the requester.
        self.before_reply: Callable[[str, Message, Message], str | None] | None = None
        # Called with each delivered copy before its handler runs (the simulator stamps its
        # arrival time on it).
        self.on_deliver: Callable[[Message], None] | None = None
        # Where a role computes (its node's torch device; None: the CPU). Decoded tensors land
        # there, so a handler never moves what it was sent; the wire form is device-free.
        self.placement: Callable[[str], Any] | None = None

    # --- roles -------------------------------------------------------------------------
    def register(self, role: Role) -> None:
        """Add ``role``; its ``role_id`` must be unique within this engine."""
        if not isinstance(role, Role):
            raise ProtocolError(f"can only register Role instances, got {type(role).__name__}")
        if role.role_id in self._roles:
            raise ProtocolError(f"role {role.role_id!r} is already registered")
        self._roles[role.role_id] = role

    @property
    def roles(self) -> Mapping[str, Role]:
        """Registered roles by id (read-only view)."""
        return MappingProxyType(self._roles)

    def _receiver(self, msg: Message) -> Role:
        try:
            return self._roles[msg.receiver]
        except KeyError:
            raise ProtocolError(
                f"{msg.describe()}: no role {msg.receiver!r} is registered; registered roles: "
                f"{', '.join(sorted(self._roles)) or '(none)'}"
            ) from None

    # --- delivery ----------------------------------------------------------------------
    @abstractmethod
    def send(self, msg: Message, *, codec: str | None = None) -> None:
        """Deliver ``msg`` one-way; a reply, if the handler gives one, goes to the sender's inbox."""

    @abstractmethod
    def request(self, msg: Message, *, codec: str | None = None) -> Message:
        """Deliver ``msg`` and return the receiver's reply."""

    def request_many(self, msgs: Iterable[Message], *, codec: str | None = None) -> list[Message]:
        """Deliver each message and return the replies in the same order."""
        return [self.request(m, codec=codec) for m in msgs]

    def pull(self, role_id: str) -> list[Message]:
        """Drain and return the replies queued for ``role_id`` by :meth:`send`."""
        return self._inbox.pop(role_id, [])

    # --- accounting --------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(transfer)`` for every transfer from now on, in order."""
        self._listeners.append(listener)

    def _codec_for(self, msg: Message, codec: str | None) -> str:
        chosen = msg.meta.get("codec", codec if codec is not None else self.codec)
        get_codec(chosen)
        return chosen

    def _place(self, msg: Message) -> Message:
        """``msg`` with its tensors on the receiving node's device."""
        device = self.placement(msg.receiver) if self.placement is not None else None
        return place_message(msg, device)

    def _record(
        self, msg: Message, nbytes: int, codec: str, in_reply_to: int | None = None
    ) -> Transfer:
        meta = {
            k: msg.meta[k]
            for k in TRANSFER_META_KEYS
            if isinstance(msg.meta.get(k), str | int | float | bool)
        }
        t = Transfer(
            len(self.transfers),
            msg.sender,
            msg.receiver,
            msg.kind,
            nbytes,
            codec,
            in_reply_to,
            meta,
        )
        self.transfers.append(t)
        for listener in self._listeners:
            listener(t)
        return t

    def bytes_by_role(self) -> dict[str, dict[str, int]]:
        """Per role: ``up`` = bytes it sent, ``down`` = bytes it received (encoded lengths)."""
        roles = dict.fromkeys([*self._roles, *self.transfers.roles()])
        out = {}
        for r in roles:
            up, down = self.transfers.bytes_of(r)
            out[r] = {"up": up, "down": down}
        return out

    def total_bytes(self) -> int:
        """Sum of all encoded transfers."""
        return self.transfers.total_bytes
