"""A device process: dial the server, build this node from the run's config (its own shard,
its own model: the same node the ``isolated`` engine builds), host the roles the server starts
on it, answer until the run ends.

Everything runs on this process's main thread: a nested request (a DLoRA device asking the
cloud) waits by serving what else arrives meanwhile, exactly as the server does.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import time
import traceback
from pathlib import Path
from typing import Any

from cotune.deploy.device_grid import DeviceGrid
from cotune.deploy.device_inputs import check_base, own_inputs, with_chat_template
from cotune.deploy.frames import (
    BATCH,
    BYE,
    DONE,
    ERROR,
    MEASURE,
    METER,
    READY,
    REPLY,
    REQUEST,
    RESTORE,
    SEND,
    SNAPSHOT,
    START,
    TICK,
    Frame,
)
from cotune.deploy.process_info import peak_rss_bytes, process_key, process_name
from cotune.deploy.states import dump_state, load_state
from cotune.errors import CotuneError, DivergenceError, PeerUnavailable, ProtocolError
from cotune.runtime.engine import Role, place_message
from cotune.runtime.local import build_on_node
from cotune.runtime.message_decode import decode_message
from cotune.runtime.messages import Message, encode_message_pieces
from cotune.runtime.node import Meter

log = logging.getLogger(__name__)
ROLE_PACKAGES = ("cotune.paradigms.",)  # where a server may ask a device to build roles from


class DeviceRefused(CotuneError):
    """The server refused this device (credentials, a duplicate id)."""


class ForwardSink:
    """A node's meter reports, sent to the server's simulator in order (out of band)."""

    def __init__(self, dialer: Any, node: str, probes: dict[str, Any] | None = None) -> None:
        self.dialer, self.node = dialer, node
        # One probe per key and process, as the simulator's sink keeps them: a Ray host's
        # thousands of devices share one model and one batch shape.
        self.probes = probes if probes is not None else {}

    def compute(self, role: str, flops: float, *, round: int, after: float | None,
                waits_for: str | None, label: str) -> None:  # fmt: skip
        self.dialer.send(Frame(METER, {"what": "compute", "role": role, "flops": flops,
                                       "round": round, "after": after, "waits_for": waits_for,
                                       "label": label}), self.node)  # fmt: skip

    def memory(self, role: str, key: str, probe: Any) -> None:
        import dataclasses

        if key not in self.probes:
            self.probes[key] = dataclasses.asdict(probe())
        est = self.probes[key]
        self.dialer.send(Frame(METER, {"what": "memory", "role": role, "key": key,
                                       "estimate": est}), self.node)  # fmt: skip


class DeviceNode:
    """A device process's runtime: its roles, its node host, its end of the stream.

    One process may host several nodes (a Ray host: ``nodes``, sharing one frozen base when
    ``isolated`` is off, as the local engine's roles do); every frame then names its node
    (header ``node``) and every frame sent back is sent as that node's.
    """

    def __init__(
        self, dialer: Any, welcome: dict[str, Any], workdir: Path, data_file: Path | None = None,
        *, nodes: list[str] | None = None, isolated: bool = True,
    ) -> None:  # fmt: skip
        from cotune.build import build_experiment
        from cotune.config import config_from_dict
        from cotune.nodes import RunNodes

        self.dialer = dialer
        cfg = with_chat_template(config_from_dict(welcome["config"]), welcome, workdir)
        # This process builds only its own node: an in-process copy of the run's inputs, or,
        # with a data file, the run's model and tokenizer over this device's own data.
        local = cfg.model_copy(
            update={"engine": cfg.engine.model_copy(update={"kind": "isolated"})}
        )
        inputs = None if data_file is None else own_inputs(dialer.node, welcome, cfg, data_file)
        self.exp, _ = build_experiment(local, workdir, quiet=True, inputs=inputs,
                                       base_digest=welcome.get("base") is not None)  # fmt: skip
        try:
            check_base(welcome, self.exp.base_digest)  # else it would train another base
        except CotuneError:
            self.exp.grid.close()
            raise
        self.host = RunNodes(self.exp, isolated=isolated)
        self.nodes = list(nodes) if nodes is not None else [dialer.node]
        self.roles: dict[str, Role] = {}
        # Started, built on first use (as ``EngineGrid.start``): a host of 5,000 devices holds
        # the states of those that were sampled, not of all.
        self.starting: dict[str, Any] = {}
        self.probes: dict[str, Any] = {}  # memory estimates, one per key (ForwardSink)
        self.grid = DeviceGrid(self)
        self.seq = itertools.count(1)
        self.done: dict[int, Frame] = {}
        self.running = True
        self.finished = False  # the server said the run is over (not: the stream broke)
        self.busy_s = 0.0  # host seconds spent handling the server's frames
        self.batched = 0  # requests this process answered as part of a batch (a cohort)
        examples = None if inputs is None else len(inputs.data.train)
        for node in self.nodes:
            ready = {"examples": examples, "process": process_name(), "process_key": process_key()}
            self.dialer.send(Frame(READY, ready), node)

    # --- the loop ----------------------------------------------------------------------
    def serve(self) -> None:
        while self.running:
            self._next()

    def _next(self) -> None:
        frame = self.dialer.inbound.get()
        started = time.perf_counter()
        try:
            self._take(frame)
        finally:
            self.busy_s += time.perf_counter() - started

    def _take(self, frame: Frame | None) -> None:
        if frame is None or frame.type == BYE:
            self.running = False
            self.finished = frame is not None
            return
        if frame.type in (REPLY, ERROR):  # the server sends these only to answer our requests
            self.done[int(frame.header["seq"])] = frame
            return
        if frame.type == BATCH:
            self._batch(frame)
            return
        node = str(frame.header.get("node") or self.nodes[0])
        try:
            self._handle(frame, node)
        except Exception as err:  # noqa: BLE001 - the server hears of it, the device goes on
            header: dict[str, Any] = {
                "seq": frame.header.get("seq"),
                "error": f"{type(err).__name__}: {err}",
            }
            if isinstance(err, DivergenceError):
                header.update(divergence=True, step=err.step, error=str(err))
            elif not isinstance(err, CotuneError):
                log.error("handler failed:\n%s", traceback.format_exc())
            self.dialer.send(Frame(ERROR, header), node)

    def _handle(self, frame: Frame, node: str) -> None:
        h, seq = frame.header, frame.header.get("seq")

        def send(out: Frame) -> None:
            self.dialer.send(out, node)

        if frame.type == START:
            role_id = str(h["role"])
            self.starting[role_id] = self._factory(str(h["factory"]))
            self.roles.pop(role_id, None)  # started again (it rejoined): built afresh
            send(Frame(DONE, {"seq": seq}))
        elif frame.type in (REQUEST, SEND):
            msg = self._place(decode_message(frame.payload))
            msg.arrival = h.get("arrival")
            reply = self._role(msg.receiver).handle(msg)
            if seq is not None:  # a request, or a server's one-way message (acknowledged)
                codec = h.get("codec") or self.exp.cfg.engine.codec
                payload = b"" if reply is None else encode_message_pieces(reply, codec)
                send(Frame(REPLY, {"seq": seq}, payload))
        elif frame.type == TICK:
            role = self._role(str(h["role"]))
            send(
                Frame(DONE, {"seq": seq, "result": role.local_tick(h["kind"], h.get("meta") or {})})
            )
        elif frame.type == SNAPSHOT:
            if h.get("if_built") and str(h["role"]) in self.starting:
                send(Frame(DONE, {"seq": seq, "none": True}))  # never used: no state yet
                return
            state = self._role(str(h["role"])).snapshot()
            send(Frame(DONE, {"seq": seq}, dump_state(state)))
        elif frame.type == RESTORE:
            self._role(str(h["role"])).restore(load_state(frame.payload))
            send(Frame(DONE, {"seq": seq}))
        elif frame.type == MEASURE:
            role_id = str(h["role"])
            values = {} if role_id in self.starting else self._role(role_id).measurements()
            values["node_busy_s"] = self.busy_s
            values["node_peak_rss_bytes"] = peak_rss_bytes()
            values["node_batched_requests"] = float(self.batched)
            send(Frame(DONE, {"seq": seq, "values": values}))
        else:
            raise ProtocolError(f"unexpected {frame.describe()} frame from the server")

    def _batch(self, frame: Frame) -> None:
        """Requests for several of this host's roles: answered as one batch when their class
        offers it for them (``batch_on_<kind>`` / ``can_batch_<kind>``, as the local engine
        asks), else one by one as separate requests would be; a REPLY (or ERROR) per request,
        sent as its node's."""
        h = frame.header
        seqs, nodes = list(h["seqs"]), [str(n) for n in h["nodes"]]
        codec = h.get("codec") or self.exp.cfg.engine.codec
        view, parts, at = memoryview(frame.payload), [], 0
        for size in h["sizes"]:
            parts.append(bytes(view[at : at + int(size)]))
            at += int(size)
        try:
            msgs = [self._place(decode_message(p)) for p in parts]
            for msg, arrival in zip(msgs, h["arrivals"]):
                msg.arrival = arrival
            roles = [self._role(m.receiver) for m in msgs]
            batch = self._batch_handler(roles, msgs)
        except Exception:  # noqa: BLE001 - one by one below: each request hears of its own
            batch = None
        if batch is None:
            for seq, node, part, arrival in zip(seqs, nodes, parts, h["arrivals"]):
                one = Frame(REQUEST, {"seq": seq, "codec": codec, "arrival": arrival, "node": node},
                            part)  # fmt: skip
                self._take(one)
            return
        try:
            replies = batch()
            self.batched += len(msgs)
        except Exception as err:  # noqa: BLE001 - every request of the batch hears of it
            if not isinstance(err, CotuneError):
                log.error("batch handler failed:\n%s", traceback.format_exc())
            for seq, node in zip(seqs, nodes):
                error = {"seq": seq, "error": f"{type(err).__name__}: {err}"}
                self.dialer.send(Frame(ERROR, error), node)
            return
        for seq, node, reply in zip(seqs, nodes, replies):
            payload = b"" if reply is None else encode_message_pieces(reply, codec)
            self.dialer.send(Frame(REPLY, {"seq": seq}, payload), node)

    @staticmethod
    def _batch_handler(roles: list[Role], msgs: list[Message]) -> Any:
        """The roles' class-level batch handler for ``msgs`` (None: one by one)."""
        kind, cls = msgs[0].kind, type(roles[0])
        batch = getattr(cls, f"batch_on_{kind}", None)
        wants = getattr(cls, f"can_batch_{kind}", None)
        same = len({type(r) for r in roles}) == 1 and len({m.kind for m in msgs}) == 1
        if not same or batch is None or (wants is not None and not wants(roles)):
            return None

        def run() -> list[Message | None]:
            replies = list(batch(roles, msgs))
            if len(replies) != len(msgs):
                raise ProtocolError(f"a batch handler answered {len(replies)} of {len(msgs)}")
            return replies

        return run

    # --- what the roles see ------------------------------------------------------------
    def _context(self, role_id: str) -> Any:
        meter = Meter(role_id, self.exp.sim.flops, ForwardSink(self.dialer, role_id, self.probes))
        return self.host.context(role_id, grid=self.grid, meter=meter)

    def _factory(self, path: str) -> Any:
        module, _, qualname = path.partition(":")
        if not module.startswith(ROLE_PACKAGES):
            raise ProtocolError(f"refusing to build a role from {path!r} (not a cotune role)")
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        if not (isinstance(obj, type) and issubclass(obj, Role)):
            raise ProtocolError(f"{path!r} is not a role class")
        return obj

    def _role(self, role_id: str) -> Role:
        role = self.roles.get(role_id)
        if role is not None:
            return role
        factory = self.starting.pop(role_id, None)
        if factory is None:
            raise ProtocolError(f"no role {role_id!r} on this device")
        role = self.roles[role_id] = build_on_node(factory, self._context(role_id))
        return role

    def _place(self, msg: Message) -> Message:
        return place_message(msg, self.host.device_of(msg.receiver))

    def call(self, msg: Message, codec: str | None, *, request: bool) -> Message | None:
        """A device-initiated message: one-way, or a request served by waiting."""
        chosen = codec or msg.meta.get("codec") or self.exp.cfg.engine.codec
        payload = encode_message_pieces(msg, chosen)
        if not request:
            self.dialer.send(Frame(SEND, {"codec": chosen}, payload), msg.sender)
            return None
        seq = next(self.seq)
        self.dialer.send(Frame(REQUEST, {"seq": seq, "codec": chosen}, payload), msg.sender)
        while seq not in self.done:
            if not self.running:
                raise PeerUnavailable("the server went away")
            self._next()
        frame = self.done.pop(seq)
        if frame.type == ERROR:
            raise PeerUnavailable(str(frame.header.get("error")))
        reply = self._place(decode_message(frame.payload))
        reply.arrival = frame.header.get("arrival")
        return reply
