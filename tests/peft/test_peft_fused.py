"""LoRA on a fused projection in loralib's MergedLinear form (`enable_lora`, SplitLoRA's GPT-2
code): only the enabled parts get an adapter, each its own rank; saved as the plain LoRA it
equals, so stock PEFT loads it with identical outputs."""

from __future__ import annotations

import copy

import pytest
import torch

from cotune.config import ModelSection, PeftSection
from cotune.errors import AdapterError
from cotune.models import load_model
from cotune.peft import inject_adapters, load_adapter, save_adapter


def gpt2():
    return load_model(
        ModelSection(name_or_path="random:gpt2", task="causal_lm"), vocab_size=60, seed=0
    )


def fused(model, anatomy, method="lora", **opts):
    cfg = PeftSection(method=method, r=4, alpha=8, target_modules=["c_attn"],
                      options={"enable_lora": [True, False, True], **opts})  # fmt: skip
    return inject_adapters(model, cfg, anatomy=anatomy)


def test_q_and_v_get_their_own_rank_r_and_k_gets_nothing():
    lm = gpt2()
    ad = fused(lm.model, lm.anatomy)
    d = lm.anatomy.hidden_size
    shapes = {n.rsplit(".", 2)[-2]: tuple(p.shape) for n, p in ad.named_trainable().items()}
    assert shapes == {"lora_A": (8, d), "lora_B": (2 * d, 4)}  # loralib's sizes
    layer = next(iter(ad.layers.values()))
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, d)
    out = layer.delta(x)
    assert out[:, d : 2 * d].abs().max() == 0 and out[:, :d].abs().max() > 0
    # delta_weight agrees with delta (merging is exact).
    torch.testing.assert_close(out, x @ layer.delta_weight().T, atol=1e-5, rtol=1e-5)


def test_saved_as_plain_lora_that_stock_peft_and_cotune_load_identically(hf_peft, tmp_path):
    lm = gpt2()
    fresh, again = copy.deepcopy(lm.model), copy.deepcopy(lm.model)
    ad = fused(lm.model, lm.anatomy)
    with torch.no_grad():
        for layer in ad.layers.values():
            layer.lora_B.weight.normal_()
    x = torch.randint(2, 60, (2, 9))
    with torch.no_grad():
        ours = lm.model(x).logits
    save_adapter(ad, tmp_path, base_model_name_or_path=None, task="causal_lm")
    theirs = hf_peft.PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours, atol=1e-5, rtol=0)
    back = load_adapter(again, tmp_path)  # cotune reads it back as a rank-8 plain LoRA
    back.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, ours, atol=1e-5, rtol=0)


def test_refusals():
    lm = gpt2()
    with pytest.raises(AdapterError, match="unknown option"):
        fused(lm.model, lm.anatomy, method="dora")
    lm = gpt2()
    with pytest.raises(AdapterError, match="do not split evenly"):
        inject_adapters(lm.model, PeftSection(r=4, target_modules=["c_attn"],
                        options={"enable_lora": [True, False, True, False, True]}), anatomy=lm.anatomy)  # fmt: skip
