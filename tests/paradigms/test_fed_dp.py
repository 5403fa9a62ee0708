"""DP-FedAvg end to end: central and local noise, the privacy spent per round, clipping that
bounds what a device can move, target epsilon, resume, and the configs it refuses."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cotune.config import config_from_dict
from cotune.errors import ConfigError
from cotune.paradigms import federated
from cotune.run import run_experiment
from tests.conftest import tiny_config_dict
from tests.paradigms.test_central_local import (
    final_params,
    records,
    resumed_without_final_checkpoint,
)

FED = {"name": "fedavg", "options": {"local_steps": 2, "rounds": 3}}


def dp_config(tmp_path, name, **dp):
    return config_from_dict(tiny_config_dict(
        tmp_path, name=name, paradigm=FED, devices={"count": 4}, train={"steps": 6, "dp": dp},
        eval={"every": 2, "max_examples": 16},
    ))  # fmt: skip


def run(cfg):
    return run_experiment(cfg, quiet=True, report=False)


def _change(a, b):
    return math.sqrt(sum(float((a[k] - b[k]).pow(2).sum()) for k in a))


def test_central_clipping_bounds_each_rounds_move_and_epsilon_grows(tmp_path, monkeypatch):
    seen = []
    original = federated.FedDevice.begin_round

    def spy(self, msg):
        seen.append({k: v.clone() for k, v in msg.tensors.items()})
        return original(self, msg)

    monkeypatch.setattr(federated.FedDevice, "begin_round", spy)
    tight = run(dp_config(tmp_path, "tight", mode="central", clip=1e-3, noise_multiplier=0.0))
    # Without noise, clipping alone: each round moves the global adapter by at most the clip
    # (the sum of 4 clipped changes over 4 participants).
    by_round = seen[::4]  # the 4 devices of a round get the same global adapter
    moves = [_change(a, b) for a, b in zip(by_round, by_round[1:])]
    assert len(moves) == 2 and all(0 < m <= 1e-3 + 1e-7 for m in moves)
    assert all(r["dp_clipped"] == 4 for r in records(tight, "round"))
    noisy = run(dp_config(tmp_path, "noisy", mode="central", clip=1e-3, noise_multiplier=1.0))
    eps = [r["dp_epsilon"] for r in records(noisy, "round")]
    assert len(eps) == 3 and eps == sorted(eps) and eps[0] > 0
    summary = json.loads((noisy / "summary.json").read_text())["extra"]["dp"]
    assert summary["mode"] == "central" and summary["sample_rate"] == 1.0
    assert summary["epsilon"] == pytest.approx(eps[-1])
    assert _change(final_params(tight)["server"], final_params(noisy)["server"]) > 0


def test_target_epsilon_sets_the_noise_and_the_run_spends_about_it(tmp_path):
    cfg = dp_config(tmp_path, "t", mode="central", target_epsilon=5.0, delta=1e-3)
    summary = json.loads((run(cfg) / "summary.json").read_text())["extra"]["dp"]
    assert summary["noise_multiplier"] > 0
    assert 4.5 < summary["epsilon"] <= 5.0 + 1e-6


def test_local_dp_noises_each_upload_on_its_device(tmp_path, monkeypatch):
    uploads = []
    original = federated.FedDevice.report

    def spy(self, msg, results):
        out = original(self, msg, results)
        uploads.append(_change(out.tensors, {k: msg.tensors[k] for k in out.tensors}))
        return out

    monkeypatch.setattr(federated.FedDevice, "report", spy)
    run_dir = run(dp_config(tmp_path, "l", mode="local", clip=0.01, noise_multiplier=2.0))
    n = sum(v.numel() for v in final_params(run_dir)["server"].values())
    # Each upload differs from the global by noise of std 0.02 per value: norm ~ 0.02 sqrt(n).
    assert all(u == pytest.approx(0.02 * math.sqrt(n), rel=0.1) for u in uploads)
    dp = json.loads((run_dir / "summary.json").read_text())["extra"]["dp"]
    assert dp["mode"] == "local" and dp["sample_rate"] == 1.0 and dp["epsilon"] > 0


def test_resume_continues_the_ledger(tmp_path):
    cfg = dp_config(tmp_path, "r", mode="central", clip=0.05, noise_multiplier=1.2)
    full = run(cfg)
    want = json.loads((full / "summary.json").read_text())["extra"]["dp"]["epsilon"]
    before = final_params(full)["server"]
    resumed = resumed_without_final_checkpoint(cfg, full)
    got = json.loads((resumed / "summary.json").read_text())["extra"]["dp"]["epsilon"]
    assert got == pytest.approx(want)
    for k, v in final_params(resumed)["server"].items():
        torch.testing.assert_close(v, before[k])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"paradigm": {"name": "splitfed", "options": {"cut": 1}}}, "built for fedavg only"),
        ({"train": {"dp": {"mode": "central"}}}, "exactly one of noise_multiplier"),
    ],
)
def test_refused_configs(tmp_path, changes, message):
    base = tiny_config_dict(tmp_path, train={"dp": {"mode": "central", "noise_multiplier": 1.0}})
    for k, v in changes.items():
        base[k] = {**base.get(k, {}), **v} if k == "train" else v
    if "dp" in changes.get("train", {}):
        base["train"]["dp"] = changes["train"]["dp"]
    with pytest.raises(ConfigError, match=message):
        config_from_dict(base)
    opts = {**FED["options"], "aggregator": "median"}
    cfg = config_from_dict(tiny_config_dict(tmp_path, paradigm={"name": "fedavg", "options": opts},
                                            train={"dp": {"mode": "central", "noise_multiplier": 1.0}}))  # fmt: skip
    with pytest.raises(ConfigError, match="not a mean"):
        run(cfg)


def test_dp_with_dora_gives_the_same_run_on_the_isolated_engine(tmp_path):
    def cfg(name, engine):
        d = tiny_config_dict(
            tmp_path, name=name, paradigm=FED, devices={"count": 3},
            peft={"method": "dora"}, engine={"kind": engine},
            train={"steps": 4, "dp": {"mode": "local", "clip": 0.05, "noise_multiplier": 0.5}},
            eval={"every": 4, "max_examples": 8},
        )  # fmt: skip
        d["paradigm"] = {"name": "fedavg", "options": {"local_steps": 2, "rounds": 2}}
        return config_from_dict(d)

    local, isolated = run(cfg("loc", "local")), run(cfg("iso", "isolated"))
    a, b = final_params(local)["server"], final_params(isolated)["server"]
    assert any(k.endswith("lora_magnitude_vector") for k in a)  # DoRA's own parameters too
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
