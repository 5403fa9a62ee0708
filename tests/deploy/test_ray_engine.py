"""engine.kind: ray — device roles on Ray actors (hosts holding several devices on one base),
the server roles in the driver: every paradigm gives the same run as the local engine, bit for
bit (records, FLOPs, bytes, simulated time, every role's weights)."""

import json

import pytest
import torch

ray = pytest.importorskip("ray")

from tests.paradigms.test_engines import CASES, RESUMABLE, outcome, run  # noqa: E402

RAY = {"kind": "ray", "ray": {"hosts": 2, "num_cpus_per_host": 0.5}}


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
@pytest.mark.parametrize("case", RESUMABLE)
def test_every_paradigm_on_ray_equals_local(ray_session, tiny_config, case):
    want = outcome(run(tiny_config, case, "local", **CASES[case]))
    sections = dict(CASES[case])
    sections["engine"] = {**sections.get("engine", {}), **RAY}
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
