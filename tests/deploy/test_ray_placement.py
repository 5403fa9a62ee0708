"""Where a Ray run's devices live: the placement policies, and the per-host memory budget that
refuses, up front and with the figures, a run whose hosts would not fit."""

import pytest

from cotune.build import build_experiment
from cotune.deploy.raynodes import check_host_memory, place
from cotune.errors import ConfigError

NODES = [f"device-{i}" for i in range(7)]


def test_round_robin_spreads_devices_over_hosts():
    got = place(NODES, 3, "round_robin", {})
    assert [got[n] for n in NODES] == [0, 1, 2, 0, 1, 2, 0]
    assert set(place(NODES[:2], 5, "round_robin", {}).values()) == {0, 1}  # no idle hosts


def test_by_profile_keeps_one_kind_of_device_together():
    profiles = {n: ("jetson" if i % 2 else "phone-low") for i, n in enumerate(NODES)}
    got = place(NODES, 2, "by_profile", profiles)
    sizes = [list(got.values()).count(h) for h in (0, 1)]
    assert sizes == [4, 3]
    # in profile order, evenly sized: the 3 jetsons share host 0 (with one phone), host 1
    # holds only phones
    assert {got[n] for n in NODES if profiles[n] == "jetson"} == {0}
    assert {profiles[n] for n in NODES if got[n] == 1} == {"phone-low"}


def test_a_host_over_its_memory_budget_is_refused_with_the_figures(tiny_config, tmp_path):
    exp, _ = build_experiment(tiny_config(devices={"count": 6}), tmp_path / "run", quiet=True)
    try:
        placement = place([f"device-{i}" for i in range(6)], 2, "round_robin", {})
        need = check_host_memory(exp, placement, budget_gb=100.0)
        assert len(need) == 2 and need[0] == need[1] > 0
        one = check_host_memory(exp, place(["device-0"], 1, "round_robin", {}), 100.0)[0]
        # three devices on a host: two more device states than one
        with pytest.raises(ConfigError, match=r"host 0 would hold 3 devices: base .* MB \+ 3 x"):
            check_host_memory(exp, placement, budget_gb=(one + need[0]) / 2 / 1e9)
    finally:
        exp.grid.close()
