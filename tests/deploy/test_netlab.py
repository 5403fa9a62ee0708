"""Shaped links (device processes in network namespaces, tbf rates, a delaying proxy) and the
profiles calibrated from a deployed run. The namespace test needs root and `ip netns`; it is
skipped with the reason where they are not permitted."""

import json
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("grpc")

from cotune.config import config_from_dict  # noqa: E402
from cotune.deploy.calibrate import calibrated_profiles, write_profiles  # noqa: E402
from cotune.deploy.launch import launch  # noqa: E402
from cotune.deploy.netlab import DelayProxy, Link, ShapedLinks, netlab_unavailable  # noqa: E402
from cotune.errors import ConfigError  # noqa: E402
from cotune.run import run_experiment  # noqa: E402
from cotune.sim.profiles import load_profiles  # noqa: E402
from tests.conftest import tiny_config_dict  # noqa: E402
from tests.paradigms.test_engines import outcome  # noqa: E402


def echo_server() -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def test_the_delay_proxy_adds_its_latency_each_way_and_keeps_every_byte():
    srv, port = echo_server()
    proxy = DelayProxy("127.0.0.1", ("127.0.0.1", port), delay_s=0.05)
    host, _, pport = proxy.address.rpartition(":")
    try:
        c = socket.create_connection((host, int(pport)))
        payload = bytes(range(256)) * 4000  # 1 MB
        started = time.monotonic()
        c.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += c.recv(1 << 16)
        assert got == payload
        assert time.monotonic() - started >= 0.1  # 50 ms there, 50 ms back
        c.close()
    finally:
        proxy.close()
        srv.close()


def test_link_profile_fields_are_application_goodput():
    f = Link(up_mbit=8, down_mbit=16, latency_s=0.02).profile_fields()
    assert f["latency_s"] == 0.02
    assert 0.94e6 < f["up_bps"] < 1e6 and f["down_bps"] == pytest.approx(2 * f["up_bps"])


def test_calibrated_profiles_describe_the_measured_machines(tiny_config, tmp_path):
    run_dir = launch(
        tiny_config(name="calib", paradigm={"name": "fedavg"}), quiet=True, report=False
    )
    links = {"device-0": Link(4, 8, 0.03)}
    profiles = calibrated_profiles(run_dir, links)
    summary = json.loads((run_dir / "summary.json").read_text())
    nodes = summary["deployment"]["nodes"]
    assert set(profiles) == {"measured-server", "measured-device-0", "measured-device-1"}
    assert profiles["measured-device-1"]["flops"] == nodes["device-1"]["measured_flops_per_s"]
    assert profiles["measured-device-0"]["latency_s"] == 0.03
    loaded = load_profiles(write_profiles(profiles, tmp_path / "p.yaml"))
    assert loaded["measured-server"].latency_s == 0.0
    with pytest.raises(ConfigError, match="not a deployed run"):
        calibrated_profiles(
            run_experiment(tiny_config(name="plain"), quiet=True, report=False), links
        )


@pytest.mark.slow
def test_a_run_on_shaped_links_is_the_same_run_only_slower(tmp_path):
    why = netlab_unavailable()
    if why is not None:
        pytest.skip(why)
    links = {"device-0": Link(8, 8, 0.02), "device-1": Link(2, 4, 0.04)}
    raw = tiny_config_dict(tmp_path, paradigm={"name": "fedavg"})
    want = outcome(launch(config_from_dict({**raw, "name": "loopback"}), quiet=True, report=False))
    with ShapedLinks(links) as lab:
        run_dir = launch(config_from_dict({**raw, "name": "shaped"}), quiet=True, report=False,
                         wrap=lab.wrap, server_hosts=lab.hosts)  # fmt: skip
    got = outcome(run_dir)
    assert [r.get("loss") for r in got[0]] == [r.get("loss") for r in want[0]]
    for role in want[2]:
        for k, v in want[2][role].items():
            assert torch.equal(v, got[2][role][k]), (role, k)
    # Every byte device-1 uploaded went through its 2 Mbit/s link: a lower bound on the run.
    dep = json.loads((run_dir / "summary.json").read_text())["deployment"]
    up = dep["nodes"]["device-1"]["wire_bytes_up"]
    assert dep["measured_wall_s"] > up / (2e6 / 8)
