"""The Ray side of ``engine.kind: ray``: a host actor (``NodeHost``) that holds one frozen base
and many device roles' states and serves their frames; ``raynodes`` is the driver's side."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import tempfile
import threading
from pathlib import Path
from typing import Any

from cotune.deploy.frames import ERROR, Frame


class QueueDialer:
    """A host's end inside its actor: frames in from ``push``, frames out to ``pull``."""

    def __init__(self, nodes: list[str]) -> None:
        self.node = nodes[0]
        self.inbound: queue.Queue[Frame | None] = queue.Queue()
        # None: the run ended (wakes the driver's long poll, which is then told to stop)
        self.outbound: queue.Queue[tuple[str, Frame] | None] = queue.Queue()

    def send(self, frame: Frame, node: str | None = None) -> None:
        self.outbound.put((node or self.node, frame.owned()))  # pulled later


class NodeHost:
    """The Ray actor: imports cotune's device runtime once, then serves runs. ``start`` builds
    one run's nodes (one base, their roles' states) and serves their frames on a thread of its
    own; ``push`` and ``pull`` only move frames; ``release`` ends the run and says whether the
    host can serve another (a host kept between runs skips Ray's worker start and the imports,
    ~7 s on a 2-core machine)."""

    def __init__(self, env: dict[str, str]) -> None:
        os.environ.update(env)
        logging.basicConfig(level=logging.WARNING)
        import cotune.deploy.device  # noqa: F401 - the imports are most of a host's start-up

        self.lock = threading.Lock()
        # Frames carry the driver's epoch for this host: a new run, or a restart after the
        # host died, starts a higher one, and frames of an earlier one are dropped. ``waiting``
        # holds frames that arrived before their epoch's ``start`` (a threaded actor runs calls
        # out of order).
        self.epoch, self.next_seq = -1, 0
        self.early: dict[int, Frame] = {}
        self.waiting: dict[int, dict[int, Frame]] = {}
        self.dialer = QueueDialer([""])
        self.thread: threading.Thread | None = None

    def start(self, epoch: int, welcome: dict[str, Any], nodes: list[str]) -> None:
        """Build ``nodes`` from ``welcome`` and serve them as epoch ``epoch``."""
        self._end_run(0.0)
        with self.lock:
            if epoch <= self.epoch:
                return  # a start that lost the race with a newer one
            self.dialer = QueueDialer(nodes)
            self.epoch, self.next_seq = epoch, 0
            self.early = self.waiting.pop(epoch, {})
            self.waiting = {e: f for e, f in self.waiting.items() if e > epoch}
            self._drain()
            self.thread = threading.Thread(
                target=self._serve, args=(welcome, nodes, self.dialer), daemon=True
            )
            self.thread.start()

    def release(self, timeout_s: float) -> bool:
        """End the current run (its BYE is on its way); True when its thread stopped, so the
        host may serve another run."""
        return self._end_run(timeout_s)

    def _end_run(self, wait_s: float) -> bool:
        """Wait up to ``wait_s`` for the run's thread to end by itself, then tell it to stop
        (a run whose BYE never came, e.g. its driver died) and wait a little more."""
        thread = self.thread
        if thread is None:
            return True
        thread.join(wait_s)
        if thread.is_alive():
            self.dialer.inbound.put(None)
            thread.join(5.0)
        self.dialer.outbound.put(None)
        return not thread.is_alive()

    @staticmethod
    def _serve(welcome: dict[str, Any], nodes: list[str], dialer: QueueDialer) -> None:
        from cotune.deploy.device import DeviceNode

        with tempfile.TemporaryDirectory(prefix="cotune-host-") as tmp:
            try:
                runtime = DeviceNode(dialer, welcome, Path(tmp), nodes=nodes, isolated=False)
            except Exception as err:  # noqa: BLE001 - the driver hears why, per node
                for node in nodes:
                    why = f"{node} could not start on its Ray host: {type(err).__name__}: {err}"
                    dialer.send(Frame(ERROR, {"error": why}), node)
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
        order, ``epoch`` tells frames of an earlier run or of a previous life of this host."""
        frame = Frame(kind, {**header, "node": node}, payload)
        with self.lock:
            if epoch < self.epoch:
                return  # meant for an earlier run, or for the host that died
            if epoch > self.epoch:
                self.waiting.setdefault(epoch, {})[seq] = frame
                return
            self.early[seq] = frame
            self._drain()

    def _drain(self) -> None:
        while self.next_seq in self.early:
            self.dialer.inbound.put(self.early.pop(self.next_seq))
            self.next_seq += 1

    def pull(self, wait_s: float) -> list[tuple[str, int, dict[str, Any], bytes]]:
        """The frames this host's nodes sent, waiting up to ``wait_s`` for the first."""
        out, dialer = [], self.dialer  # one run's frames (``start`` may swap the dialer)
        with contextlib.suppress(queue.Empty):
            item = dialer.outbound.get(timeout=wait_s)
            while item is not None:
                out.append(item)
                if len(out) >= 256:
                    break
                item = dialer.outbound.get_nowait()
        return [(node, f.type, f.header, f.payload) for node, f in out]
