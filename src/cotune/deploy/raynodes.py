"""``engine.kind: ray``: device roles on long-lived Ray actors, each a *node host* holding one
frozen base and many device roles' states (the local engine's one-base-many-states design), on
one machine or a Ray cluster. The driver (this process) hosts the server roles.

It is the gRPC engine over another transport: the same frames, the same ``GrpcEngine`` on the
driver and the same ``DeviceNode`` runtime on each host, so every paradigm runs unchanged and
gives the same result bit for bit. Frames to a host's nodes go as ordered actor calls
(``push``, all that queued up at once); a host's frames come back through a long poll
(``pull``) that a driver thread keeps open per host. Messages stay cotune's encoded messages (the counted bytes are unchanged); Ray moves the
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

from cotune.deploy.frames import BYE, ERROR, Frame
from cotune.deploy.transport import Closed, Joining
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
        # The driver numbers its frames per epoch; a restarted host (Ray ran __init__ again)
        # drops what was sent to its previous life and waits for the driver's next epoch.
        ray = ray_module()
        self.epoch = -1 if ray.get_runtime_context().was_current_actor_reconstructed else 0
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

    def push(self, frames: list[tuple[int, int, str, int, dict[str, Any], bytes]]) -> None:
        """Frames ``(epoch, seq, node, kind, header, payload)``, in the driver's order."""
        for frame in frames:
            self._push_one(*frame)

    def _push_one(
        self, epoch: int, seq: int, node: str, kind: int, header: dict[str, Any], payload: bytes
    ) -> None:
        """One frame for ``node``; ``seq`` orders calls that a threaded actor may run out of
        order, ``epoch`` tells frames for a previous life of this host."""
        with self.lock:
            if epoch <= 0 and self.epoch < 0 or epoch < self.epoch:
                return  # meant for the host that died
            if epoch > self.epoch:
                self.epoch, self.next_seq, self.early = epoch, 0, {}
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


def place(nodes: list[str], hosts: int, policy: str, profiles: dict[str, str]) -> dict[str, int]:
    """Which host each device lives on: round robin, or by profile (devices of one profile in
    contiguous blocks, as evenly sized as round robin's)."""
    hosts = max(1, min(hosts, len(nodes)))
    if policy == "by_profile":
        at = {n: i for i, n in enumerate(nodes)}
        ordered = sorted(nodes, key=lambda n: (profiles.get(n, ""), at[n]))
        size, extra = divmod(len(ordered), hosts)
        out, i = {}, 0
        for h in range(hosts):
            for n in ordered[i : i + size + (h < extra)]:
                out[n] = h
            i += size + (h < extra)
        return out
    return {n: i % hosts for i, n in enumerate(nodes)}


def check_host_memory(exp: Any, placement: dict[str, int], budget_gb: float) -> list[int]:
    """Each host's estimated peak bytes (one frozen base, every hosted device's adapter and
    optimizer state, one step's gradients and activations at a time); ConfigError naming the
    figures when one exceeds ``budget_gb``."""
    from cotune.paradigms.base import full_model_memory

    est = full_model_memory(exp.model, exp.cfg)
    base = est.weights - est.grads
    per_device = est.grads + est.optimizer
    step = est.grads + est.activations
    counts = [0] * (max(placement.values(), default=-1) + 1)
    for h in placement.values():
        counts[h] += 1
    need = [base + n * per_device + step for n in counts]
    budget = budget_gb * 1e9
    worst = max(range(len(need)), key=need.__getitem__, default=None)
    if worst is not None and need[worst] > budget:
        mb = 1e6
        raise ConfigError(
            f"engine.ray.memory_per_host_gb: host {worst} would hold {counts[worst]} devices: "
            f"base {base / mb:.1f} MB + {counts[worst]} x {per_device / mb:.2f} MB per device "
            f"state + {step / mb:.1f} MB for one step = {need[worst] / mb:.1f} MB > "
            f"{budget / mb:.1f} MB; use more hosts (engine.ray.hosts) or a larger budget"
        )
    return need


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


class RayHub(Joining):
    """The driver's side: starts the host actors, places nodes on them, and queues their frames
    as ``(node, frame)`` exactly as the gRPC ``Hub`` does."""

    def __init__(
        self, engine_cfg: Any, nodes: list[str], welcome: dict[str, Any],
        placement: dict[str, int],
    ) -> None:  # fmt: skip
        ray = ray_module()
        rc = engine_cfg.ray
        self.started_ray = False
        if not ray.is_initialized():
            ray.init(address=rc.address, num_cpus=rc.num_cpus, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)  # fmt: skip
            self.started_ray = True
        hosts = max(placement.values(), default=-1) + 1
        self.placement = placement
        self.address = f"ray:{rc.address or 'local'} ({hosts} hosts)"
        self.inbound: queue.Queue[tuple[str, Frame | Closed]] = queue.Queue()
        self.links: dict[str, RayLink] = {}
        super().__init__()
        self.closing = False
        self.seqs = [0] * hosts
        self.epochs = [0] * hosts
        self.max_restarts = rc.max_restarts
        self.locks = [threading.Lock() for _ in range(hosts)]
        self.outbox: list[list[Any]] = [[] for _ in range(hosts)]
        self.wake = [threading.Event() for _ in range(hosts)]
        actor = ray.remote(
            num_cpus=rc.num_cpus_per_host, num_gpus=rc.num_gpus_per_host,
            max_concurrency=2, max_restarts=rc.max_restarts,
        )(NodeHost)  # fmt: skip
        # Several hosts sharing cores: idle OpenMP threads must sleep, not spin (the spinning
        # steals the core another host needs). One host keeps OpenMP's default.
        env = {"OMP_WAIT_POLICY": "PASSIVE"} if hosts > 1 else {}
        if rc.threads_per_host is not None:
            env["OMP_NUM_THREADS"] = str(rc.threads_per_host)
        self.actors = []
        for h in range(hosts):
            mine = [n for n in nodes if self.placement[n] == h]
            self.actors.append(actor.remote(welcome, mine, env))
            for n in mine:
                self.links[n] = RayLink(n, self, h)
            threading.Thread(target=self._pull, args=(h, mine), daemon=True).start()
            threading.Thread(target=self._send, args=(h,), daemon=True).start()

    def host_of(self, node: str) -> int:
        return self.placement[node]

    def push(self, host: int, node: str, frame: Frame) -> None:
        """Queue a frame for ``host``; its sender thread ships what has queued up as one actor
        call, so starting 10,000 roles costs a handful of calls (each Ray call costs the
        driver and the host memory and time), while a lone frame leaves at once."""
        with self.locks[host]:
            seq = self.seqs[host]
            self.seqs[host] += 1
            self.outbox[host].append(
                (self.epochs[host], seq, node, frame.type, frame.header, frame.payload)
            )
            self.wake[host].set()

    def _send(self, host: int) -> None:
        while not self.closing:
            self.wake[host].wait(PULL_WAIT_S)
            with self.locks[host]:
                frames, self.outbox[host] = self.outbox[host], []
                self.wake[host].clear()
            if frames:
                with contextlib.suppress(Exception):  # a dead host: its pull thread says so
                    self.actors[host].push.remote(frames)

    def flush(self) -> None:
        """Ship every queued frame now (the run is ending)."""
        for host in range(len(self.actors)):
            with self.locks[host]:
                frames, self.outbox[host] = self.outbox[host], []
            if frames:
                with contextlib.suppress(Exception):
                    self.actors[host].push.remote(frames)

    def _pull(self, host: int, nodes: list[str]) -> None:
        ray = ray_module()
        actor = self.actors[host]
        restarts = 0
        while not self.closing:
            try:
                batch = ray.get(actor.pull.remote(PULL_WAIT_S))
            except Exception as err:  # noqa: BLE001 - a dead host: every node on it is gone
                if self.closing:
                    return
                log.warning("Ray host %d is gone (%s): %s", host, type(err).__name__,
                            ", ".join(nodes))  # fmt: skip
                for n in nodes:
                    link = self.links[n]
                    link.close()
                    self.inbound.put((n, Closed(link)))
                    self.fail(n, f"{n}: its Ray host died ({err})")
                if restarts >= self.max_restarts:
                    return
                restarts += 1
                # Ray restarts the actor; its devices come back on new links, and the engine
                # starts their roles again from their last known states (``_rejoin``).
                with self.locks[host]:
                    self.epochs[host] += 1
                    self.seqs[host] = 0
                    for n in nodes:
                        self.links[n] = RayLink(n, self, host)
                continue
            for node, kind, header, payload in batch:
                frame = Frame(kind, header, payload)
                self.links[node].bytes_in += len(payload) + len(frame.prefix())
                if not self.take(node, frame):
                    self.inbound.put((node, frame))

    def close(self) -> None:
        ray = ray_module()
        told: set[int] = set()  # one BYE ends a host's loop, for all its nodes
        for link in self.links.values():
            if link.open and link.host not in told:
                told.add(link.host)
                with contextlib.suppress(Exception):
                    link.send(Frame(BYE))
            link.close()
        self.flush()
        self.closing = True
        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a)
        if self.started_ray:
            ray.shutdown()
