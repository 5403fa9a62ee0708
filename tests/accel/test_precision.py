"""train.autocast (bf16 / fp16 with loss scaling), model.dtype, and what each paradigm allows."""

import json
import math

import pytest
import torch

from cotune.accel.compute import Compute, compute_of, set_compute
from cotune.build import check_devices
from cotune.config import RunConfig
from cotune.errors import ConfigError
from cotune.models import load_model
from cotune.run import run_experiment
from cotune.train import Trainer


def tiny_llama():
    cfg = RunConfig.model_validate(
        {"model": {"name_or_path": "random:llama", "task": "causal_lm", "max_length": 16}}
    )
    return load_model(cfg.model, vocab_size=64, seed=0)


def test_autocast_runs_the_blocks_in_bf16_and_keeps_adapters_fp32():
    from cotune.config import PeftSection
    from cotune.peft import inject_adapters

    lm = tiny_llama()
    adapters = inject_adapters(lm.model, PeftSection(r=4, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 64, (2, 8))
    fp32 = lm.anatomy.full()(ids)
    set_compute(lm.model, Compute(autocast="bf16"))
    seen = []
    hook = lm.model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda m, i, o: seen.append(o.dtype)
    )
    bf16 = lm.anatomy.full()(ids)
    hook.remove()
    assert seen == [torch.bfloat16]  # matmuls in bf16 ...
    assert all(p.dtype == torch.float32 for p in adapters.parameters())  # ... adapters stay fp32
    assert bf16.float().sub(fp32).abs().max() < 0.1 * fp32.abs().max()
    assert compute_of(lm.model).autocast == "bf16"


@pytest.mark.parametrize("autocast", ["bf16", "fp16"])
def test_central_trains_under_mixed_precision(tiny_config, autocast):
    cfg = tiny_config(
        name=f"amp-{autocast}",
        train={"steps": 12, "lr": 3e-2, "autocast": autocast},
        eval={"every": 6},
        data={"max_examples": 24},
    )
    run_dir = run_experiment(cfg, quiet=True, report=False)
    losses = [
        json.loads(line)["loss"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["event"] == "train"
    ]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-4:]) < sum(losses[:4])
    if autocast == "fp16":  # the role's loss scale is part of its state (and its checkpoint)
        ckpt = sorted((run_dir / "checkpoints").glob("*/state.pt"))[-1]
        payload = torch.load(ckpt, weights_only=False)
        scaler = payload["states"]["server"]["scaler"]
        assert scaler is not None and scaler["scale"] > 0


def test_bf16_base_with_fp32_adapters_trains(tiny_config):
    cfg = tiny_config(
        name="bf16-base",
        model={"dtype": "bfloat16"},
        train={"steps": 12, "lr": 3e-2},
        eval={"every": 6},
        data={"max_examples": 24},
    )
    run_dir = run_experiment(cfg, quiet=True, report=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert math.isfinite(summary["final"]["loss"])


def test_fp16_overflow_skips_the_step_and_lowers_the_scale():
    cfg = RunConfig.model_validate({"train": {"autocast": "fp16", "on_nonfinite": "stop"}})
    p = torch.nn.Parameter(torch.ones(4))
    trainer = Trainer({"w": p}, cfg.train, 10)
    st = trainer.new_state(seed=0)
    with trainer.activate(st):
        trainer.backward((p * float("inf")).sum())  # an overflowing gradient: no DivergenceError
        assert trainer.step() is None
        assert torch.equal(p.data, torch.ones(4))
        trainer.backward((p * 2).sum())
        trainer.step()
        assert not torch.equal(p.data, torch.ones(4))
    assert trainer.overflow_skips == 1
    assert st.scaler["scale"] == 2.0**15  # halved once from GradScaler's initial 2**16


@pytest.mark.parametrize("paradigm", ["splitfed", "split", "dlora", "fedbiot"])
def test_fp16_where_gradients_cross_roles_unscaled_is_refused(paradigm):
    cfg = RunConfig.model_validate(
        {"paradigm": {"name": paradigm}, "train": {"autocast": "fp16", "device": "cpu"}}
    )
    with pytest.raises(
        ConfigError, match=rf"train.autocast: fp16 .*{paradigm!r}.*use train.autocast: bf16"
    ):
        check_devices(cfg)
    check_devices(
        cfg.model_copy(update={"train": cfg.train.model_copy(update={"autocast": "bf16"})})
    )
