import math

import pytest

from cotune.errors import ConfigError, DataError
from cotune.sim.availability import (
    Combined,
    DispatchShaper,
    Periodic,
    RandomDrop,
    Stragglers,
    Trace,
    behaviour_from_config,
)


def test_random_drop_is_deterministic_and_order_free():
    a, b = RandomDrop(0.3, seed=1), RandomDrop(0.3, seed=1)
    grid = [(d, r) for d in range(50) for r in range(20)]
    first = [a.available(d, r, 0.0) for d, r in grid]
    second = [b.available(d, r, 0.0) for d, r in reversed(grid)][::-1]
    assert first == second
    assert 0.25 < 1 - sum(first) / len(first) < 0.35
    assert first != [RandomDrop(0.3, seed=2).available(d, r, 0.0) for d, r in grid]
    with pytest.raises(ConfigError, match="drop_p"):
        RandomDrop(1.5)


def test_periodic_and_stagger():
    p = Periodic(10.0, 0.3, phase_s=0.0)
    assert [p.available(0, 0, t) for t in (0.0, 2.9, 3.0, 9.9, 10.5)] == [
        True,
        True,
        False,
        False,
        True,
    ]
    s = Periodic(10.0, 0.5, stagger=True, seed=4)
    phases = {tuple(s.available(d, 0, t) for t in range(10)) for d in range(20)}
    assert len(phases) > 1  # devices are not in lockstep
    assert s.available(3, 0, 7.0) == Periodic(10.0, 0.5, stagger=True, seed=4).available(3, 0, 7.0)


def test_trace_parsing_and_lookup(tmp_path):
    f = tmp_path / "trace.csv"
    f.write_text("device,start_s,end_s\n0,0,10\n0,5,20\n# comment\n1,100,200\n\n0,30,40\n")
    t = Trace.from_csv(f)
    assert t.intervals[0] == [(0.0, 20.0), (30.0, 40.0)]  # overlapping spans merged
    assert [t.available(0, 0, x) for x in (0, 19.9, 20, 35, 41)] == [True, True, False, True, False]
    assert t.available(1, 0, 150) and not t.available(2, 0, 150)


@pytest.mark.parametrize(
    "body, line, msg",
    [
        ("0,0,10\n1,abc,5\n", 2, "not numbers"),
        ("0,0,10\n0,0\n", 2, "expected device,start_s,end_s"),
        ("device,start_s,end_s\n0,0,10\n0,10,5\n", 3, "start_s < end_s"),
        ("-1,0,5\n", 1, "device >= 0"),
    ],
)
def test_trace_bad_lines_name_file_and_line(tmp_path, body, line, msg):
    f = tmp_path / "bad.csv"
    f.write_text(body)
    with pytest.raises(DataError, match=rf"bad\.csv:{line}: .*{msg}"):
        Trace.from_csv(f)


def test_stragglers_fixed_and_per_round():
    s = Stragglers(0.5, (2.0, 4.0), seed=0)
    fixed = [s.slowdown(d, 0) for d in range(40)]
    assert fixed == [s.slowdown(d, 7) for d in range(40)]
    slow = [x for x in fixed if x > 1]
    assert 10 < len(slow) < 30 and all(2.0 <= x <= 4.0 for x in slow)
    r = Stragglers(0.5, (3.0, 3.0), per_round=True, seed=0)
    assert [r.slowdown(d, 0) for d in range(40)] != [r.slowdown(d, 1) for d in range(40)]
    both = Combined(RandomDrop(0.0), Stragglers(1.0, (2.0, 2.0)), Stragglers(1.0, (3.0, 3.0)))
    assert both.slowdown(0, 0) == 6.0 and both.available(0, 0, 0.0)


def test_dispatch_batches_and_rate():
    ready = [5.0, 1.0, 3.0, 2.0, 9.0]
    assert DispatchShaper(batch_size=2).release(ready) == [5.0, 2.0, 5.0, 2.0, 9.0]
    # constant 0.5 reports/s from origin 0: allowance reaches n at 2n seconds
    assert DispatchShaper(rate=0.5).release(ready) == [8.0, 2.0, 6.0, 4.0, 10.0]
    # a rate function: 1 report/s for t < 3, then nothing → the rest are never released
    out = DispatchShaper(rate=lambda t: 1.0 if t < 3 else 0.0, horizon_s=20).release([0.0] * 4)
    assert out[:3] == pytest.approx([1.0, 2.0, 3.0], abs=0.02) and out[3] is None
    dropped = DispatchShaper(batch_size=1, drop_p=0.5, seed=3).release([0.0] * 200, round=2)
    assert 70 < sum(x is None for x in dropped) < 130
    assert dropped == DispatchShaper(batch_size=1, drop_p=0.5, seed=3).release([0.0] * 200, round=2)
    with pytest.raises(ConfigError, match="exactly one"):
        DispatchShaper()


def test_behaviour_from_config(tmp_path):
    from cotune.config import AvailabilitySection

    beh, shaper = behaviour_from_config(
        AvailabilitySection(kind="random", drop_p=1.0, straggler_fraction=1.0, dispatch_batch=3)
    )
    assert not beh.available(0, 0, 0.0) and beh.slowdown(0, 0) >= 2.0 and shaper.batch_size == 3
    beh, shaper = behaviour_from_config(AvailabilitySection())
    assert beh.available(5, 5, 5.0) and beh.slowdown(5, 5) == 1.0 and shaper is None
    assert not math.isnan(DispatchShaper(rate=1.0).release([0.5])[0])
