"""``engine.kind: ray``: device roles on long-lived Ray actors, each a *node host* holding one
frozen base and many device roles' states (the local engine's one-base-many-states design), on
one machine or a Ray cluster. The driver (this process) hosts the server roles.

It is the gRPC engine over another transport: the same frames, the same ``GrpcEngine`` on the
driver and the same ``DeviceNode`` runtime on each host, so every paradigm runs unchanged and
gives the same result bit for bit. A frame to a node is an ordered actor call (``push``); a
host's frames come back through a long poll (``pull``) that a driver thread keeps open per
host. Messages stay cotune's encoded messages (the counted bytes are unchanged); Ray moves the
larger ones through its object store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import tempfile
import threading
from pathlib import Path
from typing import Any

from cotune.deploy.frames import BYE, ERROR, READY, Frame
from cotune.deploy.transport import Closed
from cotune.errors import ConfigError

log = logging.getLogger(__name__)
PULL_WAIT_S = 0.5  # a host's long poll returns at least this often (so a closed hub notices)


def ray_module() -> Any:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency of the ray extra
        raise ConfigError(
            "engine.kind: ray needs the `ray` package (pip install 'cotune[ray]')"
        ) from None
    return ray


class QueueDialer:
    """A host's end inside its actor: frames in from ``push``, frames out to ``pull``."""

    def __init__(self, nodes: list[str]) -> None:
        self.node = nodes[0]
        self.inbound: queue.Queue[Frame | None] = queue.Queue()
        self.outbound: queue.Queue[tuple[str, Frame]] = queue.Queue()

    def send(self, frame: Frame, node: str | None = None) -> None:
        self.outbound.put((node or self.node, frame))


class NodeHost:
    """The Ray actor: builds its nodes (one base, their roles' states) and serves their frames
    on a thread of its own; ``push`` and ``pull`` only move frames."""

    def __init__(self, welcome: dict[str, Any], nodes: list[str], env: dict[str, str]) -> None:
        os.environ.update(env)
        logging.basicConfig(level=logging.WARNING)
        self.nodes = nodes
        self.dialer = QueueDialer(nodes)
        self.next_seq, self.early, self.lock = 0, {}, threading.Lock()
        self.thread = threading.Thread(target=self._serve, args=(welcome,), daemon=True)
        self.thread.start()

    def _serve(self, welcome: dict[str, Any]) -> None:
        from cotune.deploy.device import DeviceNode

        with tempfile.TemporaryDirectory(prefix="cotune-host-") as tmp:
            try:
                runtime = DeviceNode(self.dialer, welcome, Path(tmp), nodes=self.nodes,
                                     isolated=False)  # fmt: skip
            except Exception as err:  # noqa: BLE001 - the driver hears why, per node
                for node in self.nodes:
                    why = f"{node} could not start on its Ray host: {type(err).__name__}: {err}"
                    self.dialer.send(Frame(ERROR, {"error": why}), node)
                return
            runtime.serve()

    def push(self, seq: int, node: str, kind: int, header: dict[str, Any], payload: bytes) -> None:
        """One frame for ``node``; ``seq`` orders calls that a threaded actor may run out of
        order."""
        with self.lock:
            self.early[seq] = Frame(kind, {**header, "node": node}, payload)
            while self.next_seq in self.early:
                self.dialer.inbound.put(self.early.pop(self.next_seq))
                self.next_seq += 1

    def pull(self, wait_s: float) -> list[tuple[str, int, dict[str, Any], bytes]]:
        """The frames this host's nodes sent, waiting up to ``wait_s`` for the first."""
        out = []
        with contextlib.suppress(queue.Empty):
            out.append(self.dialer.outbound.get(timeout=wait_s))
            while len(out) < 256:
                out.append(self.dialer.outbound.get_nowait())
        return [(node, f.type, f.header, f.payload) for node, f in out]

    def ping(self) -> bool:
        return True


class RayLink:
    """The driver's end of one node on a host (the ``Hub`` link interface)."""

    def __init__(self, node: str, hub: RayHub, host: int) -> None:
        self.node, self.hub, self.host = node, hub, host
        self.open = True
        self.bytes_in = self.bytes_out = 0

    def send(self, frame: Frame) -> None:
        if not self.open:
            raise ConnectionError(f"{self.node} is disconnected")
        self.bytes_out += len(frame.payload) + len(frame.prefix())
        self.hub.push(self.host, self.node, frame)

    def close(self) -> None:
        self.open = False


class RayHub:
    """The driver's side: starts the host actors, places nodes on them, and queues their frames
    as ``(node, frame)`` exactly as the gRPC ``Hub`` does."""

    def __init__(self, engine_cfg: Any, nodes: list[str], welcome: dict[str, Any]) -> None:
        ray = ray_module()
        rc = engine_cfg.ray
        self.started_ray = False
        if not ray.is_initialized():
            ray.init(address=rc.address, num_cpus=rc.num_cpus, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)  # fmt: skip
            self.started_ray = True
        hosts = min(rc.hosts, len(nodes)) if nodes else 0
        self.placement = {n: i % hosts for i, n in enumerate(nodes)}  # round robin
        self.address = f"ray:{rc.address or 'local'} ({hosts} hosts)"
        self.inbound: queue.Queue[tuple[str, Frame | Closed]] = queue.Queue()
        self.links: dict[str, RayLink] = {}
        self.ready: dict[str, dict[str, Any]] = {}
        self.failed: dict[str, str] = {}
        self.joined = threading.Condition()
        self.closing = False
        self.seqs = [0] * hosts
        self.locks = [threading.Lock() for _ in range(hosts)]
        actor = ray.remote(
            num_cpus=rc.num_cpus_per_host, num_gpus=rc.num_gpus_per_host,
            max_concurrency=2, max_restarts=0,
        )(NodeHost)  # fmt: skip
        env = {"OMP_WAIT_POLICY": "PASSIVE"}
        if rc.threads_per_host is not None:
            env["OMP_NUM_THREADS"] = str(rc.threads_per_host)
        self.actors = []
        for h in range(hosts):
            mine = [n for n in nodes if self.placement[n] == h]
            self.actors.append(actor.remote(welcome, mine, env))
            for n in mine:
                self.links[n] = RayLink(n, self, h)
            threading.Thread(target=self._pull, args=(h, mine), daemon=True).start()

    def push(self, host: int, node: str, frame: Frame) -> None:
        with self.locks[host]:
            seq = self.seqs[host]
            self.seqs[host] += 1
            self.actors[host].push.remote(seq, node, frame.type, frame.header, frame.payload)

    def _pull(self, host: int, nodes: list[str]) -> None:
        ray = ray_module()
        actor = self.actors[host]
        while not self.closing:
            try:
                batch = ray.get(actor.pull.remote(PULL_WAIT_S))
            except Exception as err:  # noqa: BLE001 - a dead host: every node on it is gone
                if not self.closing:
                    log.warning("Ray host %d is gone (%s): %s", host, type(err).__name__,
                                ", ".join(nodes))  # fmt: skip
                for n in nodes:
                    link = self.links[n]
                    link.close()
                    self.inbound.put((n, Closed(link)))
                    with self.joined:
                        if n not in self.ready:
                            self.failed.setdefault(n, f"{n}: its Ray host died ({err})")
                        self.joined.notify_all()
                return
            for node, kind, header, payload in batch:
                frame = Frame(kind, header, payload)
                self.links[node].bytes_in += len(payload) + len(frame.prefix())
                if kind == READY:
                    with self.joined:
                        self.ready[node] = dict(header)
                        self.joined.notify_all()
                elif kind == ERROR and node not in self.ready:
                    log.error("%s", header.get("error"))
                    with self.joined:
                        self.failed[node] = str(header.get("error"))
                        self.joined.notify_all()
                else:
                    self.inbound.put((node, frame))

    def wait_for(self, nodes: list[str], timeout: float) -> list[str]:
        with self.joined:
            self.joined.wait_for(
                lambda: all(n in self.ready or n in self.failed for n in nodes), timeout
            )
            return [n for n in nodes if n not in self.ready]

    def close(self) -> None:
        ray = ray_module()
        for link in self.links.values():
            if link.open:
                with contextlib.suppress(Exception):
                    link.send(Frame(BYE))
                link.close()
        self.closing = True
        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a)
        if self.started_ray:
            ray.shutdown()
