"""Stock Hugging Face PEFT loads what cotune saves, and cotune loads what PEFT trains — same logits."""

from __future__ import annotations

import json

import pytest
import torch

from cotune.peft import inject_adapters, load_adapter, save_adapter

from .peft_cases import (
    METHOD_CASES,
    MODEL_CASES,
    PEFT_REFUSES,
    inputs,
    logits,
    peft_cfg,
    perturb,
    train_steps,
)

ATOL = 1e-5


@pytest.mark.parametrize("case_name", list(MODEL_CASES))
@pytest.mark.parametrize("method", list(METHOD_CASES))
def test_cotune_saved_adapter_loads_in_stock_peft(method, case_name, base_pair, hf_peft, tmp_path):
    case = MODEL_CASES[case_name]
    model, fresh = base_pair(case)
    batch = inputs()
    base_out = logits(model, batch)
    adapters = inject_adapters(model, peft_cfg(method, case))
    perturb(adapters)  # non-zero B and a changed head
    ours = logits(model, batch)
    assert (ours - base_out).abs().max() > 1e-3

    save_adapter(adapters, tmp_path, base_model_name_or_path="tiny", task=case.task)
    if (method, case_name) in PEFT_REFUSES:  # a file PEFT cannot express must fail loudly there
        with pytest.raises((KeyError, ValueError), match=PEFT_REFUSES[method, case_name]):
            hf_peft.PeftModel.from_pretrained(fresh, str(tmp_path))
        return
    peft_model = hf_peft.PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
    theirs = logits(peft_model, batch)
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)

    # PEFT adapted exactly our layers, with our ranks.
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    peft_ranks = {
        n.removeprefix("base_model.model."): m.r["default"]
        for n, m in peft_model.named_modules()
        if isinstance(m, PeftLoraLayer)
    }
    factor = type(next(iter(adapters.layers.values()))).peft_rank_factor  # PiSSA: rank-2r export
    assert peft_ranks == {p: layer.r * factor for p, layer in adapters.layers.items()}
    if case.task == "classification":
        assert (
            json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]
            == adapters.head_paths
        )


@pytest.mark.parametrize("case_name", list(MODEL_CASES))
def test_stock_peft_trained_adapter_loads_in_cotune(case_name, base_pair, hf_peft, tmp_path):
    case = MODEL_CASES[case_name]
    model, fresh = base_pair(case)
    extra = {"use_rslora": True, "rank_pattern": {"v_proj": 2}, "layers_to_transform": [1]}
    targets = {
        "bert_cls": ["query", "value"],
        "gpt2_causal": ["c_attn", "c_fc"],
        "gpt2_cls": ["c_attn"],
    }
    config = hf_peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets.get(case_name, ["q_proj", "v_proj"]),
        task_type=case.peft_task_type,
        **(extra if case_name == "llama_causal" else {}),
    )
    peft_model = hf_peft.get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    train_steps(peft_model, params, case.task)
    peft_model.save_pretrained(str(tmp_path))
    batch = inputs()
    theirs = logits(peft_model, batch)

    adapters = load_adapter(fresh, tmp_path)
    assert all(layer.lora_B.weight.abs().max() > 0 for layer in adapters.layers.values())
    torch.testing.assert_close(logits(fresh, batch), theirs, atol=ATOL, rtol=0)
    if case_name == "llama_causal":
        assert {p: layer.r for p, layer in adapters.layers.items()} == {
            "model.layers.1.self_attn.q_proj": 4,
            "model.layers.1.self_attn.v_proj": 2,
        }
    if case.task == "classification":
        assert adapters.head_paths  # PEFT's SEQ_CLS head is restored and trainable
        assert all(
            p.requires_grad
            for h in adapters.head_paths
            for p in fresh.get_submodule(h).parameters()
        )


def test_round_trip_through_cotune(base_pair, tmp_path):
    case = MODEL_CASES["llama_causal"]
    model, fresh = base_pair(case)
    adapters = inject_adapters(model, peft_cfg("lora", case))
    perturb(adapters)
    save_adapter(adapters, tmp_path, base_model_name_or_path=None, task=case.task)
    loaded = load_adapter(fresh, tmp_path)
    assert loaded.state_dict().keys() == adapters.state_dict().keys()
    batch = inputs()
    torch.testing.assert_close(logits(fresh, batch), logits(model, batch), atol=ATOL, rtol=0)


def test_default_init_matches_peft_given_same_seed(hf_peft):
    case = MODEL_CASES["bert_cls"]
    ours_model, theirs_model = case.build(), case.build()
    torch.manual_seed(123)
    adapters = inject_adapters(
        ours_model, peft_cfg("lora", case, options={}, target_modules=["query", "value"])
    )
    torch.manual_seed(123)
    cfg = hf_peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"
    )
    peft_model = hf_peft.get_peft_model(theirs_model, cfg)
    for path, layer in adapters.layers.items():
        theirs = peft_model.base_model.model.get_submodule(path)
        torch.testing.assert_close(layer.lora_A.weight, theirs.lora_A["default"].weight)
        assert layer.lora_B.weight.abs().max() == 0
