"""`peft.warmup`: D²LoRA's warm-up on general data as a pre-stage of any non-staged method."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cotune.errors import ConfigError

WARM = {"steps": 4, "lr": 1e-2, "examples": 64}


def _state(tiny_config, method, warmup):
    from cotune.build import build_experiment

    cfg = tiny_config(peft={"method": method, "warmup": warmup})
    return build_experiment(cfg, Path("unused"), quiet=True)[0].adapters.state_dict()


@pytest.mark.parametrize(
    ("method", "extra"),
    [("dora", "lora_magnitude_vector"), ("pissa", "lora_B.weight"), ("kasa", "lora_diag")],
)
def test_warmup_trains_the_methods_own_tensors(tiny_config, method, extra):
    plain = _state(tiny_config, method, None)
    warmed = _state(tiny_config, method, WARM)
    zero = _state(tiny_config, method, {**WARM, "steps": 0})
    assert all(torch.equal(zero[k], plain[k]) for k in plain)  # 0 steps: the method's own init
    moved = {k for k in plain if not torch.equal(warmed[k], plain[k])}
    assert any(k.endswith(extra) for k in moved), sorted(moved)[:6]
    assert any(k.endswith("lora_A.weight") for k in moved)
    # The head belongs to the task's labels: back to its initial value after the warm-up.
    assert torch.equal(warmed["classifier.weight"], plain["classifier.weight"])


def test_warmup_run_end_to_end_with_dora(tiny_config):
    import json

    from cotune.run import run_experiment

    cfg = tiny_config(
        name="dora-warm",
        peft={"method": "dora", "warmup": WARM},
        paradigm={"name": "fedavg", "options": {"local_steps": 1}},
        train={"steps": 2},
        eval={"every": 2, "max_examples": 16},
    )
    run_dir = run_experiment(cfg, quiet=True, report=False)
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    # The warm-up is the server's work: its FLOPs are on the server's bill and timeline.
    cold = run_experiment(
        cfg.model_copy(
            update={"name": "dora-cold", "peft": cfg.peft.model_copy(update={"warmup": None})}
        ),
        quiet=True,
        report=False,
    )
    warm_costs, cold_costs = (json.loads((d / "summary.json").read_text()) for d in (run_dir, cold))
    extra = (
        warm_costs["costs"]["roles"]["server"]["flops"]
        - cold_costs["costs"]["roles"]["server"]["flops"]
    )
    step = warm_costs["costs"]["roles"]["device-0"]["flops"] / 2  # device-0 trained 2 steps
    assert extra > WARM["steps"] * 0.5 * step
    assert warm_costs["sim_time_s"] > cold_costs["sim_time_s"]


@pytest.mark.parametrize(
    ("peft", "message"),
    [
        ({"method": "d2lora", "warmup": WARM}, "already warms up"),
        ({"method": "modula", "warmup": WARM}, "trains in stages"),
        ({"method": "mosld", "warmup": WARM}, "trains in stages"),
    ],
)
def test_warmup_errors(tiny_config, peft, message):
    from cotune.build import build_experiment

    with pytest.raises(ConfigError, match=rf"peft.warmup: .*{message}"):
        build_experiment(tiny_config(peft=peft), Path("unused"), quiet=True)


def test_warmup_on_a_mixture_of_its_domains(tiny_config):
    emma = _state(tiny_config, "lora", {**WARM, "mixture": {"Emma": 1.0}})
    again = _state(tiny_config, "lora", {**WARM, "mixture": {"Emma": 1.0}})
    other = _state(tiny_config, "lora", {**WARM, "mixture": {"Mansfield Park": 1.0}})
    assert all(torch.equal(emma[k], again[k]) for k in emma)  # seeded
    assert any(not torch.equal(emma[k], other[k]) for k in emma)  # other text, other adapter
    with pytest.raises(ConfigError, match=r"peft.warmup.mixture: unknown domain\(s\) \['Dune'\]"):
        _state(tiny_config, "lora", {**WARM, "mixture": {"Dune": 1.0}})
