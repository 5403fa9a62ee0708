"""Faults in a real multi-process run: a device killed (SIGKILL) mid-round is a failed reply
and the run goes on; a device that comes back rejoins with its last known state."""

import json
import os
import signal
from pathlib import Path

import pytest

pytest.importorskip("grpc")

from cotune.deploy import launch as launch_mod  # noqa: E402
from cotune.deploy import server as server_mod  # noqa: E402

FED = {
    "paradigm": {"name": "fedavg", "options": {"local_steps": 1}},
    "train": {"steps": 4},
    "engine": {"request_timeout_s": 60},  # a hang fails the test in a minute, not ten
}


@pytest.fixture
def spy(monkeypatch):
    """The device processes `launch` starts (by id, with what started them) and the server's
    engine."""
    seen = {"procs": {}, "cmds": {}, "engine": None}
    real_start = launch_mod.start_cotune

    def start(argv, *args):
        p = real_start(argv, *args)
        node = argv[argv.index("--id") + 1]
        seen["procs"][node], seen["cmds"][node] = p, (argv, *args)
        return p

    monkeypatch.setattr(launch_mod, "start_cotune", start)
    real_init = server_mod.GrpcEngine.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        seen["engine"] = self

    monkeypatch.setattr(server_mod.GrpcEngine, "__init__", init)
    return seen


def rounds(run_dir):
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["event"] == "round"]


def kill_at_round(spy, rnd, then=None):
    def listener(t):
        if t.kind == "train" and t.receiver == "device-1" and t.meta.get("round") == rnd:
            p = spy["procs"]["device-1"]
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
                if then is not None:
                    then()

    return listener


@pytest.mark.slow
def test_a_killed_device_fails_its_rounds_and_the_run_goes_on(tiny_config, spy):
    launch_mod.ON_LISTEN.append(lambda addr: spy["engine"].add_listener(kill_at_round(spy, 2)))
    try:
        run_dir = launch_mod.launch(tiny_config(name="kill", **FED), quiet=True, report=False)
    finally:
        launch_mod.ON_LISTEN.pop()
    got = [(r["round"], r["participants"], r["reported"]) for r in rounds(run_dir)]
    assert got == [(1, 2, 2), (2, 2, 1), (3, 2, 1), (4, 2, 1)]
    assert json.loads((run_dir / "summary.json").read_text())["final"]["accuracy"] >= 0


@pytest.mark.slow
def test_a_device_that_comes_back_rejoins_with_its_state(tiny_config, spy):
    """Killed as its round-2 request leaves, restarted before the request is sent: it is built
    again and given its last known state (checkpoints every round: its state as of round 1),
    so the run equals one without the crash."""
    every = {"output": {"checkpoint_every": 1, "keep_checkpoints": 100}}
    whole = launch_mod.launch(tiny_config(name="whole", **FED, **every), quiet=True, report=False)

    def restart():
        spy["procs"]["device-1"] = launch_mod.start_cotune(*spy["cmds"]["device-1"])
        missing = spy["engine"].hub.wait_for(["device-1"], 60)
        assert not missing
        link = spy["engine"].hub.links["device-1"]
        import time

        deadline = time.time() + 60
        while link is spy["engine"].links_seen.get("device-1") or not link.open:
            assert time.time() < deadline
            time.sleep(0.05)
            link = spy["engine"].hub.links["device-1"]

    launch_mod.ON_LISTEN.append(
        lambda addr: spy["engine"].add_listener(kill_at_round(spy, 2, then=restart))
    )
    try:
        run_dir = launch_mod.launch(
            tiny_config(name="rejoin", **FED, **every), quiet=True, report=False
        )
    finally:
        launch_mod.ON_LISTEN.pop()
    assert [r["reported"] for r in rounds(run_dir)] == [2, 2, 2, 2]
    a = json.loads((whole / "summary.json").read_text())
    b = json.loads((run_dir / "summary.json").read_text())
    assert a["final"] == b["final"]


@pytest.mark.slow
def test_a_killed_server_resumes_and_its_devices_reconnect(tiny_config, tmp_path):
    """kill -9 the server mid-run, start it again with --resume: devices that keep retrying
    reconnect, and the result equals an uninterrupted run (the protocol is deterministic)."""
    import socket
    import time

    from cotune.config import dump_config

    whole = launch_mod.launch(tiny_config(name="ref", **FED), quiet=True, report=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tls = launch_mod.make_certs(tmp_path / "tls", ["device-0", "device-1"], ["127.0.0.1"])
    engine = {"kind": "grpc", "listen": f"127.0.0.1:{port}", "tls_dir": str(tls),
              "tokens_file": str(tls / "tokens.yaml"), "request_timeout_s": 60}  # fmt: skip
    sections = {k: v for k, v in FED.items() if k != "engine"}
    cfg = tiny_config(name="crash", engine=engine, output={"checkpoint_every": 1,
                      "keep_checkpoints": 100}, **sections)  # fmt: skip
    path = tmp_path / "crash.yaml"
    path.write_text(dump_config(cfg))
    logs = tmp_path / "logs"
    logs.mkdir()

    def spawn(name, args, env=None):  # forked from the warm interpreter, as launch does
        return launch_mod.start_cotune(args, {**os.environ, **(env or {})}, logs / f"{name}.log")

    server = spawn("server", ["serve", str(path), "--quiet"])
    devices = [
        spawn(d, ["device", "--server", f"127.0.0.1:{port}", "--id", d, "--tls", str(tls),
                  "--retry", "120"], {"COTUNE_TOKEN": (tls / f"{d}.token").read_text().strip()})
        for d in ("device-0", "device-1")
    ]  # fmt: skip
    run_dir = Path(cfg.output.dir) / "crash"
    try:
        deadline = time.time() + 120
        while not (run_dir / "checkpoints" / "step-0000002").exists():
            assert time.time() < deadline and server.poll() is None, (
                logs / "server.log"
            ).read_text()
            time.sleep(0.02)
        server.kill()
        server.wait()
        server = spawn("server", ["serve", str(path), "--quiet", "--resume"])
        assert server.wait(timeout=180) == 0, (logs / "server.log").read_text()
        for d in devices:
            assert d.wait(timeout=60) == 0
    finally:
        for p in [server, *devices]:
            if p.poll() is None:
                p.kill()
    a = json.loads((whole / "summary.json").read_text())
    b = json.loads((run_dir / "summary.json").read_text())
    assert a["final"] == b["final"] and a["sim_time_s"] == b["sim_time_s"]


class StartsWhenSet:
    """A device process started only once ``gate`` is set (the part of Popen's interface
    ``launch`` uses; ``wait`` before the start waits for the start)."""

    def __init__(self, start, gate):
        import threading

        self.process, self._started = None, threading.Event()

        def run():
            gate.wait()
            self.process = start()
            self._started.set()

        threading.Thread(target=run, daemon=True).start()

    @property
    def pid(self):
        return self.process.pid

    def poll(self):
        return None if self.process is None else self.process.poll()

    def wait(self, timeout=None):
        self._started.wait()
        return self.process.wait(timeout)

    def kill(self):
        if self.process is not None:
            self.process.kill()


@pytest.mark.slow
def test_a_run_starts_with_a_join_quorum_and_a_late_device_joins_fresh(
    tiny_config, spy, monkeypatch
):
    """device-1 starts late (as round 2's requests leave): the run begins with device-0 alone
    (engine.join_quorum 1), its requests to device-1 fail until it connects, then it takes
    part."""
    import threading
    import time

    from cotune.deploy import procs

    procs.warm(wait=True)  # device-0 joins in well under the join timeout, even on a busy machine
    gate = threading.Event()
    spied = launch_mod.start_cotune

    def start(argv, *args):
        if "device-1" in argv:
            return StartsWhenSet(lambda: spied(argv, *args), gate)
        return spied(argv, *args)

    monkeypatch.setattr(launch_mod, "start_cotune", start)

    def listener(t):
        if t.kind == "train" and t.receiver == "device-0" and t.meta.get("round") == 2:
            gate.set()
        if t.kind == "train" and t.receiver == "device-0" and t.meta.get("round") == 3:
            hub = spy["engine"].hub
            deadline = time.monotonic() + 60
            while "device-1" not in hub.ready and time.monotonic() < deadline:
                time.sleep(0.05)

    engine = {**FED["engine"], "join_timeout_s": 4, "join_quorum": 1}
    cfg = tiny_config(name="quorum", **{**FED, "engine": engine})
    launch_mod.ON_LISTEN.append(lambda addr: spy["engine"].add_listener(listener))
    try:
        run_dir = launch_mod.launch(cfg, quiet=True, report=False)
    finally:
        launch_mod.ON_LISTEN.pop()
        gate.set()  # a launch that failed before round 2 must not leave device-1 waiting
    got = [(r["round"], r["participants"], r["reported"]) for r in rounds(run_dir)]
    assert got == [(1, 2, 1), (2, 2, 1), (3, 2, 2), (4, 2, 2)]
