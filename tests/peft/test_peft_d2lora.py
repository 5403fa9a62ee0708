"""D²LoRA: the warm-up on general data seeds the task adapter of every role."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cotune.errors import AdapterError
from cotune.peft import inject_adapters

from .peft_cases import MODEL_CASES, peft_cfg

WARM = {"warmup_steps": 4, "warmup_lr": 1e-2, "warmup_examples": 64}


@pytest.mark.parametrize("engine", ["local", "isolated"])
def test_warmup_seeds_every_role_and_leaves_the_rng_alone(tiny_config, engine):
    from cotune.build import build_experiment
    from cotune.paradigms.base import TrainingRole

    cfg = tiny_config(peft={"method": "d2lora", "options": WARM}, engine={"kind": engine})
    exp, _ = build_experiment(cfg, Path("unused"), quiet=True)
    warmed = exp.adapters.state_dict()
    b_keys = [k for k in warmed if k.endswith("lora_B.weight")]
    assert b_keys and all(warmed[k].abs().sum() > 0 for k in b_keys)  # B moved off zero
    # Every role (server and each device) starts from the warmed adapter, on its own node.
    ids = [f"device-{i}" for i in range(len(exp.parts))] + ["server"]
    roles = [TrainingRole(exp.grid.context(r)) for r in ids]
    for role in roles:
        assert set(role.state.params) == set(exp.trainer.params)
        for k, v in role.state.params.items():
            assert torch.equal(v, warmed[k]), (role.role_id, k)

    # Zero warm-up steps = plain LoRA's init bit for bit: the warm-up runs on a forked RNG.
    zero = tiny_config(peft={"method": "d2lora", "options": {**WARM, "warmup_steps": 0}})
    plain = tiny_config(peft={"method": "lora"})
    sz = build_experiment(zero, Path("unused"), quiet=True)[0].adapters.state_dict()
    sp = build_experiment(plain, Path("unused"), quiet=True)[0].adapters.state_dict()
    assert all(torch.equal(sz[k], sp[k]) for k in sp)
    # The head belongs to the task's labels: back to its initial value after the warm-up.
    assert torch.equal(warmed["classifier.weight"], sp["classifier.weight"])


def test_d2lora_run_end_to_end_saves_plain_lora(tiny_config):
    from cotune.run import run_experiment

    cfg = tiny_config(
        name="d2", peft={"method": "d2lora", "options": WARM}, train={"steps": 2}, eval={"every": 2}
    )
    run_dir = run_experiment(cfg, quiet=True, report=False)
    import json

    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "cotune_d2lora" not in config


def test_warmup_on_causal_lm_with_plain_function():
    from cotune.data import EncodedDataset
    from cotune.peft.d2lora import D2loraOptions, d2lora_warmup

    case = MODEL_CASES["gpt2_causal"]
    model = case.build()
    adapters = inject_adapters(model, peft_cfg("d2lora", case, options={}))
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(2, 100, (12,), generator=g).tolist() for _ in range(16)]
    data = EncodedDataset(rows, None, "causal_lm", 0)

    def forward(ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits

    losses = d2lora_warmup(
        forward,
        adapters,
        data,
        "causal_lm",
        D2loraOptions(warmup_steps=6, warmup_lr=2e-2),
        batch_size=16,
    )
    assert len(losses) == 6 and losses[-1] < losses[0]
    with pytest.raises(AdapterError, match="empty"):
        d2lora_warmup(
            forward,
            adapters,
            EncodedDataset([], None, "causal_lm", 0),
            "causal_lm",
            D2loraOptions(),
        )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
        ({"warmup_lr": 0.0}, "warmup_lr must be > 0"),
    ],
)
def test_d2lora_bad_options(options, message):
    case = MODEL_CASES["bert_cls"]
    with pytest.raises(AdapterError, match=message):
        inject_adapters(case.build(), peft_cfg("d2lora", case, options=options))
