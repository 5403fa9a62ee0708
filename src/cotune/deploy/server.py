"""The server's side of a gRPC run: the engine that carries messages to remote roles and the
node host that starts roles on device processes.

Devices' roles live behind ``RemoteRole`` proxies. ``GrpcEngine`` is the in-process engine for
the server's own roles and, for a remote receiver, encodes and counts the message exactly as
``LocalEngine`` does, sends the bytes, and waits for the reply; while it waits, it serves what
devices send (their own messages to server roles, their nested requests, their meter reports)
in arrival order on this one thread, so a run is as deterministic as on one machine.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING, Any

from cotune.deploy.frames import (
    DONE,
    ERROR,
    MEASURE,
    METER,
    REPLY,
    REQUEST,
    RESTORE,
    SEND,
    SNAPSHOT,
    START,
    TICK,
    Frame,
)
from cotune.deploy.states import dump_state, load_state
from cotune.deploy.transport import Closed
from cotune.errors import DivergenceError, PeerUnavailable, ProtocolError
from cotune.runtime.engine import Role
from cotune.runtime.local import LocalEngine
from cotune.runtime.messages import Message, decode_message, encode_message

if TYPE_CHECKING:
    from cotune.deploy.transport import Hub

log = logging.getLogger(__name__)


class RemoteRole(Role):
    """A role that lives on a device process; every call is a frame on its node's stream."""

    def __init__(self, role_id: str, engine: GrpcEngine, factory: str) -> None:
        super().__init__(role_id)
        self.engine, self.factory = engine, factory
        self.last_state: Any = None  # its state as last seen (checkpoints of a gone device)

    def handle(self, msg: Message) -> Message | None:
        raise ProtocolError(f"{self.role_id} is remote: messages go through the engine")

    def local_event(self, kind: str, meta: dict[str, Any]) -> Any:
        done = self.engine.control(self.role_id, TICK, {"kind": kind, "meta": meta})
        return done.header.get("result")

    def snapshot(self) -> Any:
        try:
            self.last_state = load_state(self.engine.control(self.role_id, SNAPSHOT, {}).payload)
        except PeerUnavailable:
            if self.last_state is None:
                raise
            log.warning("%s is away: its last known state stands in", self.role_id)
        return self.last_state

    def restore(self, state: Any) -> None:
        self.last_state = state
        self.engine.control(self.role_id, RESTORE, {}, dump_state(state))

    def measurements(self) -> dict[str, float]:
        try:
            values = self.engine.control(self.role_id, MEASURE, {}).header.get("values", {})
        except PeerUnavailable:
            return {}  # host measurements of a node that is away: none
        return {k: float(v) for k, v in values.items()}


class GrpcEngine(LocalEngine):
    """``LocalEngine`` for the server's roles, frames on a stream for remote ones."""

    colocated = False

    def __init__(self, hub: Hub, codec: str = "fp32") -> None:
        super().__init__(codec=codec)
        self.hub = hub
        self.seq = itertools.count(1)
        self.done: dict[int, Frame] = {}
        self.gone: set[str] = set()  # nodes whose stream ended
        self.links_seen: dict[str, Any] = {}  # the stream each remote role was started on
        self.grid: Any = None  # the EngineGrid over this engine (its sink: the simulator's)

    def close(self) -> None:
        self.hub.close()

    # --- remote roles ------------------------------------------------------------------
    def start_remote(self, role_id: str, factory: Any) -> RemoteRole:
        path = f"{factory.__module__}:{factory.__qualname__}"
        self.control(role_id, START, {"factory": path})
        role = RemoteRole(role_id, self, path)
        self.register(role)
        self.links_seen[role_id] = self.hub.links[role_id]
        return role

    def control(self, node: str, kind: int, header: dict[str, Any], payload: bytes = b"") -> Frame:
        """A control call on ``node`` (start a role, a local event, the measurement channel):
        send, then serve until its completion arrives."""
        seq = next(self.seq)
        self._link(node).send(Frame(kind, {**header, "seq": seq, "role": node}, payload))
        return self._wait(node, seq)

    def _link(self, node: str) -> Any:
        link = self.hub.links.get(node)
        if link is not None and link.open and link is not self.links_seen.get(node, link):
            self._rejoin(node, link)  # it came back on a new stream
        if link is None or not link.open or node in self.gone:
            raise PeerUnavailable(f"{node} is not connected")
        return link

    def _rejoin(self, node: str, link: Any) -> None:
        """A device that reconnected: build its role again and give it its last known state."""
        role = self._roles.get(node)
        self.links_seen[node] = link
        self.gone.discard(node)
        if not isinstance(role, RemoteRole):
            return
        log.info("%s rejoined: restarting its role from its last known state", node)
        self.control(node, START, {"factory": role.factory})
        if role.last_state is not None:
            self.control(node, RESTORE, {}, dump_state(role.last_state))

    def _exchange(self, msg: Message, codec: str | None) -> Message | None:
        role = self._receiver(msg)
        if not isinstance(role, RemoteRole):
            return super()._exchange(msg, codec)
        chosen = self._codec_for(msg, codec)
        data = encode_message(msg, chosen)
        sent = self._record(msg, len(data), chosen)
        arrival = None
        if self.on_deliver is not None:  # the simulator's arrival stamp, computed here
            stub = Message(msg.kind, msg.sender, msg.receiver)
            self.on_deliver(stub)
            arrival = stub.arrival
        seq = next(self.seq)
        header = {"seq": seq, "codec": chosen, "arrival": arrival}
        self._link(msg.receiver).send(Frame(REQUEST, header, data))
        frame = self._wait(msg.receiver, seq)
        if not frame.payload:
            return None
        try:
            reply = decode_message(frame.payload)
        except ProtocolError as err:
            raise PeerUnavailable(f"{msg.receiver} sent a malformed reply: {err}") from None
        if reply.sender != msg.receiver or reply.receiver != msg.sender:
            raise PeerUnavailable(
                f"{msg.receiver} answered {msg.describe()} with {reply.describe()}"
            )
        if self.before_reply is not None:
            why = self.before_reply(role.role_id, msg, reply)
            if why is not None:
                raise PeerUnavailable(why)
        self._record(reply, len(frame.payload), chosen, in_reply_to=sent.seq)
        reply = self._place(reply)
        if self.on_deliver is not None:
            self.on_deliver(reply)
        return reply

    # --- serving while waiting ---------------------------------------------------------
    def _wait(self, node: str, seq: int) -> Frame:
        while seq not in self.done:
            if node in self.gone:
                raise PeerUnavailable(f"{node} disconnected")
            src, frame = self.hub.inbound.get()
            self._dispatch(src, frame)
        frame = self.done.pop(seq)
        if frame.type == ERROR:
            error = str(frame.header.get("error", "unknown error"))
            if frame.header.get("divergence"):
                raise DivergenceError(error, step=frame.header.get("step"))
            raise ProtocolError(f"{node} failed: {error}")
        return frame

    def _dispatch(self, node: str, frame: Frame | Closed) -> None:
        if isinstance(frame, Closed):
            if frame.link is self.links_seen.get(node):  # the stream its role lives on
                log.warning("%s disconnected", node)
                self.gone.add(node)
            return
        if frame.type in (REPLY, DONE, ERROR) and "seq" in frame.header:
            self.done[int(frame.header["seq"])] = frame
        elif frame.type == METER:
            self._meter(node, frame.header)
        elif frame.type in (SEND, REQUEST):
            self._from_device(node, frame)
        else:
            log.warning("%s sent an unexpected %s frame: ignored", node, frame.describe())

    def _meter(self, node: str, h: dict[str, Any]) -> None:
        sink = self.grid.sink if self.grid is not None else None
        if sink is None:
            return
        role = str(h.get("role", node))
        if h.get("what") == "memory":
            from cotune.sim.memory import MemoryEstimate

            est = MemoryEstimate(**h["estimate"])
            sink.memory(role, str(h["key"]), lambda: est)
        else:
            sink.compute(role, float(h["flops"]), round=int(h.get("round", 0)),
                              after=h.get("after"), waits_for=h.get("waits_for"),
                              label=str(h.get("label", "")))  # fmt: skip

    def _from_device(self, node: str, frame: Frame) -> None:
        """A device's own message (a send, or a request it waits on), carried as if it were
        sent here: encoded, counted and delivered exactly once."""
        try:
            msg = decode_message(frame.payload)
            if msg.sender != node:
                raise ProtocolError(f"{node} sent a message claiming to be from {msg.sender!r}")
        except ProtocolError as err:
            log.warning("dropped a bad message from %s: %s", node, err)
            if frame.type == REQUEST:
                self._link(node).send(
                    Frame(ERROR, {"seq": frame.header.get("seq"), "error": str(err)})
                )
            return
        codec = frame.header.get("codec")
        if frame.type == SEND:
            self.send(msg, codec=codec)
            for late in self.pull(node):  # a handler that answered a one-way message
                self._link(node).send(
                    Frame(SEND, {"codec": codec}, encode_message(late, codec or self.codec))
                )
            return
        seq = frame.header.get("seq")
        try:
            reply = self.request(msg, codec=codec)
        except PeerUnavailable as err:
            self._link(node).send(
                Frame(ERROR, {"seq": seq, "error": str(err), "unavailable": True})
            )
            return
        header = {"seq": seq, "arrival": reply.arrival}
        self._link(node).send(Frame(REPLY, header, encode_message(reply, codec or self.codec)))
