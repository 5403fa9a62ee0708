"""engine.kind: grpc — every paradigm with the server and each device in its own process,
talking over gRPC on loopback (TLS and per-device tokens, as `cotune launch` sets up), gives
the same run as the isolated engine: records, weights, FLOPs, bytes and simulated time."""

import pytest
import torch

pytest.importorskip("grpc")

from cotune.deploy.launch import launch  # noqa: E402
from cotune.run import run_experiment  # noqa: E402
from tests.paradigms.test_engines import CASES, DEPLOYED, outcome, reference  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("case", DEPLOYED)
def test_every_paradigm_over_grpc_equals_isolated(tiny_config, case):
    want = reference(tiny_config, case, "isolated")
    sections = dict(CASES[case])
    sections["engine"] = {**sections.get("engine", {}), "request_timeout_s": 60}
    cfg = tiny_config(name=f"{case}-grpc", **sections)
    got = outcome(launch(cfg, quiet=True, report=False))
    assert got[0] == want[0]  # every record: losses, lr, round outcomes, bytes, simulated time
    assert got[1]["sim_time_s"] == want[1]["sim_time_s"] and got[1]["bytes"] == want[1]["bytes"]
    assert got[1]["messages"] == want[1]["messages"] and got[1]["final"] == want[1]["final"]
    assert got[1]["costs"]["roles"] == want[1]["costs"]["roles"]
    for role in want[2]:
        for k, v in want[2][role].items():
            assert torch.equal(v, got[2][role][k]), (role, k)


def test_a_deployed_run_reports_measured_next_to_predicted(tiny_config):
    import json

    run_dir = launch(tiny_config(name="measured", paradigm={"name": "fedavg"}), quiet=True)
    dep = json.loads((run_dir / "summary.json").read_text())["deployment"]
    assert dep["measured_wall_s"] > 0 and dep["predicted_time_s"] > 0
    assert dep["nodes"]["device-0"]["process"] != dep["nodes"]["device-1"]["process"]
    for node in ("device-0", "device-1"):
        n = dep["nodes"][node]
        # Wire bytes carry every message plus framing, control and measurement frames.
        assert n["wire_bytes_down"] > n["message_bytes_down"] > 0
        assert n["wire_bytes_up"] > n["message_bytes_up"] > 0
        assert n["measured_busy_s"] > 0 and n["predicted_busy_s"] > 0
    assert "Predicted vs measured (deployed run)" in (run_dir / "report.html").read_text()


@pytest.mark.slow
def test_requests_made_together_reach_every_device_before_the_first_reply(tiny_config, monkeypatch):
    """hat_drafter asks its devices together (``request_many(together=True)``): over gRPC each
    step's requests are all on the wire before the server waits for the first answer, so the
    devices compute at once; DLoRA-style one-by-one requests would alternate."""
    from cotune.deploy.server import GrpcEngine

    events = []
    prepare, finish = GrpcEngine._prepare, GrpcEngine._finish

    def logged_prepare(self, msg, codec):
        events.append(("sent", msg.kind, msg.receiver))
        return prepare(self, msg, codec)

    def logged_finish(self, msg, *rest):
        reply = finish(self, msg, *rest)
        events.append(("answered", msg.kind, msg.receiver))
        return reply

    monkeypatch.setattr(GrpcEngine, "_prepare", logged_prepare)
    monkeypatch.setattr(GrpcEngine, "_finish", logged_finish)
    sections = dict(CASES["hat-drafter"])
    sections["engine"] = {"request_timeout_s": 60}
    launch(tiny_config(name="together", **sections), quiet=True, report=False)
    embeds = [e for e in events if e[1] == "embed"]
    assert len(embeds) >= 8
    for i in range(0, len(embeds), 4):  # one step: both requests, then both answers
        assert [e[0] for e in embeds[i : i + 4]] == ["sent", "sent", "answered", "answered"]
        assert {e[2] for e in embeds[i : i + 2]} == {"device-0", "device-1"}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["fedavg", "fedavg-cohort", "splitfed-pooled-global-clip",
                                  "dlora-kill-revive", "split-p2p", "hierfed"])  # fmt: skip
def test_devices_sharing_a_process_equal_the_local_engine(tiny_config, case):
    """`cotune launch --devices-per-process 2`: both devices in one process on one frozen base
    (each still dials and authenticates as itself, TLS and tokens on): the local engine's run."""
    if case == "fedavg-cohort":  # the round's train requests as one BATCH frame, one cohort
        sections = {"paradigm": {"name": "fedavg", "options": {"local_steps": 2, "cohort": True}}}
        want = outcome(run_experiment(tiny_config(name="cohort-local", **sections), quiet=True,
                                      report=False))  # fmt: skip
    else:
        want = reference(tiny_config, case, "local")
        sections = dict(CASES[case])
    sections["engine"] = {**sections.get("engine", {}), "request_timeout_s": 60}
    run_dir = launch(tiny_config(name=f"{case}-shared", **sections), quiet=True, report=False,
                     devices_per_process=2)  # fmt: skip
    got = outcome(run_dir)
    assert got[0] == want[0] and got[1]["final"] == want[1]["final"]
    assert got[1]["costs"]["roles"] == want[1]["costs"]["roles"]
    for role in want[2]:
        for k, v in want[2][role].items():
            assert torch.equal(v, got[2][role][k]), (role, k)
    import json

    nodes = json.loads((run_dir / "summary.json").read_text())["deployment"]["nodes"]
    assert nodes["device-0"]["process"] == nodes["device-1"]["process"] is not None
    if case == "fedavg-cohort":
        assert nodes["device-0"]["batched_requests"] > 0
        # The batch frames went on device-0's stream; each device is counted its own share.
        down = [nodes[d]["wire_bytes_down"] for d in ("device-0", "device-1")]
        assert abs(down[0] - down[1]) <= 0.05 * max(down), down
