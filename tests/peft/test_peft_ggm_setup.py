"""GGM's setup stage in a run: warm-up scores (server or devices), the allocation, its costs."""

from __future__ import annotations

import json

import pytest
import torch

from cotune.build import build_experiment
from cotune.errors import AdapterError, ConfigError
from cotune.run import run_experiment

OPTIONS = {"important_nodes": 3, "kept_nodes": 6, "warmup_steps": 3}


def _ggm(tiny_config, **options):
    return tiny_config(
        peft={"method": "ggm", "options": {**OPTIONS, **options}},
        paradigm={"name": "fedavg", "options": {"local_steps": 1}},
        train={"steps": 2},
        eval={"every": 2, "max_examples": 16},
    )


def _events(exp, label):
    return [e for e in exp.sim.clock.events if e.label == label]


def test_server_warmup_allocates_and_is_charged_to_the_server(tiny_config, tmp_path):
    exp, _ = build_experiment(_ggm(tiny_config), tmp_path / "a", quiet=True)
    try:
        kept = exp.ggm_allocation["ranks"]
        assert sum(kept.values()) == 6 and exp.ggm_allocation["candidate_nodes"] == 16
        assert exp.ggm_allocation["score_samples"] == 3
        # Only the kept components train, each module at its own rank.
        assert {p: layer.r for p, layer in exp.adapters.layers.items()} == kept
        lora = sum(n.numel() for k, n in exp.trainer.params.items() if ".lora_" in k)
        sizes = {
            p: layer.in_features + layer.out_features for p, layer in exp.adapters.layers.items()
        }
        assert lora == sum(kept[p] * sizes[p] for p in kept)
        work = _events(exp, "ggm")
        assert (
            work and {e.role for e in work} == {"server"} and all(e.kind == "compute" for e in work)
        )
        assert exp.sim.flops.by_key["ggm"] > 0
        # The allocation is what every node injects: it travels in the adapter config.
        assert exp.peft_section.options["allocation"] == exp.ggm_allocation["allocation"]
    finally:
        exp.grid.close()
    again, _ = build_experiment(_ggm(tiny_config), tmp_path / "b", quiet=True)
    try:  # a device process or a resumed run rebuilds the same allocation and start
        assert again.ggm_allocation["allocation"] == exp.ggm_allocation["allocation"]
        for name, p in again.trainer.params.items():
            torch.testing.assert_close(p, exp.trainer.params[name], atol=0, rtol=0)
    finally:
        again.grid.close()


def test_federated_scores_are_sent_by_the_devices_and_counted(tiny_config, tmp_path):
    exp, _ = build_experiment(_ggm(tiny_config, source="federated"), tmp_path, quiet=True)
    try:
        sent = exp.ggm_allocation["report_bytes"]
        assert set(sent) == {"device-0", "device-1"}
        assert exp.ggm_allocation["score_samples"] == 6  # 3 steps on each device
        transfers = [e for e in _events(exp, "ggm") if e.kind == "transfer"]
        assert {(e.role, e.peer, e.nbytes) for e in transfers} == {
            (d, "server", n) for d, n in sent.items()
        }
        computed = {e.role for e in _events(exp, "ggm") if e.kind == "compute"}
        assert computed == {"device-0", "device-1"}
        # 16 nodes × 3 samples of fp32, plus the message's framing.
        assert all(16 * 3 * 4 < n < 16 * 3 * 4 + 2048 for n in sent.values())
        # Federated: the kept components start from their SVD values (no shared warm-up).
        layer = next(iter(exp.adapters.layers.values()))
        torch.testing.assert_close(layer.lora_B.weight, layer.lora_B0, atol=0, rtol=0)
    finally:
        exp.grid.close()


def test_run_writes_the_allocation_and_a_plain_lora_with_ranks(tiny_config):
    run_dir = run_experiment(_ggm(tiny_config), quiet=True, report=False)
    alloc = json.loads((run_dir / "ggm_allocation.json").read_text())
    saved = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA"
    assert sorted(saved["rank_pattern"].values()) == sorted(2 * k for k in alloc["ranks"].values())


def test_bad_settings_fail_before_training(tiny_config, tmp_path):
    cfg = _ggm(tiny_config, kept_nodes=16)
    with pytest.raises(AdapterError, match=r"peft.options.kept_nodes = 16 keeps 16 of the 16"):
        build_experiment(cfg, tmp_path, quiet=True)
    cfg = tiny_config(peft={"method": "ggm", "options": OPTIONS, "rank_pattern": {"query": 2}})
    with pytest.raises(AdapterError, match="rank_pattern / alpha_pattern come from the allocation"):
        build_experiment(cfg, tmp_path, quiet=True)


def test_a_device_with_its_own_data_cannot_rebuild_the_allocation(tiny_config, tmp_path):
    from cotune.build import NodeInputs
    from cotune.data import load_task_data

    cfg = _ggm(tiny_config)
    data = load_task_data(cfg.data, cfg.model.task, cfg.seed)
    with pytest.raises(ConfigError, match="ggm chooses its ranks from the run's training data"):
        build_experiment(cfg, tmp_path, quiet=True, inputs=NodeInputs(data, None, 0))
