"""A device process's connections: ``cotune device`` dials the server as each of its devices
(one gRPC stream per device, each authenticated as that device), waits for the welcome, builds
a ``DeviceNode`` and serves until the run ends, reconnecting within ``--retry``.
"""

from __future__ import annotations

import logging
import queue
import tempfile
import time
from pathlib import Path
from typing import Any

from cotune.deploy.device import DeviceNode, DeviceRefused
from cotune.deploy.frames import ERROR, REFUSED, WELCOME, Frame
from cotune.deploy.security import Security
from cotune.deploy.transport import Dialer
from cotune.errors import ConfigError, CotuneError, PeerUnavailable, ProtocolError

log = logging.getLogger(__name__)


class DialerGroup:
    """The streams of a process that hosts several devices: one per device, each dialled and
    authenticated as that device (its token, its certificate under mutual TLS), their frames
    in one queue (each naming its node), every frame sent on its node's stream."""

    def __init__(self, dialers: dict[str, Dialer]) -> None:
        self.dialers = dialers
        self.node = next(iter(dialers))
        self.inbound: queue.Queue[Frame | None] = queue.Queue()
        for d in dialers.values():
            d.join(self.inbound)

    def send(self, frame: Frame, node: str | None = None) -> None:
        dialer = self.dialers.get(node or self.node)
        if dialer is None:
            raise ProtocolError(f"{node!r} is not one of this process's devices")
        dialer.send(frame)

    def close(self) -> None:
        for d in self.dialers.values():
            d.close()


def run_device(
    server: str, credentials: dict[str, str], security: Security, *,
    connect_timeout: float = 60.0, retry_s: float = 0.0, data_file: Path | None = None,
) -> None:  # fmt: skip
    """Connect to ``server`` as each device of ``credentials`` (device id -> its token) and
    serve until the run ends; several devices share this process and one frozen base, as the
    local engine's roles do. With ``retry_s``, a lost or refused connection is tried again for
    that long (a server restarting with --resume). With ``data_file`` (one device only), the
    device trains on that file (JSONL/CSV/TSV with the run's ``data.text_field`` /
    ``data.label_field``) instead of its shard of the config's data."""
    if not credentials:
        raise ConfigError("--id: no device to run")
    if data_file is not None and len(credentials) > 1:
        raise ConfigError(
            "--data: a process hosting several devices trains each on its shard of the "
            "config's data; run a device with its own file in a process of its own"
        )
    who = ", ".join(credentials)
    deadline = None
    while True:
        try:
            if _serve_once(server, credentials, security, connect_timeout, data_file):
                return
            why = "the server went away"
        except PeerUnavailable as err:
            why = str(err)
        now = time.monotonic()
        deadline = deadline if deadline is not None else now + retry_s
        if now >= deadline:
            raise PeerUnavailable(f"{who}: {why}")
        log.info("%s: %s; connecting again", who, why)
        time.sleep(1.0)


def _not_up_yet(why: str) -> bool:
    """gRPC's words for a server that is not listening (yet, or while it restarts), as opposed
    to one that answered wrongly (TLS, plain text) or a name that does not resolve."""
    return "Connection refused" in why


def _hint(why: str) -> str:
    """What a person can check, for the failures gRPC words least plainly."""
    if "Socket closed" in why:
        return (" (the server closed the connection at the handshake: do both sides agree on "
                "--mutual-tls, which needs this device's certificate, and on --insecure?)")  # fmt: skip
    if "andshake" in why or "certificate" in why:
        return (" (is the server's certificate signed by this device's ca.pem and made for the "
                "host name dialled? `cotune certs --host NAME`)")  # fmt: skip
    return ""


def _dial(
    server: str, node: str, token: str, security: Security, connect_timeout: float
) -> tuple[Dialer, Frame]:
    """A stream to ``server`` as ``node``, and the server's welcome on it. A server that is not
    listening yet is tried again, once a second, until ``connect_timeout`` (devices may start
    before the server has loaded its model); any other failure ends the dial at once with what
    gRPC said."""
    deadline, said = time.monotonic() + connect_timeout, False
    while True:
        dialer = Dialer(server, node, token, security)
        try:
            first = dialer.inbound.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            dialer.close()
            raise PeerUnavailable(
                f"no answer from {server} within {connect_timeout:.0f} s"
            ) from None
        if first is not None:
            break
        dialer.close()
        why = dialer.ended_by or "the stream ended"
        if not _not_up_yet(why) or time.monotonic() + 1.0 > deadline:
            raise PeerUnavailable(f"could not connect to {server}: {why}{_hint(why)}")
        if not said:
            log.info("%s: %s is not listening yet; trying again for up to %.0f s", node,
                     server, deadline - time.monotonic())  # fmt: skip
            said = True
        time.sleep(1.0)
    if first.type == REFUSED:
        dialer.close()
        raise DeviceRefused(f"{server} refused {node}: {first.header.get('error')}")
    if first.type != WELCOME:
        dialer.close()
        raise ProtocolError(f"{server} opened with {first.describe()}, not a welcome")
    return dialer, first


def _serve_once(
    server: str, credentials: dict[str, str], security: Security, connect_timeout: float,
    data_file: Path | None = None,
) -> bool:  # fmt: skip
    """One connection per device: True when the run finished, False when a stream broke."""
    dialers: dict[str, Dialer] = {}
    try:
        for node, token in credentials.items():
            dialers[node], first = _dial(server, node, token, security, connect_timeout)
    except CotuneError:
        for d in dialers.values():
            d.close()
        raise
    nodes = list(dialers)
    link: Any = dialers[nodes[0]] if len(nodes) == 1 else DialerGroup(dialers)
    with tempfile.TemporaryDirectory(prefix=f"cotune-{nodes[0]}-") as tmp:
        try:
            try:
                # Several devices share one base (as the local engine's roles), so a launched
                # run equals the in-process one; one device builds its node as `isolated`.
                runtime = DeviceNode(link, first.header, Path(tmp), data_file, nodes=nodes,
                                     isolated=len(nodes) == 1)  # fmt: skip
            except CotuneError as err:  # its data, its model: the server hears why, then stop
                for node in nodes:
                    link.send(Frame(ERROR, {"error": f"{node} could not start: {err}"}), node)
                raise
            runtime.serve()
            return runtime.finished
        finally:
            link.close()
