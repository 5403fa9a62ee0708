"""How the gRPC server serves devices while it waits on one (``DeviceFrames``, a part of
``GrpcEngine``): frames are taken per node in the order they were asked for, replies matched to
the sequence numbers only that node was asked, meter reports checked and charged to the
simulator, and a device's own messages (a send, or a request it waits on) carried as if sent
here. Everything a peer sends is checked first; a bad frame is logged and dropped (a request
answered with an ERROR), never the run's end."""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from typing import Any

from cotune.deploy.frames import (
    DONE,
    ERROR,
    METER,
    REPLY,
    REQUEST,
    SEND,
    Frame,
)
from cotune.deploy.peer_input import check_codec
from cotune.deploy.transport import Closed
from cotune.errors import DivergenceError, PeerUnavailable, ProtocolError
from cotune.jsonsafe import is_count
from cotune.runtime.message_decode import decode_message
from cotune.runtime.messages import encode_message_pieces
from cotune.runtime.validate import finite_number

log = logging.getLogger(__name__)


class DeviceFrames:
    """Serving devices' frames; mixed into ``GrpcEngine``, whose state (``hub``, ``done``,
    ``asked``, ``gone``, ``pending``, ...) and send / request / pull it uses."""

    def _wait(self, node: str, seq: int) -> Frame:
        """Serve ``node``'s frames, in order, until ``seq`` completes. Other nodes' frames wait
        in their own queues until this engine waits on them, so roles working in parallel
        (a round's devices) are still heard one after another, in the order they were asked."""
        while seq not in self.done:
            if node in self.gone:
                raise PeerUnavailable(f"{node} disconnected")
            self._dispatch(node, self._next_from(node))
        frame = self.done.pop(seq)
        self.asked.pop(seq, None)
        if frame.type == ERROR:
            error = str(frame.header.get("error", "unknown error"))
            if frame.header.get("divergence"):
                raise DivergenceError(error, step=frame.header.get("step"))
            raise ProtocolError(f"{node} failed: {error}")
        return frame

    def _next_from(self, node: str) -> Frame | Closed:
        queued = self.pending.get(node)
        if queued:
            return queued.popleft()
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            waited = time.perf_counter()
            try:
                src, frame = self.hub.inbound.get(timeout=max(0.0, min(left, 5.0)))
            except queue.Empty:
                self.idle_s += time.perf_counter() - waited
                link = self.hub.links.get(node)
                if left <= 0 or link is None or not link.open:
                    log.warning("%s: no answer in %.0f s (engine.request_timeout_s): gone", node,
                                self.timeout_s)  # fmt: skip
                    self.gone.add(node)
                    raise PeerUnavailable(
                        f"{node} did not answer within {self.timeout_s:.0f} s"
                    ) from None
                continue
            self.idle_s += time.perf_counter() - waited
            if src == node:
                return frame
            self.pending.setdefault(src, deque()).append(frame)

    def _dispatch(self, node: str, frame: Frame | Closed) -> None:
        if isinstance(frame, Closed):
            if frame.link is self.links_seen.get(node):  # the stream its role lives on
                log.warning("%s disconnected", node)
                self.gone.add(node)
            return
        if frame.type in (REPLY, DONE, ERROR) and "seq" in frame.header:
            seq = frame.header["seq"]
            if type(seq) is not int or self.asked.get(seq) != node:
                log.warning("%s sent a %s for %r, which was not asked of it: dropped", node,
                            frame.describe(), seq)  # fmt: skip
                return
            self.done[seq] = frame
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
        role = h.get("role", node)
        try:
            if role != node:  # a node reports its own work only
                raise ValueError(f"a report for {role!r}")
            if h.get("what") == "memory":
                from cotune.sim.memory import MemoryEstimate

                est = MemoryEstimate(**h["estimate"])
                key = h["key"]
                sizes = [est.weights, est.grads, est.optimizer, est.activations, est.total]
                if not isinstance(key, str) or not all(map(is_count, sizes)):
                    raise ValueError(f"key={key!r}, estimate={h['estimate']!r}")
                if est.measured is not None and type(est.measured) is not int:
                    raise ValueError(f"measured={est.measured!r}")
                sink.memory(role, key, lambda: est)
                return
            flops, rnd = h["flops"], h.get("round", 0)
            if type(rnd) is not int or not (finite_number(flops) and flops >= 0):
                raise ValueError(f"flops={flops!r}, round={rnd!r}")
            after = h.get("after")
            if after is not None and not finite_number(after):
                raise ValueError(f"after={after!r}")
            waits_for = h.get("waits_for")
            if waits_for is not None and not isinstance(waits_for, str):
                raise ValueError(f"waits_for={waits_for!r}")
        except (KeyError, TypeError, ValueError) as err:  # a peer's bad report: not the run's end
            log.warning("dropped a bad meter report from %s: %s", node, err)
            return
        sink.compute(role, float(flops), round=rnd, after=after, waits_for=waits_for,
                     label=str(h.get("label", "")))  # fmt: skip

    def _from_device(self, node: str, frame: Frame) -> None:
        """A device's own message (a send, or a request it waits on), carried as if it were
        sent here: encoded, counted and delivered exactly once."""
        try:
            msg = decode_message(frame.payload)
            if msg.sender != node:
                raise ProtocolError(f"{node} sent a message claiming to be from {msg.sender!r}")
            for asked in (frame.header.get("codec"), msg.meta.get("codec")):
                check_codec(asked)
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
                    Frame(SEND, {"codec": codec}, encode_message_pieces(late, codec or self.codec))
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
        self._link(node).send(
            Frame(REPLY, header, encode_message_pieces(reply, codec or self.codec))
        )
