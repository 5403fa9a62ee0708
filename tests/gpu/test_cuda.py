"""On a CUDA machine (scripts/gpu_check.sh): every paradigm runs on the GPU, fp32 matches the CPU,
bf16 trains, resume is exact, the memory probe matches the allocator, 4-bit bases train.

Skipped without CUDA (tests/conftest.py), so CPU CI never needs a GPU.
"""

import json
import math

import pytest
import torch

from cotune.run import run_experiment
from tests.paradigms.test_central_local import final_params, kill_after
from tests.paradigms.test_engines import CASES

pytestmark = pytest.mark.gpu

PARADIGMS = {
    "central": {"paradigm": {"name": "central"}},
    "fedavg": {"paradigm": {"name": "fedavg", "options": {"local_steps": 2}}},
    "splitfed": CASES["splitfed"],
}
ALL = sorted({c["paradigm"]["name"]: name for name, c in CASES.items()}.values())


def run(tiny_config, name, device, **sections):
    train = {**sections.pop("train", {}), "device": device}
    cfg = tiny_config(name=name, train=train, **sections)
    return run_experiment(cfg, quiet=True, report=False)


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("paradigm", sorted(PARADIGMS))
def test_fp32_on_cuda_matches_the_cpu(tiny_config, paradigm):
    cpu = run(tiny_config, f"{paradigm}-cpu", "cpu", **PARADIGMS[paradigm])
    gpu = run(tiny_config, f"{paradigm}-gpu", "cuda", **PARADIGMS[paradigm])
    a, b = final_params(cpu), final_params(gpu)
    for role in a:
        for k, v in a[role].items():
            torch.testing.assert_close(b[role][k].cpu(), v, rtol=2e-3, atol=2e-4)
    assert summary(gpu)["final"]["loss"] == pytest.approx(summary(cpu)["final"]["loss"], rel=1e-3)


@pytest.mark.parametrize("paradigm", sorted(PARADIGMS))
def test_bf16_autocast_trains_on_cuda(tiny_config, paradigm):
    sections = {**PARADIGMS[paradigm], "train": {"autocast": "bf16", "steps": 12, "lr": 3e-2}}
    run_dir = run(tiny_config, f"{paradigm}-bf16", "cuda", data={"max_examples": 24}, **sections)
    losses = [
        json.loads(x)["loss"]
        for x in (run_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["event"] == "train"
    ]
    assert all(math.isfinite(x) for x in losses) and sum(losses[-4:]) < sum(losses[:4])


@pytest.mark.parametrize("case", ALL)
def test_every_paradigm_runs_on_cuda(tiny_config, case):
    s = summary(run(tiny_config, f"all-{case}", "cuda", **CASES[case]))
    assert math.isfinite(s["final"]["loss"])


def test_isolated_nodes_on_cuda_and_cpu_together(tiny_config):
    """The server on the GPU, devices on the CPU: messages land on each receiver's device."""
    sections = {**CASES["splitfed"], "engine": {"kind": "isolated"}}
    mixed = run(
        tiny_config, "mixed", "cuda", train={"node_devices": {"devices": "cpu"}}, **sections
    )
    cpu = run(tiny_config, "mixed-cpu", "cpu", **sections)
    assert summary(mixed)["final"]["loss"] == pytest.approx(summary(cpu)["final"]["loss"], rel=1e-3)


def test_resume_on_cuda_is_exact(tiny_config):
    sections = {
        "paradigm": {"name": "fedavg", "options": {"local_steps": 1}},
        "train": {"steps": 8, "device": "cuda"},
        "output": {"checkpoint_every": 4, "keep_checkpoints": 100},
    }
    cfg = tiny_config(name="resume-gpu", **sections)
    whole = final_params(run_experiment(cfg, quiet=True, report=False))
    run_dir = run_experiment(
        tiny_config(name="resume-gpu-part", **sections), quiet=True, report=False
    )
    kill_after(run_dir, 4)
    (run_dir / "summary.json").unlink()
    cfg2 = tiny_config(name="resume-gpu-part", **sections)
    part = final_params(run_experiment(cfg2, quiet=True, report=False, resume=True))
    for role in whole:
        for k, v in whole[role].items():
            assert torch.equal(v, part[role][k]), (role, k)


def test_memory_probe_is_within_30_percent_of_the_allocator_peak():
    from cotune.config import PeftSection, RunConfig
    from cotune.models import load_model, task_loss
    from cotune.peft import inject_adapters
    from cotune.sim.memory import MemoryProbe

    cfg = RunConfig.model_validate(
        {
            "model": {
                "name_or_path": "random:llama",
                "task": "causal_lm",
                "max_length": 256,
                "random_config": {"hidden_size": 512, "intermediate_size": 1536,
                                  "num_hidden_layers": 6, "num_attention_heads": 8},
            }
        }
    )  # fmt: skip
    lm = load_model(cfg.model, vocab_size=8000, seed=0)
    lm.model.to("cuda")
    adapters = inject_adapters(lm.model, PeftSection(r=16, target_modules=["q_proj", "v_proj"]))
    lm.model.train()
    ids = torch.randint(0, 8000, (8, 256), device="cuda")
    est = MemoryProbe().estimate("full", lm.model, lm.anatomy.full(), ids, ids.clone())
    assert est.measured is not None
    # The real thing: one AdamW step from a clean allocator.
    opt = torch.optim.AdamW(adapters.parameters(), lr=1e-4)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    task_loss(lm.anatomy.full()(ids), ids, "causal_lm").backward()
    opt.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    assert abs(est.total - peak) / peak < 0.30, (est, peak)


def test_a_4bit_base_trains_on_cuda(tiny_config):
    pytest.importorskip("bitsandbytes")
    s = summary(
        run(
            tiny_config,
            "qlora-gpu",
            "cuda",
            model={"name_or_path": "random:llama", "task": "causal_lm", "quantize": "nf4"},
            data={"dataset": "austen", "view": "text", "labels": [], "max_examples": 40},
            peft={"target_modules": ["q_proj", "v_proj"]},
            train={"autocast": "bf16"},
        )  # fmt: skip
    )
    assert 1 < s["final"]["perplexity"] < 1e6
