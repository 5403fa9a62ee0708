"""FedAsync and FedBuff: reports taken in arrival order on the simulated clock, staleness per
report, versions per report (fedasync) or per buffer (fedbuff), one device with no staleness
equals fedavg, and a heterogeneous fleet finishes the same work sooner than synchronous rounds."""

from __future__ import annotations

import json

import pytest
import torch

from cotune.config import config_from_dict
from cotune.run import run_experiment
from tests.conftest import tiny_config_dict
from tests.paradigms.test_central_local import final_params, records

FLEET = {"count": 4, "mix": {"phone-low": 0.5, "jetson": 0.5}}


def run(tmp_path, name, paradigm, devices=FLEET, steps=8, **options):
    d = tiny_config_dict(tmp_path, name=name, devices=devices, train={"steps": steps},
                         eval={"every": 4, "max_examples": 16})  # fmt: skip
    d["paradigm"] = {"name": paradigm, "options": {"local_steps": 2, **options}}
    return run_experiment(config_from_dict(d), quiet=True, report=False)


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize(("kind", "extra"), [("fedasync", {}), ("fedbuff", {"buffer_size": 2})])
def test_reports_come_in_arrival_order_with_their_staleness(tmp_path, kind, extra):
    run_dir = run(tmp_path, kind, kind, **extra)
    ups = records(run_dir, "update")
    assert len(ups) == 16 and all(u["staleness"] >= 0 for u in ups)
    times = [u["sim_time_s"] for u in ups]
    assert times == sorted(times)  # taken as they reach the server
    assert any(u["staleness"] > 0 for u in ups)  # others moved on while a device trained
    # The Jetsons report more often than the phones: nobody waits for the slowest.
    by = {}
    for u in ups:
        by[u["role"]] = by.get(u["role"], 0) + 1
    assert max(by.values()) > min(
        by.get(d, 0) for d in ("device-0", "device-1", "device-2", "device-3")
    )
    versions = summary(run_dir)["extra"]["versions"]
    assert versions == (16 if kind == "fedasync" else 8)
    assert len(records(run_dir, "round")) == versions


def test_the_same_work_ends_sooner_than_synchronous_rounds(tmp_path):
    sync = summary(run(tmp_path, "sync", "fedavg"))
    buff = summary(run(tmp_path, "buff", "fedbuff", buffer_size=4))
    # 16 device tasks each: fedavg's rounds wait for the phones, fedbuff does not.
    assert buff["sim_time_s"] < 0.8 * sync["sim_time_s"]


def test_one_device_without_staleness_is_fedavg(tmp_path):
    one = {"count": 1}
    a = run(tmp_path, "avg", "fedavg", devices=one, steps=4)
    b = run(tmp_path, "buf", "fedbuff", devices=one, steps=4, buffer_size=1, staleness="constant",
            optimizer_state="keep")  # fmt: skip
    c = run(tmp_path, "asy", "fedasync", devices=one, steps=4, alpha=1.0, staleness="constant",
            optimizer_state="keep")  # fmt: skip
    pa = final_params(a)["server"]
    for other in (b, c):
        for k, v in final_params(other)["server"].items():
            torch.testing.assert_close(v, pa[k], atol=1e-6, rtol=0)


def test_stale_reports_are_dropped_past_the_limit(tmp_path):
    s = summary(run(tmp_path, "stale", "fedasync", max_staleness=0))
    assert s["extra"]["stale_dropped"] > 0
