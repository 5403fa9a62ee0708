"""Heterogeneous LoRA ranks: stacking aggregates the devices' deltas exactly, zero-padding does
not; each device trains and sends only its own rank components; ranks from memory; pruning."""

from __future__ import annotations

import json

import pytest
import torch

from cotune.config import config_from_dict
from cotune.paradigms import federated
from cotune.paradigms.fed_ranks import (
    device_ranks,
    expected,
    pad,
    pruned_rank,
    stack_and_refactor,
    stacked_delta,
    truncate,
)
from cotune.run import run_experiment
from tests.conftest import tiny_config_dict
from tests.paradigms.test_central_local import final_params, records

A, B = "l.lora_A.weight", "l.lora_B.weight"


def report(r, seed, full=8, d_in=6, d_out=5):
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(r, d_in, generator=g), B: torch.randn(d_out, r, generator=g),
            "head.weight": torch.randn(3, generator=g)}  # fmt: skip


def test_stacking_sums_the_deltas_exactly_and_zero_padding_does_not():
    reports, w = [report(2, 0), report(4, 1), report(1, 2)], [3.0, 1.0, 2.0]
    exact = sum(wi * r[B] @ r[A] for wi, r in zip(w, reports)) / sum(w)
    torch.testing.assert_close(stacked_delta(reports, w, A), exact)
    glob = report(8, 9)
    # Ranks 2 + 4 + 1 = 7 <= 8: the re-factored rank-8 adapter keeps the sum whole.
    new = stack_and_refactor(glob, reports, w)
    assert new[A].shape == glob[A].shape and new[B].shape == glob[B].shape
    torch.testing.assert_close(new[B] @ new[A], exact, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        new["head.weight"], sum(wi * r["head.weight"] for wi, r in zip(w, reports)) / 6
    )
    padded = [pad(r, glob) for r in reports]
    a = sum(wi * p[A] for wi, p in zip(w, padded)) / 6
    b = sum(wi * p[B] for wi, p in zip(w, padded)) / 6
    assert (b @ a - exact).norm() > 0.1 * exact.norm()


def test_truncate_pad_and_what_a_report_must_hold():
    full = report(8, 0)
    small = truncate(full, 3)
    assert small[A].shape == (3, 6) and small[B].shape == (5, 3)
    back = pad(small, full)
    assert (
        torch.equal(back[A][:3], full[A][:3]) and not back[A][3:].any() and not back[B][:, 3:].any()
    )
    assert expected(full, 3, 4)[A].shape == (3, 6)
    assert (
        expected(full, 5, 4) == {}
        and expected(full, "3", 4) == {}
        and expected(full, True, 4) == {}
    )


def test_pruning_drops_weak_trailing_components():
    r = report(4, 0)
    r[A][2:] *= 1e-3
    assert pruned_rank(r, 4, 0.1) == 2 and pruned_rank(r, 4, 0.0) == 4


class _Info:
    def __init__(self, table):
        self.table = table

    def __call__(self, d):
        return self.table[d]


def test_ranks_by_profile_device_and_memory(tmp_path):
    cfg = config_from_dict(tiny_config_dict(tmp_path, paradigm={"name": "fedavg"}, peft={"r": 8},
                                            devices={"count": 3, "ranks": {"phone-low": 2, "device-2": 4}}))  # fmt: skip
    info = _Info({"device-0": {"profile": "phone-low", "memory_bytes": 1.5e9},
                  "device-1": {"profile": "jetson", "memory_bytes": 48e9},
                  "device-2": {"profile": "phone-low", "memory_bytes": 3e9}})  # fmt: skip
    assert device_ranks(cfg, ["device-0", "device-1", "device-2"], info) == {
        "device-0": 2, "device-1": 8, "device-2": 4}  # fmt: skip
    cfg.devices.ranks = "memory"
    got = device_ranks(cfg, ["device-0", "device-1", "device-2"], info)
    assert got == {"device-0": 1, "device-1": 8, "device-2": 1}


def _run(tmp_path, name, method="lora", **opts):
    d = tiny_config_dict(
        tmp_path, name=name, devices={"count": 4, "ranks": {"device-0": 1, "device-1": 2, "device-2": 4}},
        peft={"r": 4, "method": method}, train={"steps": 4}, eval={"every": 4, "max_examples": 8},
    )  # fmt: skip
    d["paradigm"] = {"name": "fedavg", "options": {"local_steps": 2, "rounds": 2, **opts}}
    return run_experiment(config_from_dict(d), quiet=True, report=False)


@pytest.mark.parametrize(("how", "method"), [("zero_pad", "lora"), ("stack", "dora")])
def test_a_run_with_mixed_ranks_sends_each_device_its_own_components(
    tmp_path, monkeypatch, how, method
):
    sent = {}
    original = federated.FedDevice.report

    def spy(self, msg, results):
        out = original(self, msg, results)
        a = next(v for k, v in out.tensors.items() if k.endswith("lora_A.weight"))
        sent.setdefault(self.role_id, set()).add(a.shape[0])
        return out

    monkeypatch.setattr(federated.FedDevice, "report", spy)
    run_dir = _run(tmp_path, how, method, rank_aggregation=how)
    assert sent == {"device-0": {1}, "device-1": {2}, "device-2": {4}, "device-3": {4}}
    rounds = records(run_dir, "round")
    assert rounds[-1]["reported"] == 4 and rounds[-1]["rejected"] == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["extra"]["ranks"] == {"device-0": 1, "device-1": 2, "device-2": 4, "device-3": 4}
    a = next(v for k, v in final_params(run_dir)["server"].items() if k.endswith("lora_A.weight"))
    assert a.shape[0] == 4  # the global adapter keeps peft.r


def test_a_device_claiming_a_rank_it_was_not_given_is_rejected(tmp_path, monkeypatch):
    original = federated.FedDevice.report

    def liar(self, msg, results):
        out = original(self, msg, results)
        if self.role_id == "device-0":
            out.meta["rank"] = 4  # it was given 1
        return out

    monkeypatch.setattr(federated.FedDevice, "report", liar)
    rounds = records(_run(tmp_path, "liar"), "round")
    assert all(r["rejected"] == 1 and r["reported"] == 3 for r in rounds)


def test_self_pruning_lowers_ranks(tmp_path):
    summary = json.loads((_run(tmp_path, "prune", rank_prune=0.99) / "summary.json").read_text())
    ranks = summary["extra"]["ranks"]
    assert ranks["device-3"] < 4 and all(r >= 1 for r in ranks.values())
