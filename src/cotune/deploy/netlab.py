"""Shaped links on one machine: every device process in its own network namespace, behind a
veth pair whose two ends are rate-limited with ``tc tbf`` (upload on the device's end, download
on the host's), with one-way latency added by a small delaying TCP proxy (the ``netem`` qdisc
is not available everywhere). The server listens on loopback; device N dials its proxy at
``10.<net>.N.1``. Needs root (``ip netns``); ``netlab_unavailable()`` says why not, if not.

    with ShapedLinks({"device-0": Link(up_mbit=4, down_mbit=8, latency_s=0.02)}) as lab:
        launch(cfg, wrap=lab.wrap, server_hosts=lab.hosts)
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)
# On the wire a 1500-byte packet carries 1448 bytes of TCP payload (IP, TCP with timestamps,
# Ethernet headers): what a shaped rate gives an application.
GOODPUT = 1448 / 1514


@dataclass(frozen=True)
class Link:
    """One device's access link: rates in Mbit/s on the wire, one-way latency in seconds."""

    up_mbit: float
    down_mbit: float
    latency_s: float = 0.0

    def profile_fields(self) -> dict[str, float]:
        """The simulator's view of this link (application goodput in bytes/s)."""
        return {
            "up_bps": self.up_mbit * 1e6 / 8 * GOODPUT,
            "down_bps": self.down_mbit * 1e6 / 8 * GOODPUT,
            "latency_s": self.latency_s,
        }


def netlab_unavailable() -> str | None:
    """Why shaped links cannot run here (None: they can)."""
    if os.name != "posix" or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "shaped links need root (ip netns, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"shaped links need the `{tool}` command (iproute2)"
    probe = f"cotune-probe-{os.getpid()}"
    made = _run(["ip", "netns", "add", probe], check=False)
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    _run(["ip", "netns", "del", probe], check=False)
    return None


def _run(cmd: list[str], *, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
    return out


class DelayProxy:
    """A TCP proxy that holds every byte ``delay_s`` in each direction (one-way latency)."""

    def __init__(self, listen_host: str, target: tuple[str, int], delay_s: float) -> None:
        self.target, self.delay_s = target, delay_s
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((listen_host, 0))
        self.sock.listen(16)
        self.address = f"{listen_host}:{self.sock.getsockname()[1]}"
        self.open = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.open:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError as err:
                log.warning("proxy %s: cannot reach %s: %s", self.address, self.target, err)
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pipe(client, upstream)
            self._pipe(upstream, client)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        held: queue.Queue[tuple[float, bytes] | None] = queue.Queue()

        def read() -> None:
            with contextlib.suppress(OSError):
                while data := src.recv(1 << 16):
                    held.put((time.monotonic() + self.delay_s, data))
            held.put(None)

        def write() -> None:
            try:
                while (item := held.get()) is not None:
                    due, data = item
                    wait = due - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    dst.sendall(data)
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                with contextlib.suppress(OSError):
                    src.shutdown(socket.SHUT_RD)

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()

    def close(self) -> None:
        self.open = False
        with contextlib.suppress(OSError):
            self.sock.close()


class ShapedLinks:
    """Namespaces, veth pairs, tbf shaping and delaying proxies for a run's devices."""

    def __init__(self, links: dict[str, Link], *, net: int = 203, burst_bytes: int = 4096) -> None:
        self.links, self.net, self.burst = links, net, burst_bytes
        self.tag = f"{os.getpid() % 10000}"
        self.made: list[str] = []
        self.proxies: dict[str, DelayProxy] = {}

    def _names(self, i: int) -> tuple[str, str, str]:
        return f"ct{self.tag}n{i}", f"ct{self.tag}h{i}", f"ct{self.tag}d{i}"

    def __enter__(self) -> ShapedLinks:
        try:
            for i, link in enumerate(self.links.values()):
                self._make(i, link)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _make(self, i: int, link: Link) -> None:
        ns, host, dev = self._names(i)
        _run(["ip", "netns", "add", ns])
        self.made.append(ns)
        _run(["ip", "link", "add", host, "type", "veth", "peer", "name", dev])
        _run(["ip", "link", "set", dev, "netns", ns])
        _run(["ip", "addr", "add", f"10.{self.net}.{i}.1/24", "dev", host])
        _run(["ip", "link", "set", host, "up"])
        inside = ["ip", "netns", "exec", ns]
        _run([*inside, "ip", "addr", "add", f"10.{self.net}.{i}.2/24", "dev", dev])
        _run([*inside, "ip", "link", "set", dev, "up"])
        _run([*inside, "ip", "link", "set", "lo", "up"])
        # Segmentation offload would hand tbf 64 KB packets (larger than its bucket): off.
        _run(["ip", "link", "set", "dev", host, "gso_max_size", "1500", "gso_max_segs", "1"])
        _run([*inside, "ip", "link", "set", "dev", dev, "gso_max_size", "1500",
              "gso_max_segs", "1"])  # fmt: skip
        _run(self._tbf(["tc"], host, link.down_mbit))  # host → device: its download
        _run(self._tbf([*inside, "tc"], dev, link.up_mbit))  # device → host: its upload

    def _tbf(self, prefix: list[str], dev: str, mbit: float) -> list[str]:
        return [*prefix, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit",
                "burst", str(self.burst), "latency", "2s"]  # fmt: skip

    @property
    def hosts(self) -> tuple[str, ...]:
        """The addresses devices dial (for the server certificate's names)."""
        return tuple(f"10.{self.net}.{i}.1" for i in range(len(self.links)))

    def wrap(self, node: str, server: str) -> tuple[list[str], str]:
        """How to start ``node``'s process (a command prefix) and the address it dials: its
        namespace, and its own delaying proxy in front of ``server``."""
        i = list(self.links).index(node)
        ns, _, _ = self._names(i)
        host, _, port = server.rpartition(":")
        if node not in self.proxies:
            target = ("127.0.0.1" if host in ("0.0.0.0", "") else host, int(port))
            self.proxies[node] = DelayProxy(
                f"10.{self.net}.{i}.1", target, self.links[node].latency_s
            )
        return ["ip", "netns", "exec", ns], self.proxies[node].address

    def close(self) -> None:
        for proxy in self.proxies.values():
            proxy.close()
        for i, ns in enumerate(self.made):
            _run(["ip", "netns", "del", ns], check=False)  # takes its veth end (and the pair)
            _run(["ip", "link", "del", self._names(i)[1]], check=False)
        self.made.clear()
