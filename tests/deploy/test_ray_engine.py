"""engine.kind: ray — device roles on Ray actors (hosts holding several devices on one base),
the server roles in the driver: every paradigm gives the same run as the local engine, bit for
bit (records, FLOPs, bytes, simulated time, every role's weights)."""

import json
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from tests.paradigms.test_engines import CASES, DEPLOYED, outcome, reference, run  # noqa: E402
from tests.paradigms.test_fed_cohort import CAUSAL  # noqa: E402

RAY = {"kind": "ray", "ray": {"hosts": 2, "num_cpus_per_host": 0.5}}
# Cases whose float arithmetic depends on the thread count (hat-drafter trains a LayerNorm's
# weight and bias, whose gradients CPU kernels reduce in a thread-count-dependent order): their
# hosts run at this process's thread count, as the local reference did (Ray gives an actor with
# under one CPU a single OpenMP thread). Padding-free steps run their projections on [tokens,
# hidden] matrices whose row counts change every step; for some of them the CPU matmul splits
# its reduction by thread count.
THREAD_SENSITIVE = {"hat-drafter", "fedavg-padding-free"}
FED_2 = {"name": "fedavg", "options": {"local_steps": 2}}


@pytest.fixture(scope="module")
def ray_session():
    """One Ray instance for the module (a run joins it instead of starting its own)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def assert_same_run(got, want):
    assert got[0] == want[0]  # every record: losses, lr, round outcomes, bytes, simulated time
    for k in ("sim_time_s", "bytes", "messages", "final"):
        assert got[1][k] == want[1][k], k
    assert got[1]["costs"]["roles"] == want[1]["costs"]["roles"]
    for role in want[2]:
        for k, v in want[2][role].items():
            assert torch.equal(v, got[2][role][k]), (role, k)


@pytest.mark.slow
@pytest.mark.parametrize("case", DEPLOYED)
def test_every_paradigm_on_ray_equals_local(ray_session, tiny_config, case):
    want = reference(tiny_config, case, "local")
    sections = dict(CASES[case])
    sections["engine"] = {**sections.get("engine", {}), **RAY}
    if case in THREAD_SENSITIVE:
        threads = {"threads_per_host": torch.get_num_threads()}
        sections["engine"]["ray"] = {**sections["engine"]["ray"], **threads}
    got_dir = run(tiny_config, case, "ray", **sections)
    assert_same_run(outcome(got_dir), want)
    dep = json.loads((got_dir / "summary.json").read_text())["deployment"]
    assert dep["measured_wall_s"] > 0


def test_a_device_that_cannot_start_on_its_host_stops_the_run_with_the_reason(
    ray_session, tiny_config
):
    from cotune.errors import PeerUnavailable

    sections = {"paradigm": {"name": "fedavg"}, "engine": {**RAY, "join_timeout_s": 60}}
    cfg = tiny_config(name="bad-host", **sections)
    from cotune.deploy import launch as launch_mod
    from cotune.run import run_experiment

    real = launch_mod.welcome

    def broken(exp):  # a host builds its nodes from the config it is sent: data it lacks
        w = real(exp)
        w["config"]["data"]["dataset"] = "/nonexistent/data.jsonl"
        return w

    launch_mod.welcome = broken
    try:
        with pytest.raises(PeerUnavailable, match="could not start on its Ray host.*nonexistent"):
            run_experiment(cfg, quiet=True, report=False)
    finally:
        launch_mod.welcome = real


@pytest.mark.slow
def test_a_host_that_dies_fails_its_devices_round_and_comes_back(ray_session, tiny_config,
                                                                   monkeypatch):  # fmt: skip
    """Kill the host actor of device-1 as its round-2 request leaves: that reply fails, Ray
    restarts the host, and device-1 takes part again from its last known state."""
    from cotune.deploy import raynodes
    from cotune.deploy import server as server_mod

    seen = {}
    real_hub, real_engine = raynodes.RayHub.__init__, server_mod.GrpcEngine.__init__

    def hub_init(self, *a, **kw):
        real_hub(self, *a, **kw)
        seen["hub"] = self

    def kill_at_round_2(t):
        if t.kind == "train" and t.receiver == "device-1" and t.meta.get("round") == 2:
            hub = seen["hub"]
            if not seen.get("killed"):
                seen["killed"] = True
                ray.kill(hub.actors[hub.placement["device-1"]], no_restart=False)

    def engine_init(self, *a, **kw):
        real_engine(self, *a, **kw)
        self.add_listener(kill_at_round_2)

    monkeypatch.setattr(raynodes.RayHub, "__init__", hub_init)
    monkeypatch.setattr(server_mod.GrpcEngine, "__init__", engine_init)
    sections = {
        "paradigm": {"name": "fedavg", "options": {"local_steps": 1}},
        "train": {"steps": 4},
        "engine": {**RAY, "request_timeout_s": 60},
    }
    run_dir = run(tiny_config, "host-dies", "ray", **sections)
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    got = [(r["round"], r["reported"]) for r in recs if r["event"] == "round"]
    assert seen["killed"] and got == [(1, 2), (2, 1), (3, 2), (4, 2)]


HIER = {"num_groups": 1, "controller": "fixed", "tau": 1, "depth": 1, "local_steps": 2}
BIOT = {"adapter_layers": 1, "public_examples": 40, "initial_align_steps": 2, "align_steps": 1,
        "local_steps": 2}  # fmt: skip


# The cohort handler a Ray host runs is the local engine's: local's cohort is checked in
# tests/paradigms/test_local_cohort.py and every method's grouped forward (DoRA included) in
# tests/peft/test_peft_grouped.py; here one case per driver whose cohort a host batches.
@pytest.mark.slow
@pytest.mark.parametrize(
    "paradigm, method, extra",
    [("fedavg", "lora", {}), ("hierfed", "lora", HIER), ("fedbiot", "lora", BIOT)],
    ids=["fedavg-lora", "hierfed", "fedbiot"],
)  # fmt: skip
def test_a_hosts_devices_train_as_one_cohort_and_equal_the_local_cohort(
    ray_session, tiny_config, monkeypatch, paradigm, method, extra
):
    """A round's requests to devices sharing a host go as one frame and the host runs them as
    fedavg's cohort: the same run as the local engine's cohort."""
    from cotune.deploy import raynodes
    from cotune.deploy.frames import BATCH

    batches = []
    real_send = raynodes.RayLink.send

    def send(self, frame):
        if frame.type == BATCH:
            batches.append(len(frame.header["seqs"]))
        real_send(self, frame)

    monkeypatch.setattr(raynodes.RayLink, "send", send)
    sections = {
        **CAUSAL,  # no trained head: the cohort applies (a head cannot differ per row group)
        "paradigm": {"name": paradigm, "options": {"cohort": True, **extra}},
        "devices": {"count": 4},
        "peft": {**CAUSAL["peft"], "method": method},
    }
    want = outcome(run(tiny_config, f"cohort-{paradigm}-{method}", "local", **sections))
    # One host holds every device, so its cohort is the local engine's (two hosts would batch
    # two and two: the same run to float precision, not bit for bit).
    engine = {"kind": "ray", "ray": {"hosts": 1, "num_cpus_per_host": 0.5}}
    got_dir = run(tiny_config, f"cohort-{paradigm}-{method}", "ray", engine=engine, **sections)
    assert batches and set(batches) == {4}  # every round: the four devices in one frame
    assert_same_run(outcome(got_dir), want)
    nodes = json.loads((got_dir / "summary.json").read_text())["deployment"]["nodes"]
    assert nodes["device-0"]["batched_requests"] > 0  # the host ran them as a cohort


def _hub_spy(monkeypatch):
    """The RayHub of each run, as it is built."""
    from cotune.deploy import raynodes

    hubs = []
    real = raynodes.RayHub.__init__

    def init(self, *a, **kw):
        real(self, *a, **kw)
        hubs.append(self)

    monkeypatch.setattr(raynodes.RayHub, "__init__", init)
    return hubs


@pytest.mark.slow
def test_a_later_run_reuses_the_kept_hosts_and_gives_the_same_run(ray_session, tiny_config,
                                                                  monkeypatch):  # fmt: skip
    """Hosts outlive a run in a Ray the run did not start: the next run with the same host
    settings serves its devices on them (no new actor, none of their start-up) and equals the
    first; ``keep_hosts: false`` ends them with the run."""
    from cotune.deploy import raynodes

    hubs = _hub_spy(monkeypatch)
    sections = {"paradigm": FED_2, "engine": RAY}
    first = outcome(run(tiny_config, "keep-1", "ray", **sections))
    second = outcome(run(tiny_config, "keep-2", "ray", **sections))
    ids = [[a._actor_id.hex() for a in h.actors] for h in hubs]
    assert ids[0] == ids[1] and len(set(ids[0])) == 2
    assert_same_run(second, first)
    assert hubs[1].epochs == [e + 1 for e in hubs[0].epochs]  # a new epoch per run

    once = {**RAY, "ray": {**RAY["ray"], "keep_hosts": False}}
    third = outcome(run(tiny_config, "keep-3", "ray", paradigm=FED_2, engine=once))
    assert [a._actor_id.hex() for a in hubs[2].actors] == ids[0]  # it took the kept ones
    assert_same_run(third, first)
    assert not raynodes.HOSTS.idle  # ... and did not keep them
    deadline = time.monotonic() + 30
    for actor in hubs[2].actors:
        with pytest.raises(ray.exceptions.RayActorError):
            while time.monotonic() < deadline:  # ray.kill is asynchronous: a call made just
                ray.get(actor.release.remote(0.0), timeout=30)  # after it may still be served
                time.sleep(0.2)


@pytest.mark.slow
def test_idle_hosts_of_other_settings_are_ended_to_free_their_cpus(ray_session, tiny_config,
                                                                   monkeypatch):  # fmt: skip
    """Two kept half-CPU hosts hold one of the session's two CPUs: a run that wants one host
    with both CPUs could not be placed unless they end first."""
    from cotune.deploy import raynodes

    hubs = _hub_spy(monkeypatch)
    run(tiny_config, "halves", "ray", paradigm=FED_2, engine=RAY)
    assert sum(len(v) for v in raynodes.HOSTS.idle.values()) == 2
    whole = {"kind": "ray", "join_timeout_s": 60, "ray": {"hosts": 1, "num_cpus_per_host": 2}}
    got = outcome(run(tiny_config, "whole", "ray", paradigm=FED_2, engine=whole))
    assert_same_run(got, reference(tiny_config, "fedavg", "local"))
    assert not set(a._actor_id.hex() for a in hubs[1].actors) & {
        a._actor_id.hex() for a in hubs[0].actors
    }
    raynodes.release_idle_hosts()
    assert not raynodes.HOSTS.idle


def test_a_host_drops_frames_of_an_earlier_run_and_holds_those_of_a_later_one():
    """Epochs order a kept host's runs (a threaded actor runs calls out of order): frames of
    an epoch that has not started wait for its ``start``, in their sequence; frames of an
    earlier epoch are dropped."""
    from cotune.deploy.frames import ERROR, SEND
    from cotune.deploy.rayhost import NodeHost

    host = NodeHost({})
    host.push(
        [(1, 1, "device-0", SEND, {"k": "b"}, b""), (1, 0, "device-0", SEND, {"k": "a"}, b"")]
    )
    assert host.dialer.inbound.empty()  # epoch 1 has not started
    host.start(1, {}, ["device-0"])  # a welcome it cannot build from: it says why
    got = host.pull(5.0)
    assert [(n, k) for n, k, *_ in got] == [("device-0", ERROR)]
    assert "could not start on its Ray host" in got[0][2]["error"]
    assert host.release(5.0)
    inbound = [host.dialer.inbound.get_nowait()]
    inbound.append(host.dialer.inbound.get_nowait())
    assert [f.header["k"] for f in inbound] == ["a", "b"]  # held, then in sequence
    host.push([(0, 2, "device-0", SEND, {"k": "old"}, b"")])
    assert host.dialer.inbound.empty()  # an earlier run's frame: dropped
    host.start(0, {}, ["device-0"])  # a start that lost the race: ignored
    assert host.epoch == 1
