"""``cotune launch`` splits the machine's cores among the device processes it starts."""

from __future__ import annotations

import os

import pytest

from cotune.deploy import launch as launch_mod


class _Done:
    def wait(self, timeout=None):
        return 0


@pytest.fixture
def started(monkeypatch, tmp_path):
    """Each device's environment as ``launch`` would start it (the run itself faked)."""
    envs: dict[str, dict[str, str]] = {}

    def start_cotune(argv, env, log_path, prefix=None):
        envs[argv[argv.index("--id") + 1]] = env
        return _Done()

    def run_experiment(cfg, **_):
        for hook in list(launch_mod.ON_LISTEN):
            hook("127.0.0.1:1")
        return tmp_path

    monkeypatch.setattr(launch_mod, "start_cotune", start_cotune)
    monkeypatch.setattr("cotune.run.run_experiment", run_experiment)
    return envs


def test_devices_split_the_cores_unless_told_otherwise(tiny_config, started, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    launch_mod.launch(tiny_config(devices={"count": 3}), quiet=True, report=False)
    want = str(launch_mod.device_threads(3))
    assert set(started) == {"device-0", "device-1", "device-2"}
    assert all(env["OMP_NUM_THREADS"] == want for env in started.values())
    assert all(env["OMP_WAIT_POLICY"] == "PASSIVE" for env in started.values())
    started.clear()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting stands
    launch_mod.launch(tiny_config(devices={"count": 2}), quiet=True, report=False)
    assert {env["OMP_NUM_THREADS"] for env in started.values()} == {"3"}


def test_device_threads_share_the_cores_and_never_drop_to_zero():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert launch_mod.device_threads(1) == cores
    assert launch_mod.device_threads(cores * 4) == 1
    assert launch_mod.device_threads(0) == cores
