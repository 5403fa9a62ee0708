"""fedavg with secure aggregation: the same training as plain fedavg within the quantization
error, the extra protocol messages counted, a device that dies after sharing unmasked around."""

from __future__ import annotations

import json

import pytest
import torch

from cotune.config import config_from_dict
from cotune.errors import ConfigError
from cotune.run import run_experiment
from cotune.sim.grid import SimulatedGrid
from tests.conftest import tiny_config_dict
from tests.paradigms.test_central_local import final_params, records


def cfg(tmp_path, name, secure=None, **extra):
    opts = {
        "local_steps": 2,
        "rounds": 2,
        **({"secure_aggregation": secure} if secure is not None else {}),
    }
    d = tiny_config_dict(tmp_path, name=name, devices={"count": 4}, train={"steps": 4},
                         eval={"every": 4, "max_examples": 8}, **extra)  # fmt: skip
    d["paradigm"] = {"name": "fedavg", "options": opts}
    return config_from_dict(d)


def run(c):
    return run_experiment(c, quiet=True, report=False)


def test_secure_fedavg_trains_as_plain_fedavg_and_pays_for_its_messages(tmp_path):
    plain, secure = (
        run(cfg(tmp_path, "plain")),
        run(cfg(tmp_path, "secure", {"range": 0.5, "bits": 20})),
    )
    a, b = final_params(plain)["server"], final_params(secure)["server"]
    for k in a:  # 20-bit values over [-0.5, 0.5]: each step ~1e-6
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=0)
    rp, rs = records(plain, "round"), records(secure, "round")
    assert all(r["secagg_survived"] == 4 and r["secagg_dropped"] == 0 for r in rs)
    down = lambda rows: sum(r["bytes_down"] for r in rows)  # noqa: E731
    assert down(rs) > down(rp)  # keys and routed shares are real traffic
    s = json.loads((secure / "summary.json").read_text())
    assert s["final"]["accuracy"] == pytest.approx(
        json.loads((plain / "summary.json").read_text())["final"]["accuracy"], abs=0.13
    )


def test_a_device_dying_after_it_shared_is_unmasked_around(tmp_path, monkeypatch):
    original = SimulatedGrid._before_reply

    def dies(self, role, request, reply):  # device-1 goes dark after training in round 2
        if role == "device-1" and request.kind == "train" and request.meta["round"] == 2:
            return "device-1 lost power before uploading"
        return original(self, role, request, reply)

    monkeypatch.setattr(SimulatedGrid, "_before_reply", dies)
    rounds = records(run(cfg(tmp_path, "drop", {"range": 0.5})), "round")
    assert rounds[1]["secagg_dropped"] == 1 and rounds[1]["secagg_survived"] == 3
    assert "secagg_failed" not in rounds[1]


def test_refused_with_central_dp(tmp_path):
    c = cfg(tmp_path, "x", {})
    c.train.dp = c.train.dp.model_copy(update={"mode": "central", "noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="secure_aggregation: not with train.dp central"):
        run(c)
