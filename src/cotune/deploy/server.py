"""The server's side of a gRPC run: the engine that carries messages to remote roles and the
node host that starts roles on device processes.

Devices' roles live behind ``RemoteRole`` proxies (``remote_role.py``). ``GrpcEngine`` is the
in-process engine for the server's own roles and, for a remote receiver, encodes and counts the
message exactly as ``LocalEngine`` does, sends the bytes, and waits for the reply; while it
waits, it serves what devices send (their own messages to server roles, their nested requests,
their meter reports: ``serving.py``) in arrival order on this one thread, so a run is as
deterministic as on one machine. What a peer sends besides messages is checked by
``peer_input.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from cotune.buffers import Encoded
from cotune.deploy.frames import (
    BATCH,
    REQUEST,
    RESTORE,
    SEND,
    START,
    TICK,
    Frame,
)
from cotune.deploy.peer_input import text, tick_result
from cotune.deploy.remote_role import RemoteRole
from cotune.deploy.serving import DeviceFrames
from cotune.deploy.states import dump_state
from cotune.deploy.transport import Closed
from cotune.errors import PeerUnavailable, ProtocolError
from cotune.runtime.local import LocalEngine
from cotune.runtime.message_decode import decode_message
from cotune.runtime.messages import Message, encode_message_pieces

if TYPE_CHECKING:
    from cotune.deploy.transport import Hub

log = logging.getLogger(__name__)


class GrpcEngine(DeviceFrames, LocalEngine):
    """``LocalEngine`` for the server's roles, frames on a stream for remote ones."""

    colocated = False

    def __init__(self, hub: Hub, codec: str = "fp32", timeout_s: float = 600.0) -> None:
        super().__init__(codec=codec)
        self.hub = hub
        self.timeout_s = timeout_s
        self.seq = itertools.count(1)
        self.done: dict[int, Frame] = {}
        # Who each sequence number was sent to: only that node may complete it (a device
        # answering another's request is dropped, never taken for the other's reply).
        self.asked: dict[int, str] = {}
        self.gone: set[str] = set()  # nodes whose stream ended
        self.links_seen: dict[str, Any] = {}  # the stream each remote role was started on
        self.pending: dict[str, deque[Frame | Closed]] = {}  # frames not yet served, per node
        self.outstanding: dict[str, deque[Any]] = {}  # one-way messages not yet settled
        self.grid: Any = None  # the EngineGrid over this engine (its sink: the simulator's)
        self.idle_s = 0.0  # seconds this process waited on devices (the rest it was busy)
        self.absent: set[str] = set()  # devices that had not joined when the run started
        self.starting: dict[str, int] = {}  # node → its START frame's seq, not yet settled

    def measured(self) -> dict[str, Any]:
        """What the deployment measured, per device: bytes on the wire both ways (gRPC and
        HTTP/2 framing included, TLS not), and host seconds spent in its handlers; for the
        server, the seconds it waited on devices (``idle_s``)."""
        from cotune.deploy.process_info import peak_rss_bytes

        out: dict[str, Any] = {
            "server": {"idle_s": self.idle_s, "peak_rss_bytes": peak_rss_bytes()}
        }
        used = set(self.transfers.roles())  # a node nobody wrote to has nothing to tell
        for node, role in self._roles.items():
            if not isinstance(role, RemoteRole) or node not in used:
                continue
            link = self.links_seen.get(node)
            values = role.measurements()
            out[node] = {
                "wire_bytes_up": link.bytes_in if link is not None else None,
                "wire_bytes_down": link.bytes_out if link is not None else None,
                "busy_s": values.get("node_busy_s"),
                "peak_rss_bytes": values.get("node_peak_rss_bytes"),
                "batched_requests": values.get("node_batched_requests"),
                # Devices hosted together name the same process (busy_s, peak memory: its).
                "process": text(self.hub.ready.get(node, {}).get("process")),
            }
        return out

    def close(self) -> None:
        for node in list(self.outstanding):
            with contextlib.suppress(PeerUnavailable, ProtocolError):
                self._drain(node)
        self.hub.close()

    # --- remote roles ------------------------------------------------------------------
    def start_remote(self, role_id: str, factory: Any) -> RemoteRole:
        path = f"{factory.__module__}:{factory.__qualname__}"
        role = RemoteRole(role_id, self, path)
        if role_id in self.absent and role_id not in self.hub.ready:
            # Not here yet: its role starts (fresh) on the stream it joins on (``_rejoin``).
            self.register(role)
            self.links_seen[role_id] = None
            self.gone.add(role_id)
            return role
        # Not waited for: the node builds the role on first use, and its acknowledgement is
        # settled before the node's next exchange (``_drain``), so starting 10,000 devices
        # costs no round trips. A role that never trained restarts fresh after a crash, which
        # is its initial state.
        self._drain(role_id)
        seq = self._ask(role_id)
        link = self._link(role_id)
        self._deliver(link, Frame(START, {"factory": path, "seq": seq, "role": role_id}))
        self.starting[role_id] = seq
        self.register(role)
        self.links_seen[role_id] = link
        return role

    def control(self, node: str, kind: int, header: dict[str, Any], payload: bytes = b"") -> Frame:
        """A control call on ``node`` (start a role, a local event, the measurement channel):
        send, then serve until its completion arrives."""
        self._drain(node)
        seq = self._ask(node)
        self._link(node).send(Frame(kind, {**header, "seq": seq, "role": node}, payload))
        return self._wait(node, seq)

    def _ask(self, node: str) -> int:
        """A sequence number for a frame to ``node``, which only ``node`` may complete."""
        seq = next(self.seq)
        self.asked[seq] = node
        return seq

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
        self.starting.pop(node, None)  # its previous life's START: never acknowledged now
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
        return self._finish(msg, *self._send_request(msg, codec))

    def _send_request(self, msg: Message, codec: str | None) -> tuple[int, int, str]:
        """Encode, count and send a request to a remote role; returns (transfer seq, frame
        seq, codec)."""
        return self._post(msg, codec, REQUEST)

    def _post(self, msg: Message, codec: str | None, kind: int) -> tuple[int, int, str]:
        # Counted first, as a message that leaves is (the peer may be gone by then).
        sent, seq, chosen, header, data = self._prepare(msg, codec)
        self._deliver(self._link(msg.receiver), Frame(kind, header, data))
        return sent, seq, chosen

    @staticmethod
    def _deliver(link: Any, frame: Frame) -> None:
        try:
            link.send(frame)
        except ConnectionError as err:  # it went away between the check and the send
            raise PeerUnavailable(str(err)) from None

    def _prepare(
        self, msg: Message, codec: str | None
    ) -> tuple[int, int, str, dict[str, Any], Encoded]:
        """Encode, count and stamp a message for a remote role (not sent yet)."""
        self._drain(msg.receiver)
        chosen = self._codec_for(msg, codec)
        data = encode_message_pieces(msg, chosen)
        sent = self._record(msg, len(data), chosen)
        arrival = None
        if self.on_deliver is not None:  # the simulator's arrival stamp, computed here
            stub = Message(msg.kind, msg.sender, msg.receiver)
            self.on_deliver(stub)
            arrival = stub.arrival
        seq = self._ask(msg.receiver)
        return sent.seq, seq, chosen, {"seq": seq, "codec": chosen, "arrival": arrival}, data

    def _send_requests(self, msgs: list[Message], codec: str | None) -> list[Any]:
        """A round's requests, counted in order; those for roles that share a host (Ray) of
        one kind go as one BATCH frame, so the host may answer them as one cohort."""
        out: list[Any] = [None] * len(msgs)
        links: dict[int, Any] = {}
        prepared: dict[int, Any] = {}
        for i, m in enumerate(msgs):  # counted in order, as one by one
            # Joined now: preparing the next message settles its receiver's one-way messages,
            # whose handlers may change tensors this one's encoded pieces view.
            sent, seq, chosen, header, data = self._prepare(m, codec)
            p = (sent, seq, chosen, header, bytes(data))
            try:
                links[i] = self._link(m.receiver)
                prepared[i] = p
            except PeerUnavailable as err:
                out[i] = err
        for group in self._host_groups([msgs[i] for i in links], list(links)):
            done: list[int] = []
            try:
                if len(group) > 1 and len({msgs[i].kind for i in group}) == 1:
                    header = {
                        "seqs": [prepared[i][1] for i in group],
                        "nodes": [msgs[i].receiver for i in group],
                        "sizes": [len(prepared[i][4]) for i in group],
                        "arrivals": [prepared[i][3]["arrival"] for i in group],
                        "codec": prepared[group[0]][2],
                    }
                    payload = b"".join(prepared[i][4] for i in group)
                    lead = links[group[0]]
                    was = lead.bytes_out
                    self._deliver(lead, Frame(BATCH, header, payload))
                    _share_wire_bytes(lead.bytes_out - was, [links[i] for i in group],
                                      header["sizes"])  # fmt: skip
                    done = list(group)
                else:
                    for i in group:
                        self._deliver(links[i], Frame(REQUEST, prepared[i][3], prepared[i][4]))
                        done.append(i)
            except PeerUnavailable as err:
                for i in group:
                    if i not in done:
                        out[i] = err
                        prepared.pop(i)
            for i in group:
                if i in prepared:
                    out[i] = prepared[i][:3]
        return out

    def _host_groups(self, msgs: list[Message], index: list[int]) -> list[list[int]]:
        """``index`` (of ``msgs``) grouped by the host their receiver lives on, in order of
        first appearance; every receiver its own group where a process is one node (gRPC)."""
        host_of = getattr(self.hub, "host_of", None)
        groups: dict[Any, list[int]] = {}
        for i, m in zip(index, msgs):
            key = host_of(m.receiver) if host_of is not None else ("node", m.receiver)
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    # --- one-way messages: sent without waiting, settled before the node's next exchange --
    def send(self, msg: Message, *, codec: str | None = None) -> None:
        if not isinstance(self._receiver(msg), RemoteRole):
            super().send(msg, codec=codec)
            return
        sent, seq, chosen = self._post(msg, codec, SEND)
        self.outstanding.setdefault(msg.receiver, deque()).append((msg, sent, seq, chosen))

    def _drain(self, node: str) -> None:
        """Settle ``node``'s one-way messages (their acknowledgements, the meter reports and
        messages its handlers produced): whatever happens next with ``node`` is then in the
        order a one-by-one engine would have it."""
        started = self.starting.pop(node, None)
        if started is not None:
            self._wait(node, started)  # a role that cannot be built on its node says so here
        waiting = self.outstanding.get(node)
        while waiting:
            msg, sent, seq, chosen = waiting.popleft()
            try:
                reply = self._finish(msg, sent, seq, chosen)
            except PeerUnavailable as err:
                log.warning("a one-way %s to %s was lost: %s", msg.kind, node, err)
                continue
            if reply is not None:
                self._inbox[msg.sender].append(reply)

    def pull(self, role_id: str) -> list[Message]:
        for node in list(self.outstanding):
            self._drain(node)
        return super().pull(role_id)

    def _finish(self, msg: Message, sent: int, seq: int, chosen: str) -> Message | None:
        """Wait for the reply to a sent request; check, count and deliver it."""
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
            why = self.before_reply(msg.receiver, msg, reply)
            if why is not None:
                raise PeerUnavailable(why)
        self._record(reply, len(frame.payload), chosen, in_reply_to=sent)
        reply = self._place(reply)
        if self.on_deliver is not None:
            self.on_deliver(reply)
        return reply

    def request_batch(
        self,
        msgs: Any,
        handler: Any,
        *,
        codec: str | None = None,
    ) -> list[Message | PeerUnavailable]:
        """A round's requests to remote roles: all sent at once (the devices work in parallel),
        the replies taken in order. Counted and simulated as ``LocalEngine.request_batch``:
        every request, then every reply."""
        remote = [isinstance(self._receiver(m), RemoteRole) for m in msgs]
        if not any(remote):
            return super().request_batch(msgs, handler, codec=codec)
        msgs = list(msgs)
        if all(remote):
            sent = self._send_requests(msgs, codec)
        else:
            sent = []
            for m in msgs:
                try:
                    sent.append(self._send_request(m, codec))
                except PeerUnavailable as err:
                    sent.append(err)
        out: list[Message | PeerUnavailable] = []
        for m, s in zip(msgs, sent):
            if isinstance(s, PeerUnavailable):
                out.append(s)
                continue
            try:
                reply = self._finish(m, *s)
            except PeerUnavailable as err:
                out.append(err)
                continue
            if reply is None:
                raise ProtocolError(f"{m.describe()} was sent as a request but got no reply")
            out.append(reply)
        return out

    def tick_many(self, role_ids: list[str], kind: str, meta: dict[str, Any]) -> list[Any]:
        """A local event on several remote roles: started on all at once, their effects (the
        messages they send, their meter reports) taken role by role, in order."""
        seqs = []
        for r in role_ids:
            self._drain(r)
            seq = self._ask(r)
            self._link(r).send(Frame(TICK, {"kind": kind, "meta": meta, "seq": seq, "role": r}))
            seqs.append(seq)
        return [
            tick_result(r, kind, self._wait(r, seq).header.get("result"))
            for r, seq in zip(role_ids, seqs)
        ]


def _share_wire_bytes(total: int, links: list[Any], sizes: list[int]) -> None:
    """A batch frame went on the first link's stream: its wire bytes (``total``, counted
    there) are shared out to the devices it carried, in proportion to their messages' sizes,
    so each device's ``wire_bytes_down`` counts what was sent for it."""
    weight = sum(sizes) or 1
    shares = [total * size // weight for size in sizes]
    shares[0] += total - sum(shares)  # the rounding stays with the stream that carried it
    links[0].bytes_out -= total
    for link, share in zip(links, shares):
        link.bytes_out += share
