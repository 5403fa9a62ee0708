"""gRPC plumbing: one bidirectional stream per device, which the device opens (it dials out,
so it works behind NAT). Both ends exchange chunked frames (``frames.py``) and hand complete
frames to a queue that one thread consumes, so every handler runs in one deterministic order.

Security: TLS with the server's certificate (``tls_dir``), optionally mutual TLS (devices show
certificates signed by the same CA, whose common name must be their node id), and a token per
device checked against its SHA-256 hash on the server (credentials and hashes: ``security.py``).
Plain text only with ``insecure``.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from cotune.deploy.frames import (
    BYE,
    ERROR,
    HELLO,
    READY,
    REFUSED,
    WELCOME,
    Frame,
    Reassembler,
    frame_chunks,
)
from cotune.deploy.malloc import keep_freed_memory
from cotune.deploy.security import Security, client_credentials, server_credentials, token_hash
from cotune.errors import ConfigError, ProtocolError
from cotune.jsonsafe import is_count

log = logging.getLogger(__name__)
METHOD = "/cotune.Node/Connect"
MAX_FRAME = 8 << 30  # the largest frame a peer may send (8 GiB: a full model's emulator fits)
_OPTIONS = [
    ("grpc.max_send_message_length", 8 << 20),
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.keepalive_time_ms", 10_000),  # heartbeats: a dead peer is noticed within seconds
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def grpc_module() -> Any:
    try:
        import grpc
    except ImportError:
        raise ConfigError("engine.kind: grpc needs grpcio: pip install 'cotune[deploy]'") from None
    return grpc


def wire_bytes(message: bytes) -> int:
    """Bytes one gRPC message takes on the connection: its 5-byte gRPC prefix and the 9-byte
    header of each HTTP/2 DATA frame (16 KiB each by default); TLS records are not counted."""
    n = len(message) + 5
    return n + 9 * max(1, -(-n // 16384))


@dataclass(frozen=True)
class Closed:
    """What the inbound queue holds when a device's stream ended (which stream: ``link``)."""

    link: Link


class Link:
    """The server's end of one device's stream: send frames to it."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.outbound: queue.Queue[bytes | None] = queue.Queue()
        self.ids = itertools.count(1)
        self.open = True
        self.bytes_out = 0  # on the wire, to the device (framing included)
        self.bytes_in = 0  # on the wire, from the device

    def send(self, frame: Frame) -> None:
        if not self.open:
            raise ConnectionError(f"{self.node} is disconnected")
        for c in frame_chunks(next(self.ids), frame):
            self.bytes_out += wire_bytes(c)
            self.outbound.put(c)

    def close(self) -> None:
        self.open = False
        self.outbound.put(None)


class Joining:
    """What devices report while they join, kept for the engine (``node_info``) and the start:
    ``ready`` (READY: the node is built; what it declared, e.g. its own data's size) and
    ``failed`` (why a node could not start). Both hubs (gRPC, Ray) keep this book."""

    def __init__(self) -> None:
        self.ready: dict[str, dict[str, Any]] = {}
        self.failed: dict[str, str] = {}
        self.joined = threading.Condition()

    def take(self, node: str, frame: Frame) -> bool:
        """Book ``frame`` if it is a join report (READY, or an error before READY); False: it
        is the engine's."""
        if frame.type == READY:
            why = _bad_join_report(frame.header)
            if why is not None:  # a node that cannot say what it holds has not joined
                log.error("%s: a bad join report: %s", node, why)
                with self.joined:
                    self.failed[node] = f"{node} sent a bad join report: {why}"
                    self.joined.notify_all()
                return True
            with self.joined:
                self.ready[node] = dict(frame.header)
                self.failed.pop(node, None)
                self.joined.notify_all()
            return True
        if frame.type == ERROR and node not in self.ready:
            why = str(frame.header.get("error"))
            log.error("%s", why)
            with self.joined:
                self.failed[node] = why
                self.joined.notify_all()
            return True
        return False

    def fail(self, node: str, why: str) -> None:
        """``node`` cannot start (its host died before it was built); a first reason stands."""
        with self.joined:
            if node not in self.ready:
                self.failed.setdefault(node, why)
            self.joined.notify_all()

    def wait_for(self, nodes: list[str], timeout: float) -> list[str]:
        """Wait until ``nodes`` are connected and have built their node (so no request waits on
        a model still loading), or failed, or ``timeout`` passes; returns the missing ones."""
        with self.joined:
            self.joined.wait_for(
                lambda: all(n in self.ready or n in self.failed for n in nodes), timeout
            )
            return [n for n in nodes if n not in self.ready]


def _bad_join_report(header: dict[str, Any]) -> str | None:
    """What is wrong with a READY frame's header (None: nothing): ``examples`` a count or
    absent, ``process`` and ``process_key`` strings or absent."""
    examples = header.get("examples")
    if examples is not None and not is_count(examples):
        return f"examples={examples!r} is not a number of examples"
    for field in ("process", "process_key"):
        value = header.get(field)
        if value is not None and not isinstance(value, str):
            return f"{field}={value!r} is not a string"
    return None


class Hub(Joining):
    """The gRPC server: authenticates devices and queues their frames as ``(node, frame)``
    (``(node, Closed(link))`` when a stream ends)."""

    def __init__(
        self,
        listen: str,
        security: Security,
        tokens: dict[str, str] | None,
        welcome: dict[str, Any],
    ) -> None:
        grpc = grpc_module()
        security.check()
        keep_freed_memory()  # every message reuses freed buffers instead of fresh pages
        super().__init__()
        self.security, self.tokens, self.welcome = security, tokens or {}, welcome
        self.inbound: queue.Queue[tuple[str, Frame | Closed]] = queue.Queue()
        self.links: dict[str, Link] = {}
        self.server = grpc.server(ThreadPoolExecutor(max_workers=256), options=_OPTIONS)
        handler = grpc.method_handlers_generic_handler(
            "cotune.Node", {"Connect": grpc.stream_stream_rpc_method_handler(self._connect)}
        )
        self.server.add_generic_rpc_handlers((handler,))
        if security.insecure:
            self.port = self.server.add_insecure_port(listen)
        else:
            self.port = self.server.add_secure_port(listen, server_credentials(grpc, security))
        if self.port == 0:
            raise ConfigError(f"engine.listen: cannot listen on {listen!r}")
        host = listen.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"
        self.server.start()

    def host_of(self, node: str) -> Any:
        """The process ``node`` joined from (the secret key its READY frame carried): the
        server sends a round's requests for devices that share one as one BATCH frame (on the
        first one's stream), which that process may answer as one cohort; a node that sent no
        key (or not a string) is its own."""
        key = self.ready.get(node, {}).get("process_key")
        return ("process", key) if isinstance(key, str) and key else ("node", node)

    def _refuse(self, node: str, why: str) -> Iterator[bytes]:
        log.warning("refused a device claiming %r: %s", node, why)
        yield from frame_chunks(0, Frame(REFUSED, {"error": why}))

    def _connect(self, requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        reader = Reassembler(MAX_FRAME)
        try:
            hello = None
            for msg in requests:
                hello = reader.add(msg)
                if hello is not None:
                    break
        except ProtocolError as err:
            yield from self._refuse("?", f"bad hello: {err}")
            return
        if hello is None or hello.type != HELLO:
            yield from self._refuse("?", "the first frame must be a hello")
            return
        node = str(hello.header.get("node", ""))
        why = self._authenticate(node, str(hello.header.get("token", "")), context)
        if why is not None:
            yield from self._refuse(node, why)
            return
        link = Link(node)
        # The welcome goes first on the stream: once the link is registered, the server may
        # queue requests to it at any moment.
        link.send(Frame(WELCOME, self.welcome))
        with self.joined:
            old = self.links.get(node)
            if old is not None and old.open:
                yield from self._refuse(node, "a device with this id is already connected")
                return
            self.links[node] = link
            self.joined.notify_all()
        log.info("%s connected", node)
        threading.Thread(
            target=self._read, args=(node, link, requests, reader), daemon=True
        ).start()
        while True:
            out = link.outbound.get()
            if out is None:
                return
            yield out

    def _authenticate(self, node: str, token: str, context: Any) -> str | None:
        if not node:
            return "no node id"
        if self.security.mutual:
            names = context.auth_context().get("x509_common_name", [])
            if node.encode() not in names:
                return f"its certificate is not {node}'s"
        if self.tokens or not self.security.insecure:
            want = self.tokens.get(node)
            if want is None:
                return "no credentials for this node id"
            if not hmac.compare_digest(token_hash(token), want):
                return "wrong token"
        return None

    def _read(self, node: str, link: Link, requests: Iterator[bytes], reader: Reassembler) -> None:
        try:
            for msg in requests:
                link.bytes_in += wire_bytes(msg)
                frame = reader.add(msg)
                if frame is not None and not self.take(node, frame):
                    self.inbound.put((node, frame))
        except ProtocolError as err:
            log.warning("%s sent a malformed frame (%s): disconnecting it", node, err)
        except Exception:  # noqa: BLE001 - a broken stream is a disconnect
            pass
        link.close()
        self.inbound.put((node, Closed(link)))

    def close(self) -> None:
        for link in list(self.links.values()):
            if link.open:
                link.send(Frame(BYE))
                link.close()
        self.server.stop(grace=1.0)


def rpc_error_text(err: BaseException) -> str:
    """What gRPC says ended a call: its status and details (e.g. ``UNAVAILABLE: failed to
    connect to all addresses; ... Connection refused``), else the exception's own words."""
    code, details = getattr(err, "code", None), getattr(err, "details", None)
    if callable(code) and callable(details):
        status = code()
        return f"{getattr(status, 'name', status)}: {details()}"
    return f"{type(err).__name__}: {err}"


class Dialer:
    """A device's end: dial the server, say hello, then exchange frames."""

    def __init__(self, server: str, node: str, token: str, security: Security) -> None:
        grpc = grpc_module()
        security.check()
        keep_freed_memory()  # every message reuses freed buffers instead of fresh pages
        if security.insecure:
            self.channel = grpc.insecure_channel(server, options=_OPTIONS)
        else:
            creds = client_credentials(grpc, security, node)
            self.channel = grpc.secure_channel(server, creds, options=_OPTIONS)
        self.node = node
        self.ended_by = ""  # why the stream ended, as gRPC said (empty: it has not, or cleanly)
        self.inbound: queue.Queue[Frame | None] = queue.Queue()
        # Once joined to a process hosting several nodes (``join``): frames go to its queue,
        # each marked with this stream's node.
        self.tag = False
        self.switch = threading.Lock()
        self.outbound: queue.Queue[bytes | None] = queue.Queue()
        self.ids = itertools.count(1)
        self.send(Frame(HELLO, {"node": node, "token": token}))
        stream = self.channel.stream_stream(METHOD)
        self.responses = stream(self._requests())
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _requests(self) -> Iterator[bytes]:
        while True:
            out = self.outbound.get()
            if out is None:
                return
            yield out

    def _read(self) -> None:
        reader, opened = Reassembler(MAX_FRAME), False
        try:
            for msg in self.responses:
                frame = reader.add(msg)
                if frame is not None:
                    opened = True
                    self._deliver(frame)
        except Exception as err:  # noqa: BLE001 - the stream ended: the loop sees None
            self.ended_by = rpc_error_text(err)
            # A stream that never opened is the dial's to report (it may try again).
            log.log(logging.INFO if opened else logging.DEBUG, "%s: stream ended (%s)",
                    self.node, self.ended_by)  # fmt: skip
        self._deliver(None)

    def _deliver(self, frame: Frame | None) -> None:
        with self.switch:
            if frame is not None and self.tag:
                frame.header.setdefault("node", self.node)
            self.inbound.put(frame)

    def join(self, inbound: queue.Queue[Frame | None]) -> None:
        """Deliver this stream's frames to ``inbound`` (a process's queue for all its nodes),
        each naming this node; what arrived before is moved there first, in order."""
        with self.switch:
            old, self.inbound, self.tag = self.inbound, inbound, True
            while not old.empty():
                frame = old.get_nowait()
                if frame is not None:
                    frame.header.setdefault("node", self.node)
                inbound.put(frame)

    def send(self, frame: Frame, node: str | None = None) -> None:
        """Queue ``frame`` on the stream (``node``: which of the process's nodes sends it; a
        stream carries one node)."""
        for c in frame_chunks(next(self.ids), frame):
            self.outbound.put(c)

    def close(self, linger_s: float = 5.0) -> None:
        """End our side of the stream and let what is queued reach the server (a last error
        frame) before the channel goes: the server ends the stream once it has read ours."""
        self.outbound.put(None)
        self.reader.join(timeout=linger_s)
        self.channel.close()
