import pytest

from cotune.errors import ConfigError
from cotune.sim.clock import Interval, VirtualClock
from cotune.sim.profiles import DeviceProfile


def prof(name, flops, up, down, lat):
    return DeviceProfile(name, "", flops, 1e9, up, down, lat, 0.01, 0.001)


def scenario():
    roles = {
        "server": prof("s", 100, 1e9, 1e9, 0.0),
        "a": prof("a", 10, 10, 20, 0.5),
        "b": prof("b", 5, 5, 10, 1.0),
        "c": prof("c", 10, 10, 10, 0.0),
    }
    return VirtualClock(roles)


def test_hand_built_round_matches_hand_computation():
    clk = scenario()
    # broadcast 100 B: the server sends to all at once; each device's downlink limits it
    down = [clk.transfer("server", d, 100) for d in "abc"]
    assert down == [
        Interval(0, 5.5),
        Interval(0, 11),
        Interval(0, 10),
    ]  # 0.5+100/20, 1+100/10, 100/10
    comp = [clk.compute("a", 50), clk.compute("b", 50), clk.compute("c", 50, slowdown=3)]
    assert comp == [Interval(5.5, 10.5), Interval(11, 21), Interval(10, 25)]
    up = [clk.transfer(d, "server", 40) for d in "abc"]  # uplink: 0.5+40/10, 1+40/5, 40/10
    assert up == [Interval(10.5, 15), Interval(21, 30), Interval(25, 29)]
    # the server handles each upload in arrival order (a 15, c 29, b 30), whatever order given
    served = clk.queue("server", [(30, 100), (15, 200), (29, 100)])
    assert served == [Interval(30, 31), Interval(15, 17), Interval(29, 30)]
    out = clk.round_end(["a", "b", "c"], quorum=2, deadline=29.5)
    assert (out.end_time, out.reported, out.dropped, out.met_quorum) == (
        29,
        ["a", "c"],
        ["b"],
        True,
    )
    assert clk.free_at("server") == 31  # still busy with b's (late) upload
    st = clk.stats()
    a = st["a"]
    assert (a.compute_s, a.comm_s, a.busy_s, a.flops, a.bytes_up, a.bytes_down) == (
        5,
        10,
        15,
        50,
        40,
        100,
    )
    assert a.energy_j == pytest.approx(50 * 0.01 + 140 * 0.001)
    s = st["server"]
    assert (s.compute_s, s.busy_s, s.flops, s.bytes_up, s.bytes_down) == (4, 4, 400, 300, 120)
    assert clk.now == 31


def test_device_is_serial_but_devices_overlap():
    clk = scenario()
    assert clk.compute("a", 10) == Interval(0, 1)
    assert clk.transfer("a", "server", 10) == Interval(1, 2.5)  # waits for its own compute
    assert clk.compute("c", 10) == Interval(0, 1)  # another device runs meanwhile
    assert clk.compute("a", 10, after=5) == Interval(5, 6)


def test_round_end_deadline_and_failures():
    clk = scenario()
    for d, f in (("a", 10), ("b", 50), ("c", 100)):  # a 1 s, b 10 s, c 10 s
        clk.compute(d, f)
    out = clk.round_end(["a", "b", "c"], quorum=3, deadline=5)
    assert (out.end_time, out.reported, out.dropped, out.met_quorum) == (
        5,
        ["a"],
        ["b", "c"],
        False,
    )
    out = clk.round_end(["a", "b", "c"], failed=["b"])  # no deadline: noticed when the rest report
    assert (out.end_time, out.reported, out.dropped, out.met_quorum) == (
        10,
        ["a", "c"],
        ["b"],
        False,
    )
    assert clk.barrier(["a", "b"]) == 10 and clk.free_at("a") == 10
    with pytest.raises(ValueError):
        clk.round_end(["a"], quorum=2)
    with pytest.raises(ConfigError, match="no device profile for role 'zz'"):
        clk.compute("zz", 1)


def test_engine_listener_charges_real_transfers_causally():
    torch = pytest.importorskip("torch")
    from cotune.runtime.engine import Role
    from cotune.runtime.local import LocalEngine
    from cotune.runtime.messages import Message

    clk = scenario()

    class Dev(Role):
        def on_train(self, msg):
            clk.compute(self.role_id, 20)
            return msg.reply("update", {"w": msg.tensors["w"] * 2})

    eng = LocalEngine()
    eng.register(Dev("a"))
    eng.register(Dev("c"))
    eng.add_listener(clk.on_transfer)
    w = torch.zeros(8)
    eng.request_many([Message("train", "server", d, {"w": w}) for d in ("a", "c")])
    t = eng.transfers
    ev = [e for e in clk.events if e.kind == "transfer"]
    assert [e.nbytes for e in ev] == [x.nbytes for x in t]
    n = t[0].nbytes
    assert ev[0].start == 0 and ev[0].end == 0.5 + n / 20
    assert ev[1].start == ev[0].end + 2  # the reply leaves after a's 2 s of compute
    assert ev[2].start == 0  # the server sends to c without waiting for a's reply
    assert clk.stats()["server"].bytes_down == t[1].nbytes + t[3].nbytes


def test_a_hubs_totals_do_not_depend_on_the_order_independent_transfers_reach_it():
    """Engines order a tick's independent sends by convention (a batched handler: every norm,
    then every activation; a network engine: each device's in turn); the totals are exact."""
    sends = [("a", 3), ("b", 7), ("c", 11), ("a", 1_000_003), ("b", 13), ("c", 999_999)]
    clocks = []
    for order in (sends, sends[::-1], sends[1::2] + sends[::2]):
        clock = scenario()
        for src, nbytes in order:
            clock.transfer(src, "server", nbytes)
        clocks.append(clock)
    server = [c.stats()["server"] for c in clocks]
    assert server[0] == server[1] == server[2]
    energy = [c.total_energy_j() for c in clocks]
    assert energy[0] == energy[1] == energy[2]
    assert energy[0] == pytest.approx(sum(s.energy_j for s in clocks[0].stats().values()))
