"""Clustered federated fine-tuning: devices end in clusters, each cluster its own adapter,
IFCA's choice costs K downloads and is counted, and each device is evaluated with its cluster."""

from __future__ import annotations

import json

import pytest

from cotune.config import config_from_dict
from cotune.paradigms import clustered
from cotune.run import run_experiment
from tests.conftest import tiny_config_dict
from tests.paradigms.test_central_local import final_params, records


def run(tmp_path, name, **options):
    d = tiny_config_dict(tmp_path, name=name, devices={"count": 4}, train={"steps": 8},
                         eval={"every": 4, "max_examples": 16},
                         partition={"scheme": "dirichlet", "alpha": 0.3})  # fmt: skip
    d["paradigm"] = {"name": "clustered", "options": {"local_steps": 2, "clusters": 2, **options}}
    return run_experiment(config_from_dict(d), quiet=True, report=True)


@pytest.mark.parametrize("assign", ["ifca", "updates"])
def test_each_cluster_trains_its_own_adapter_and_devices_are_evaluated_with_theirs(
    tmp_path, assign
):
    run_dir = run(tmp_path, assign, assign=assign, every=1)
    s = json.loads((run_dir / "summary.json").read_text())
    clusters = s["extra"]["clusters"]
    assert set(clusters) == {f"device-{i}" for i in range(4)} and set(clusters.values()) <= {0, 1}
    per = s["per_device_eval"]
    cluster_eval = {
        r["role"]: r for r in records(run_dir, "eval") if r["role"].startswith("cluster-")
    }
    for d, k in clusters.items():
        assert per[d]["accuracy"] == cluster_eval[f"cluster-{k}"]["accuracy"]
    params = final_params(run_dir)
    assert {"cluster-0", "cluster-1"} <= set(params)
    assert (run_dir / "adapter" / "cluster-0" / "adapter_config.json").is_file()
    assert "per-device accuracy" in (run_dir / "report.md").read_text()


def test_ifca_rounds_send_every_adapter_and_count_the_choice(tmp_path, monkeypatch):
    chose = []
    original = clustered.ClusterDevice._choose

    def spy(self, msg, count):
        k = original(self, msg, count)
        chose.append((self.role_id, int(msg.meta["round"]), k))
        return k

    monkeypatch.setattr(clustered.ClusterDevice, "_choose", spy)
    run_dir = run(tmp_path, "ifca", assign="ifca", every=2)
    rounds = {r["round"]: r for r in records(run_dir, "round")}
    assert {r for _, r, _ in chose} == {3}  # rounds 1 (random), 2 (kept), 3 (IFCA), 4 (kept)
    # The IFCA round sends both adapters: twice the bytes down of a kept round.
    assert rounds[3]["bytes_down"] > 1.8 * rounds[2]["bytes_down"]
