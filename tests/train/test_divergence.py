"""Divergence and numeric honesty (run safety, cases 8 and 9): a non-finite loss or update stops
the run naming the step and role, keeps the last good checkpoint and never saves a non-finite
adapter; summaries are strict JSON; a device's non-finite upload is rejected, not averaged."""

import json
import math

import pytest
import torch

from cotune.errors import DivergenceError
from cotune.report.metrics import strict_json
from cotune.run import run_experiment
from cotune.rundir import checkpoints

DIVERGE = {"lr": 1e30, "max_grad_norm": None, "warmup_steps": 0, "schedule": "constant"}


def cfg_dir(cfg):
    from pathlib import Path

    return Path(cfg.output.dir) / cfg.name


def strict_load(path):
    def no_constants(name):
        raise AssertionError(f"{path} holds a bare {name}")

    return json.loads(path.read_text(), parse_constant=no_constants)


def test_divergence_stops_naming_step_and_role_and_saves_nothing_nonfinite(tiny_config):
    cfg = tiny_config(train={"steps": 6, **DIVERGE}, eval={"every": 1})
    with pytest.raises(
        DivergenceError, match=r"non-finite at step 1 in role 'server'.*nothing of it was kept"
    ) as err:
        run_experiment(cfg, quiet=True, report=False)
    assert err.value.step == 1 and err.value.role == "server"
    run_dir = cfg.output.dir + "/tiny"
    from pathlib import Path

    run_dir = Path(run_dir)
    assert not (run_dir / "adapter").exists() and not (run_dir / "summary.json").exists()
    for ckpt in checkpoints(run_dir):  # every checkpoint kept is a good one
        state = torch.load(ckpt, weights_only=False)
        for s in state["states"].values():
            assert all(bool(torch.isfinite(t).all()) for t in s["params"].values())
    # It diverged before producing anything: like any run that fails before it starts, it
    # leaves no directory behind (an old run it was to replace would be put back).
    assert not run_dir.exists()


def test_nonfinite_loss_keeps_the_last_good_checkpoint(tiny_config, monkeypatch):
    import cotune.paradigms.base as base

    real = base.full_model_loss

    def nan_from_step_5(*args):
        inner, calls = real(*args), {"n": 0}

        def loss_fn(batch):
            calls["n"] += 1
            loss = inner(batch)
            return loss * float("nan") if calls["n"] >= 5 else loss

        return loss_fn

    monkeypatch.setattr(base, "full_model_loss", nan_from_step_5)
    cfg = tiny_config(train={"steps": 6}, eval={"every": 3})
    with pytest.raises(
        DivergenceError,
        match=r"non-finite loss \(nan\) at step 5 in role 'server'.*last good checkpoint is step-0000003",
    ):
        run_experiment(cfg, quiet=True, report=False)
    run_dir = cfg_dir(cfg)
    assert [c.parent.name for c in checkpoints(run_dir)] == ["step-0000003"]
    assert not (run_dir / "adapter").exists()
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics"))


def test_divergence_in_a_device_names_the_device(tiny_config):
    cfg = tiny_config(
        train={"steps": 4, **DIVERGE}, paradigm={"name": "fedavg", "options": {"local_steps": 2}}
    )
    with pytest.raises(DivergenceError, match=r"in role 'device-0'"):
        run_experiment(cfg, quiet=True, report=False)


def test_skip_mode_finishes_with_a_finite_adapter_and_strict_json(tiny_config):
    cfg = tiny_config(train={"steps": 6, "on_nonfinite": "skip", **DIVERGE}, eval={"every": 3})
    run_dir = run_experiment(cfg, quiet=True, report=False)
    summary = strict_load(run_dir / "summary.json")
    assert summary["steps"] == 6
    from safetensors.torch import load_file

    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())


def test_strict_json_writes_null_for_nonfinite_numbers():
    text = strict_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -math.inf}})
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": None}}


def test_server_rejects_a_nonfinite_upload_and_counts_it(tiny_config, monkeypatch):
    """Case 9: a device's NaN update is refused for the round (counted), not averaged in."""
    from cotune.paradigms import fedavg

    real = fedavg.FedDevice.on_train

    def poisoned(self, msg):
        rep = real(self, msg)
        if self.role_id == "device-1":
            rep.tensors = {k: torch.full_like(v, float("nan")) for k, v in rep.tensors.items()}
        return rep

    monkeypatch.setattr(fedavg.FedDevice, "on_train", poisoned)
    cfg = tiny_config(paradigm={"name": "fedavg", "options": {"local_steps": 3}})
    run_dir = run_experiment(cfg, quiet=True, report=False)
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if r["event"] == "round"]
    assert [r["rejected"] for r in rounds] == [1, 1] and [r["reported"] for r in rounds] == [1, 1]
    assert strict_load(run_dir / "summary.json")["extra"]["rejected_updates"] == 2
    payload = torch.load(checkpoints(run_dir)[-1], weights_only=False)
    assert all(
        bool(torch.isfinite(t).all()) for t in payload["states"]["server"]["params"].values()
    )


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8", "topk0.5"])
def test_every_lossy_codec_refuses_nonfinite_values(codec):
    """Case 9: fp16/bf16 refuse NaN/inf like int8/top-k (the docs' promise)."""
    from cotune.errors import ProtocolError
    from cotune.runtime import Message
    from cotune.runtime.messages import encode_message

    for bad in (float("nan"), float("inf")):
        t = torch.tensor([1.0, bad, 2.0, 3.0])
        with pytest.raises(ProtocolError, match=r"tensor 'x'.*non-finite"):
            encode_message(Message("update", "device-1", "server", {"x": t}), codec)
