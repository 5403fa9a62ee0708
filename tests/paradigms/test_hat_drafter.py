"""hat_drafter: HAT's drafter distilled federatedly as a counted run, then served by `cotune infer`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cotune.cli import main
from cotune.errors import ConfigError
from cotune.infer.drafter import load_drafter
from cotune.infer.split import UCut
from cotune.run import run_experiment

LM = {
    "model": {"name_or_path": "random:gpt2", "task": "causal_lm", "max_length": 32,
              "random_config": {"n_layer": 4}},
    "data": {"dataset": "austen", "view": "text", "labels": [], "max_examples": 80},
    "peft": {"target_modules": ["c_attn"]},
    "train": {"steps": 6, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0},
    "eval": {"every": 3, "max_examples": 16},
}  # fmt: skip


def drafter_config(tiny_config, **over):
    sections = {"name": "drafter", **LM,
                "paradigm": {"name": "hat_drafter", "options": {"local_steps": 3}}}  # fmt: skip
    for k, v in over.items():
        sections[k] = {**sections.get(k, {}), **v} if isinstance(v, dict) else v
    return tiny_config(**sections)


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_devices_distil_a_drafter_that_learns_and_every_exchange_is_counted(tiny_config):
    run_dir = run_experiment(drafter_config(tiny_config), quiet=True, report=False)
    recs = records(run_dir)
    mean = [r["loss"] for r in recs if r["event"] == "train" and r["role"] == "mean"]
    assert len(mean) == 6 and mean[-1] < mean[0]  # distillation makes progress
    evals = [r for r in recs if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    # an untrained drafter (identity: it skips the middle) vs the distilled one
    assert 0.0 <= evals[0]["drafter_acceptance"] <= 1.0
    assert evals[-1]["drafter_loss"] < evals[0]["drafter_loss"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["drafter_acceptance"] == evals[-1]["drafter_acceptance"]
    roles = summary["costs"]["roles"]
    # the devices ran their input blocks and trained the drafter; the cloud ran the middle
    assert roles["device-0"]["flops"] > 0 and roles["server"]["flops"] > 0
    # per step and device: hidden states up, the middle's output down, both [4, T, 64] floats;
    # plus each round's adapter down (load) and up (report)
    assert summary["bytes"]["up"] > 6 * 2 * 4 * 8 * 64 * 4  # at least 8 positions a batch
    assert summary["bytes"]["down"] > 6 * 2 * 4 * 8 * 64 * 4
    # the product: a drafter `cotune infer` reads, and the model's own adapter
    drafter = load_drafter(run_dir / "drafter" / "cut-1-1", UCut(1, 1), 64)
    assert drafter is not None
    assert (run_dir / "adapter").is_dir()


def test_the_run_directory_serves_with_its_drafter(tiny_config, tmp_path, capsys):
    run_dir = run_experiment(drafter_config(tiny_config), quiet=True, report=False)
    meta = json.loads((run_dir / "drafter" / "cut-1-1" / "drafter.json").read_text())
    assert meta["paradigm"] == "hat_drafter" and meta["devices"] == 2
    capsys.readouterr()
    out = tmp_path / "gen.json"
    args = ["infer", str(run_dir), "--prompt", "It is a truth", "--max-new-tokens", "4",
            "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "distilling" not in capsys.readouterr().err  # the run's drafter, not a new one
    assert len(json.loads(out.read_text())["tokens"]) == 4


def test_resume_equals_the_uninterrupted_run(tiny_config):
    """The drafter and its optimizer resume exactly (isolated: test_engines' RESUMABLE)."""
    from cotune.rundir import checkpoints
    from tests.paradigms.test_central_local import kill_after

    over = {"output": {"checkpoint_every": 2, "keep_checkpoints": 100},
            "engine": {"kind": "local"}}  # fmt: skip
    whole = run_experiment(
        drafter_config(tiny_config, name="whole", **over), quiet=True, report=False
    )
    cfg = drafter_config(tiny_config, name="part", **over)
    run_dir = run_experiment(cfg, quiet=True, report=False)
    first = checkpoints(run_dir)[0].parent.name
    kill_after(run_dir, int(first.removeprefix("step-")))
    (run_dir / "summary.json").unlink()
    run_experiment(cfg, quiet=True, report=False, resume=True)
    a = json.loads((whole / "summary.json").read_text())
    b = json.loads((run_dir / "summary.json").read_text())
    assert a["final"] == b["final"] and a["sim_time_s"] == b["sim_time_s"]
    from safetensors.torch import load_file

    pa, pb = (
        load_file(r / "drafter" / "cut-1-1" / "drafter.safetensors") for r in (whole, run_dir)
    )
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def test_bad_settings_are_refused_before_anything_runs(tiny_config):
    with pytest.raises(ConfigError, match="model.task: hat_drafter drafts tokens"):
        tiny_config(paradigm={"name": "hat_drafter"})
    with pytest.raises(ConfigError, match="mse_weight and kl_weight cannot both be 0"):
        drafter_config(tiny_config, paradigm={"name": "hat_drafter",
                                              "options": {"mse_weight": 0, "kl_weight": 0}})  # fmt: skip
    cfg = drafter_config(
        tiny_config, paradigm={"name": "hat_drafter", "options": {"n_in": 2, "n_out": 2}}
    )
    with pytest.raises(ConfigError, match="cut"):
        run_experiment(cfg, quiet=True, report=False)
    assert not (Path(cfg.output.dir) / cfg.name).exists()  # refused before any file


def test_a_device_uploading_bad_hidden_states_skips_its_step_and_the_run_goes_on(
    tiny_config, monkeypatch
):
    from cotune.paradigms import hat_drafter

    real = hat_drafter.DrafterDevice.on_embed

    def poisoned(self, msg):
        out = real(self, msg)
        if self.role_id == "device-1" and msg.meta["step"] == 2:
            out.tensors["hidden"] = torch.full_like(out.tensors["hidden"], float("nan"))
        return out

    monkeypatch.setattr(hat_drafter.DrafterDevice, "on_embed", poisoned)
    run_dir = run_experiment(drafter_config(tiny_config), quiet=True, report=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["extra"]["rejected_uploads"] == 1
    step2 = [r for r in records(run_dir) if r["event"] == "train" and r["step"] == 2]
    assert {r["role"] for r in step2} == {"mean", "device-0"}  # device-1 skipped that step
    import math

    assert all(math.isfinite(r["loss"]) for r in step2)
    assert math.isfinite(summary["final"]["drafter_acceptance"])


def test_gradient_accumulation_equals_the_larger_batch(tiny_config):
    """train.grad_accum: each step is grad_accum round trips (embed, middle) of one batch each,
    the drafter stepping after the last; with one device and full-length rows, 2 x batch 2 is
    the run of batch 4 to float rounding, in twice the exchanges."""
    out = {}
    for accum, batch in ((2, 2), (1, 4)):
        cfg = drafter_config(tiny_config, name=f"acc{accum}", devices={"count": 1},
                             train={"grad_accum": accum, "batch_size": batch, "steps": 4},
                             eval={"every": 4, "max_examples": 8})  # fmt: skip
        out[accum] = run_experiment(cfg, quiet=True, report=False)
    a, b = ([r["loss"] for r in records(out[k]) if r["event"] == "train" and r["role"] == "mean"]
            for k in (2, 1))  # fmt: skip
    # The distillation loss is ~1e-3 by step 3, where AdamW's steps on the two batchings'
    # rounding-level gradient differences show at ~3e-5 of it (transformers 5.24, torch 2.13).
    assert len(a) == 4 and a == pytest.approx(b, rel=1e-4)
    da, db = (load_drafter(out[k] / "drafter" / "cut-1-1", UCut(1, 1), 64) for k in (2, 1))
    for (ka, va), (kb, vb) in zip(da.state_dict().items(), db.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb, atol=1e-5, rtol=1e-4)
    sa, sb = (json.loads((out[k] / "summary.json").read_text()) for k in (2, 1))
    assert (
        sa["messages"] - sb["messages"] == 4 * 4
    )  # per step: one more embed and middle, each a request and its reply
