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
import queue
import threading
import time
from typing import Any

from cotune.deploy.frames import BYE, Frame
from cotune.deploy.rayhost import NodeHost
from cotune.deploy.transport import Closed, Joining
from cotune.errors import ConfigError

log = logging.getLogger(__name__)
PULL_WAIT_S = 0.5  # a host's long poll returns at least this often (so a closed hub notices)
RESTART_POLL_S = 0.2  # how often a host that Ray is restarting is asked to start again
RELEASE_WAIT_S = 10.0  # a run's end: how long a kept host may take to finish its last frames


def ray_module() -> Any:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency of the ray extra
        raise ConfigError(
            "engine.kind: ray needs the `ray` package (pip install 'cotune[ray]')"
        ) from None
    return ray


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


class HostPool:
    """Host actors kept between runs of this driver process (tests, notebooks, sweeps), per Ray
    session and host settings (CPUs, GPUs, restarts, environment): a later run with the same
    settings takes them instead of starting new ones. A run takes what matches and kills every
    other idle host, whose reserved CPUs a new host may need."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.session: tuple[str, str] | None = None
        self.idle: dict[tuple[Any, ...], list[tuple[Any, int]]] = {}

    def take(self, session: tuple[str, str], key: tuple[Any, ...], n: int) -> list[tuple[Any, int]]:
        """Up to ``n`` idle hosts with ``key``, as (actor, the epoch to start it at)."""
        with self.lock:
            if session != self.session:  # Ray restarted: the old handles are gone with it
                self.session, self.idle = session, {}
            mine = self.idle.pop(key, [])
            others = [a for hosts in self.idle.values() for a, _ in hosts]
            others += [a for a, _ in mine[n:]]
            self.idle = {}
        _kill(others)
        return mine[:n]

    def give(self, session: tuple[str, str], key: tuple[Any, ...], actor: Any, epoch: int) -> None:
        """Keep ``actor`` for a later run, which starts it at ``epoch``."""
        with self.lock:
            if session == self.session:
                self.idle.setdefault(key, []).append((actor, epoch))
                return
        _kill([actor])

    def clear(self) -> None:
        with self.lock:
            idle = [a for hosts in self.idle.values() for a, _ in hosts]
            self.idle = {}
        _kill(idle)


def _kill(actors: list[Any]) -> None:
    if actors:
        ray = ray_module()
        for a in actors:
            with contextlib.suppress(Exception):
                ray.kill(a)


HOSTS = HostPool()


def release_idle_hosts() -> None:
    """Kill the host actors cotune keeps between runs (``engine.ray.keep_hosts``), freeing the
    CPUs and GPUs they hold in the Ray cluster."""
    HOSTS.clear()


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
        self.restarting: set[int] = set()  # hosts Ray is bringing back (frames wait)
        self.seqs = [0] * hosts
        self.epochs = [0] * hosts
        self.max_restarts = rc.max_restarts
        self.locks = [threading.Lock() for _ in range(hosts)]
        self.outbox: list[list[Any]] = [[] for _ in range(hosts)]
        self.wake = [threading.Event() for _ in range(hosts)]
        actor_cls = ray.remote(
            num_cpus=rc.num_cpus_per_host, num_gpus=rc.num_gpus_per_host,
            max_concurrency=4, max_restarts=rc.max_restarts,
        )(NodeHost)  # fmt: skip
        # Several hosts sharing cores: idle OpenMP threads must sleep, not spin (the spinning
        # steals the core another host needs). One host keeps OpenMP's default.
        env = {"OMP_WAIT_POLICY": "PASSIVE"} if hosts > 1 else {}
        if rc.threads_per_host is not None:
            env["OMP_NUM_THREADS"] = str(rc.threads_per_host)
        # Hosts outlive the run only in a Ray this run did not start (it shuts down with it).
        self.keep = rc.keep_hosts and not self.started_ray
        ctx = ray.get_runtime_context()
        self.session = (ctx.get_session_name(), ctx.get_job_id())
        self.key = (rc.num_cpus_per_host, rc.num_gpus_per_host, rc.max_restarts,
                    tuple(sorted(env.items())))  # fmt: skip
        # Idle hosts kept by earlier runs: this run serves on those that match (a run that
        # keeps none ends them after itself) and ends the rest, whose CPUs it may need.
        kept = HOSTS.take(self.session, self.key, hosts)
        self.welcome = welcome
        self.host_nodes = [[n for n in nodes if self.placement[n] == h] for h in range(hosts)]
        self.actors: list[Any] = []
        self.pullers: list[threading.Thread] = []
        for h, mine in enumerate(self.host_nodes):
            actor, self.epochs[h] = kept[h] if h < len(kept) else (actor_cls.remote(env), 0)
            actor.start.remote(self.epochs[h], welcome, mine)
            self.actors.append(actor)
            for n in mine:
                self.links[n] = RayLink(n, self, h)
            self.pullers.append(threading.Thread(target=self._pull, args=(h, mine), daemon=True))
            self.pullers[-1].start()
            threading.Thread(target=self._send, args=(h,), daemon=True).start()
        if kept:
            log.info("reusing %d Ray host(s) kept from an earlier run", len(kept))

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
                (self.epochs[host], seq, node, frame.type, frame.header, frame.owned().payload)
            )
            self.wake[host].set()

    def _send(self, host: int) -> None:
        while not self.closing:
            self.wake[host].wait(PULL_WAIT_S)
            with self.locks[host]:
                held = host in self.restarting  # held until the host is back and started
                if not held:
                    frames, self.outbox[host] = self.outbox[host], []
                    self.wake[host].clear()
            if held:
                time.sleep(RESTART_POLL_S)
                continue
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
                    self.restarting.add(host)
                    self.epochs[host] += 1
                    self.seqs[host] = 0
                    for n in nodes:
                        self.links[n] = RayLink(n, self, host)
                if not self._restarted(host, nodes):
                    return
                continue
            for node, kind, header, payload in batch:
                frame = Frame(kind, header, payload)
                self.links[node].bytes_in += len(payload) + len(frame.prefix())
                if not self.take(node, frame):
                    self.inbound.put((node, frame))

    def _restarted(self, host: int, nodes: list[str]) -> bool:
        """Wait until Ray has brought ``host`` back and it started ``nodes`` again (True), or
        it will not come back (False). While Ray restarts an actor, calls to it fail at once
        with ``ActorUnavailableError``: they are retried, never taken for another death (which
        used to spend the restart budget and bump the epoch again during one restart)."""
        ray = ray_module()
        from ray.exceptions import ActorUnavailableError

        while not self.closing:
            try:
                ray.get(self.actors[host].start.remote(self.epochs[host], self.welcome, nodes))
                with self.locks[host]:
                    self.restarting.discard(host)
                self.wake[host].set()  # what was queued for its nodes meanwhile goes now
                return True
            except ActorUnavailableError:
                time.sleep(RESTART_POLL_S)
            except Exception as err:  # noqa: BLE001 - out of restarts, or gone for good
                log.warning("Ray host %d did not come back (%s): %s", host,
                            type(err).__name__, ", ".join(nodes))  # fmt: skip
                return False
        return False

    def close(self) -> None:
        ray = ray_module()
        for link in self.links.values():
            link.close()
        for host, mine in enumerate(self.host_nodes):  # one BYE ends a host's run, for all
            if mine:  # its nodes (sent to every host: a host whose links closed is told too)
                self.push(host, mine[0], Frame(BYE))
        self.flush()
        self.closing = True
        if not self.keep:
            _kill(self.actors)
        else:
            refs = [a.release.remote(RELEASE_WAIT_S) for a in self.actors]
            kept = 0
            for host, (actor, ref) in enumerate(zip(self.actors, refs)):
                try:
                    idle = ray.get(ref, timeout=RELEASE_WAIT_S + 10)
                except Exception:  # noqa: BLE001 - a host that died or hangs is not kept
                    idle = False
                if idle:
                    HOSTS.give(self.session, self.key, actor, self.epochs[host] + 1)
                    kept += 1
                else:
                    _kill([actor])
            if kept:
                log.info("keeping %d Ray host(s) for the next run (engine.ray.keep_hosts; "
                         "cotune.deploy.raynodes.release_idle_hosts() frees their CPUs)", kept)  # fmt: skip
            for t in self.pullers:  # a release woke their long polls: they end at once
                t.join(PULL_WAIT_S + 1.0)
        if self.started_ray:
            ray.shutdown()
