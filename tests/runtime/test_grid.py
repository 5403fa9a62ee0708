"""The Grid contract on its own: futures, gather outcomes (ok / failed / late) under the
simulator, snapshots as a measurement channel, and nested calls from a role."""

import pytest
import torch

from cotune.config import DevicesSection
from cotune.errors import PeerUnavailable
from cotune.runtime import LocalEngine, Message, Role
from cotune.runtime.engine_grid import EngineGrid
from cotune.runtime.ids import SERVER
from cotune.runtime.node import NodeContext
from cotune.sim.grid import SimulatedGrid
from cotune.sim.simulation import Simulation


class Host:
    """A NodeHost without models: ``device-<i>`` nodes holding nothing."""

    def __init__(self, n, isolated):
        self.n, self.isolated = n, isolated

    def node_ids(self):
        return [SERVER, *(f"device-{i}" for i in range(self.n))]

    def info(self, role_id):
        return {"examples": 10}

    def context(self, role_id, *, grid, meter):
        return NodeContext(role_id, None, 0, meter, grid=grid)


class Worker(Role):
    """Works ``flops`` (reported on its meter), then answers; device-1 may crash."""

    def __init__(self, ctx):
        super().__init__(ctx.node_id)
        self.ctx, self.box = ctx, {"seen": 0}

    @property
    def seen(self):
        return self.box["seen"]

    def on_work(self, msg):
        self.box["seen"] += 1
        if msg.meta.get("fail") == self.role_id:
            raise PeerUnavailable(f"{self.role_id} crashed")
        flops = float(msg.meta["flops"]) * (1 + int(self.role_id.split("-")[1]))
        self.ctx.meter.compute(flops, label="work")
        return msg.reply("done", {"x": torch.ones(3) * self.seen}, {"n": self.seen})

    def snapshot(self):
        return self.box

    def restore(self, state):
        self.box = state


class Edge(Role):
    """Asks its own device (a nested call through the grid) while handling the server."""

    def __init__(self, ctx):
        super().__init__(ctx.node_id)
        self.ctx = ctx

    def on_relay(self, msg):
        rep = self.ctx.grid.request(Message("work", self.role_id, "device-0", {}, {"flops": 1e6}))
        return msg.reply("relayed", rep.tensors, {"via": self.role_id})


def make_grid(isolated, n=3, **availability):
    devices = DevicesSection(count=n, availability=availability)
    sim = Simulation.from_config(devices, seed=0)
    engine = LocalEngine()
    engine.add_listener(sim.clock.on_transfer)
    kind = availability.get("kind", "always")
    grid = SimulatedGrid(EngineGrid(engine, Host(n, isolated), sim.flops), sim, kind)
    for d in grid.node_ids("device-"):
        grid.start(d, Worker)
    return grid, sim


def work(grid, **meta):
    meta = {"flops": 1e9, **meta}
    futures = [
        grid.submit(Message("work", SERVER, d, {}, meta), round=1) for d in grid.node_ids("device-")
    ]
    return futures


@pytest.mark.parametrize("isolated", [False, True])
def test_a_failed_peer_is_a_failed_reply_not_an_exception(isolated):
    grid, _ = make_grid(isolated)
    done = grid.gather(work(grid, fail="device-1"))
    assert [r.outcome for r in done.replies] == ["ok", "failed", "ok"]
    assert "crashed" in done.replies[1].error and done.replies[1].message is None
    assert all(r.arrival is not None and r.arrival <= done.closed_at for r in done.ok)


@pytest.mark.parametrize("isolated", [False, True])
def test_quorum_closes_at_the_quorum_th_reply_later_ones_are_late(isolated):
    grid, sim = make_grid(isolated)
    done = grid.gather(work(grid), quorum=2)
    # device-2 works three times as long as device-0: it is the one that misses the quorum.
    assert [r.outcome for r in done.replies] == ["ok", "ok", "late"]
    assert done.closed_at == done.replies[1].arrival
    assert sim.clock.free_at("device-2") > done.closed_at  # the late device stays busy


@pytest.mark.parametrize("isolated", [False, True])
def test_deadline_cuts_the_round(isolated):
    grid, _ = make_grid(isolated)
    futures = work(grid)
    arrivals = [f.result().arrival for f in futures]
    deadline = (arrivals[0] + arrivals[1]) / 2 - futures[0].submitted_at
    done = grid.gather(futures, deadline_s=deadline)
    assert [r.outcome for r in done.replies] == ["ok", "late", "late"]
    assert done.closed_at == pytest.approx(futures[0].submitted_at + deadline)


@pytest.mark.parametrize("isolated", [False, True])
def test_random_availability_drops_a_device_mid_round(isolated):
    grid, sim = make_grid(isolated, n=8, kind="random", drop_p=0.5)
    done = grid.gather(work(grid))
    failed = [r for r in done.replies if r.outcome == "failed"]
    assert failed and all("went offline in round 1" in r.error for r in failed)
    # The dropped devices did their work (their time is charged) but their upload never left.
    up = {t.sender for t in grid.transfers if t.receiver == SERVER}
    assert up == {r.role for r in done.ok}
    assert all(sim.clock.free_at(r.role) > 0 for r in failed)


@pytest.mark.parametrize("isolated", [False, True])
def test_snapshot_is_measurement_not_traffic(isolated):
    grid, _ = make_grid(isolated)
    grid.gather(work(grid))
    n = len(grid.transfers)
    state = grid.snapshot("device-0")
    assert state == {"seen": 1} and len(grid.transfers) == n
    state["seen"] = 42  # isolated: a copy; local: the role's own object (same process)
    assert grid.snapshot("device-0")["seen"] == (1 if isolated else 42)
    grid.restore("device-0", {"seen": 7})
    assert grid.snapshot("device-0") == {"seen": 7}


@pytest.mark.parametrize("isolated", [False, True])
def test_nested_calls_go_through_the_grid(isolated):
    grid, sim = make_grid(isolated, n=1)
    sim.clock.add_role("edge-0", sim.profiles[SERVER], hub=True)
    sim.profiles["edge-0"] = sim.profiles[SERVER]
    grid.start("edge-0", Edge)
    rep = grid.request(Message("relay", SERVER, "edge-0", {}, {}))
    assert rep.meta == {"via": "edge-0"} and torch.equal(rep.tensors["x"], torch.ones(3))
    kinds = [(t.sender, t.receiver, t.kind) for t in grid.transfers]
    assert kinds == [
        (SERVER, "edge-0", "relay"),
        ("edge-0", "device-0", "work"),
        ("device-0", "edge-0", "done"),
        ("edge-0", SERVER, "relayed"),
    ]


def test_connected_follows_periodic_availability():
    grid, sim = make_grid(False, n=4, kind="periodic", period_s=10.0, on_fraction=0.5, stagger=True)
    devices = grid.node_ids("device-")
    on = grid.connected(devices, round=1)
    assert on == [d for d in devices if sim.online(d, 1, sim.clock.free_at(SERVER))]
    grid.wait(5.0)
    assert sim.clock.free_at(SERVER) == 5.0


class Counted(Worker):
    built: list[str] = []

    def __init__(self, ctx):
        super().__init__(ctx)
        Counted.built.append(ctx.node_id)
        torch.rand(7)  # building must not move the caller's random stream


@pytest.mark.parametrize("isolated", [False, True])
def test_a_started_role_is_built_on_first_use(isolated):
    devices = DevicesSection(count=50)
    sim = Simulation.from_config(devices, seed=0)
    grid = SimulatedGrid(EngineGrid(LocalEngine(), Host(50, isolated), sim.flops), sim)
    Counted.built = []
    for d in grid.node_ids("device-"):
        grid.start(d, Counted)
    assert Counted.built == []
    with pytest.raises(Exception, match="already registered"):
        grid.start("device-3", Counted)
    before = torch.get_rng_state()
    rep = grid.submit(Message("work", SERVER, "device-7", {}, {"flops": 1e6}), round=1).result()
    assert rep.ok and Counted.built == ["device-7"]
    assert torch.equal(torch.get_rng_state(), before)
    # Checkpoints hold the roles that were used; a never-used role restores to nothing.
    assert list(grid.snapshots(grid.node_ids("device-"))) == ["device-7"]
    grid.restore("device-9", None)
    assert Counted.built == ["device-7"]
    # Measurement of a role that was only started builds it (its initial state).
    assert grid.snapshot("device-9") == {"seen": 0}
    assert Counted.built == ["device-7", "device-9"]


@pytest.mark.parametrize("isolated", [False, True])
def test_requests_made_together_are_sent_as_a_round_and_keep_the_clock(isolated):
    """``request_many(together=True)``: every request leaves before the first reply (counted
    so), the replies come back in order, and the simulated clock is that of one by one."""
    msgs = [Message("work", SERVER, f"device-{i}", {}, {"flops": 1e9}) for i in range(3)]
    one, sim_one = make_grid(isolated)
    apart = one.request_many(msgs)
    both, sim_both = make_grid(isolated)
    together = both.request_many(msgs, together=True)
    assert [r.sender for r in together] == [r.sender for r in apart] == [m.receiver for m in msgs]
    assert [r.arrival for r in together] == [r.arrival for r in apart]
    assert sim_both.clock.now == sim_one.clock.now
    assert [sim_both.clock.free_at(d) for d in both.node_ids("device-")] == [
        sim_one.clock.free_at(d) for d in one.node_ids("device-")
    ]
    kinds = [t.kind for t in both.transfers]
    assert kinds == ["work"] * 3 + ["done"] * 3
    assert [t.kind for t in one.transfers] == ["work", "done"] * 3
    assert sorted(t.nbytes for t in both.transfers) == sorted(t.nbytes for t in one.transfers)


def test_a_failed_peer_among_requests_made_together_raises():
    grid, _ = make_grid(False)
    msgs = [Message("work", SERVER, f"device-{i}", {}, {"flops": 1, "fail": "device-1"})
            for i in range(3)]  # fmt: skip
    with pytest.raises(PeerUnavailable, match="device-1 crashed"):
        grid.request_many(msgs, together=True)
