"""Injection, freezing, merge/unmerge and the AdapterSet API on every method × model case."""

from __future__ import annotations

import pytest
import torch

from cotune.errors import AdapterError
from cotune.peft import AdapterLayer, inject_adapters

from .peft_cases import METHOD_CASES, MODEL_CASES, inputs, logits, peft_cfg, perturb

CASES = [(m, c) for m in METHOD_CASES for c in MODEL_CASES]


@pytest.mark.parametrize(("method", "case_name"), CASES)
def test_merge_equals_unmerged_and_unmerge_restores(method, case_name):
    case = MODEL_CASES[case_name]
    model = case.build()
    adapters = inject_adapters(model, peft_cfg(method, case))
    if not next(iter(adapters.layers.values())).mergeable:  # MoE: input-dependent gates
        with pytest.raises(AdapterError, match="cannot be merged"):
            adapters.merge()
        assert not adapters.merged
        return
    # After injection: KaSA and PiSSA rewrite the base weight when they are injected.
    base_weights = {
        f"{p}.weight": lay.base_layer.weight.clone() for p, lay in adapters.layers.items()
    }
    perturb(adapters)
    batch = inputs()
    unmerged = logits(model, batch)
    adapters.merge()
    assert adapters.merged
    torch.testing.assert_close(logits(model, batch), unmerged, atol=1e-5, rtol=0)
    path, layer = next(iter(adapters.layers.items()))
    assert not torch.allclose(layer.base_layer.weight, base_weights[f"{path}.weight"])
    adapters.unmerge()
    assert not adapters.merged
    torch.testing.assert_close(logits(model, batch), unmerged, atol=1e-5, rtol=0)
    for p, lay in adapters.layers.items():
        torch.testing.assert_close(
            lay.base_layer.weight, base_weights[f"{p}.weight"], atol=1e-6, rtol=0
        )


@pytest.mark.parametrize(("method", "case_name"), CASES)
def test_only_adapter_and_head_params_train(method, case_name):
    case = MODEL_CASES[case_name]
    model = case.build()
    adapters = inject_adapters(model, peft_cfg(method, case))
    trainable = adapters.named_trainable()
    model_params = dict(model.named_parameters())
    assert set(trainable) == {n for n, p in model_params.items() if p.requires_grad}
    assert all(trainable[n] is model_params[n] for n in trainable)
    heads = {"bert_cls": ["classifier"], "gpt2_cls": ["score"]}.get(case_name, [])
    assert adapters.head_paths == heads
    for name in trainable:
        assert any(name.startswith(h + ".") for h in heads) or ".lora_" in name, name
    for path in adapters.layers:
        assert not model_params[f"{path}.base_layer.weight"].requires_grad
    assert adapters.num_trainable() == sum(p.numel() for p in trainable.values())

    # One step moves only the trainable tensors.
    before = {n: p.detach().clone() for n, p in model_params.items()}
    opt = torch.optim.SGD(adapters.parameters(), lr=0.1)
    batch = inputs()
    model.train()
    out = model(
        **batch,
        labels=torch.tensor([0, 1]) if case.task == "classification" else batch["input_ids"],
    )
    out.loss.backward()
    opt.step()
    changed = {n for n, p in model_params.items() if not torch.equal(p, before[n])}
    assert changed and changed <= set(trainable)


def test_state_dict_is_detached_clone_and_loads_back():
    case = MODEL_CASES["bert_cls"]
    model = case.build()
    adapters = inject_adapters(model, peft_cfg("lora", case))
    sd = adapters.state_dict()
    assert "bert.encoder.layer.0.attention.self.query.lora_A.weight" in sd
    assert "classifier.weight" in sd
    assert all(not t.requires_grad for t in sd.values())
    key = next(iter(sd))
    sd[key].add_(1.0)
    assert not torch.equal(sd[key], adapters.named_trainable()[key])
    adapters.load_state_dict(sd)
    assert torch.equal(sd[key], adapters.named_trainable()[key])
    with pytest.raises(AdapterError, match="unexpected keys"):
        adapters.load_state_dict({**sd, "bogus.weight": torch.zeros(1)})
    with pytest.raises(AdapterError, match="missing keys"):
        adapters.load_state_dict({k: v for k, v in sd.items() if k != key})
    with pytest.raises(AdapterError, match="shape"):
        adapters.load_state_dict({**sd, key: torch.zeros(1, 1)})
    assert adapters.regularization_loss() is None


def test_train_head_false_freezes_head_and_head_paths_override():
    case = MODEL_CASES["bert_cls"]
    model = case.build()
    adapters = inject_adapters(model, peft_cfg("lora", case, train_head=False))
    assert adapters.head_paths == [] and not model.classifier.weight.requires_grad
    model = case.build()
    adapters = inject_adapters(model, peft_cfg("lora", case), head_paths=["bert.pooler"])
    assert "bert.pooler.dense.weight" in adapters.named_trainable()
    assert not any(p.startswith("bert.pooler") for p in adapters.layers)  # heads are never targeted
    with pytest.raises(AdapterError, match="not found"):
        inject_adapters(case.build(), peft_cfg("lora", case), head_paths=["nope"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_head_trained_over_a_half_precision_base_is_float32(dtype):
    """The head trains whole, so it keeps float32 weights (as the adapters) and takes the
    base's half-precision hidden states: on float16 weights AdamW's first step was inf."""
    case = MODEL_CASES["bert_cls"]
    model = case.build().to(dtype)
    adapters = inject_adapters(model, peft_cfg("lora", case))
    assert all(p.dtype == torch.float32 for p in adapters.parameters())
    assert model.bert.encoder.layer[0].attention.self.query.base_layer.weight.dtype == dtype
    opt = torch.optim.AdamW(adapters.parameters(), lr=1e-2)
    for _ in range(2):
        out = model(**inputs()).logits
        assert out.dtype == torch.float32
        torch.nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in adapters.parameters())


def test_layers_filter_with_anatomy_and_by_name():
    case = MODEL_CASES["llama_causal"]

    class FakeAnatomy:  # counts blocks backwards, to prove the anatomy is what decides
        def layer_of(self, path: str) -> int | None:
            return 1 - int(path.split(".")[2]) if path.startswith("model.layers.") else None

    cfg = peft_cfg(
        "lora", case, layers=[0], rank_pattern={}, alpha_pattern={}, target_modules=["q_proj"]
    )
    adapters = inject_adapters(case.build(), cfg, anatomy=FakeAnatomy())
    assert list(adapters.layers) == ["model.layers.1.self_attn.q_proj"]
    adapters = inject_adapters(case.build(), cfg)
    assert list(adapters.layers) == ["model.layers.0.self_attn.q_proj"]
    with pytest.raises(AdapterError, match=r"block\(s\) \[5\]"):
        inject_adapters(case.build(), peft_cfg("lora", case, layers=[5], rank_pattern={}))


def test_rank_and_alpha_patterns_and_rslora_scaling():
    case = MODEL_CASES["llama_causal"]
    adapters = inject_adapters(case.build(), peft_cfg("lora", case))
    layers = adapters.layers
    assert layers["model.layers.0.self_attn.q_proj"].r == 4
    assert layers["model.layers.1.self_attn.q_proj"].r == 6
    assert layers["model.layers.0.self_attn.v_proj"].r == 2
    assert layers["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(
        8 / 2
    )  # alpha/sqrt(r)
    assert layers["model.layers.0.mlp.down_proj"].scaling == pytest.approx(4 / 2)
    assert isinstance(layers["model.layers.0.self_attn.q_proj"], AdapterLayer)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"target_modules": ["nonexistent"]},
            r"'nonexistent' matches no linear module; linear module names: \[",
        ),
        ({"target_modules": [r"model\.nothing\..*"]}, "matches no linear module"),
        ({"target_modules": ["[bad"]}, "not a valid regex"),
        ({"rank_pattern": {"k_proj": 2}}, r"rank_pattern: key 'k_proj' matches no targeted module"),
        ({"alpha_pattern": {"up_proj": 2.0}}, "alpha_pattern: key 'up_proj'"),
        ({"rank_pattern": {"(": 2}}, r"rank_pattern: key '\(' is not a valid regex"),
        ({"r": 64}, r"peft.r = 64 is not below min\(in, out\)"),
        (
            {"rank_pattern": {"v_proj": 32}},
            r"rank_pattern\['v_proj'\] = 32 .* model.layers.0.self_attn.v_proj",
        ),
        ({"method_": "nope"}, r"unknown PEFT method 'nope'; available methods: \[.*'lora'"),
        (
            {"options": {"bogus": 1}},
            r"unknown option\(s\) \['bogus'\] .* known options: \['init_lora_weights', 'enable_lora', 'fused_modules'\]",
        ),
        ({"options": {"init_lora_weights": "pissa"}}, "init_lora_weights must be"),
    ],
)
def test_injection_errors(overrides, message):
    case = MODEL_CASES["llama_causal"]
    with pytest.raises(AdapterError, match=message):
        inject_adapters(case.build(), peft_cfg("lora", case, **overrides))


def test_double_injection_is_an_error():
    case = MODEL_CASES["gpt2_causal"]
    model = case.build()
    inject_adapters(model, peft_cfg("lora", case))
    with pytest.raises(AdapterError, match="already has adapters"):
        inject_adapters(model, peft_cfg("lora", case))


def test_merge_and_unload_gives_plain_model():
    case = MODEL_CASES["gpt2_causal"]
    model = case.build()
    adapters = inject_adapters(model, peft_cfg("lora", case))
    perturb(adapters)
    batch = inputs()
    expected = logits(model, batch)
    plain = adapters.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert not any(".lora_" in n or "base_layer" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(logits(plain, batch), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", sorted(METHOD_CASES))
def test_has_regularizer_says_whether_a_regularizer_can_come(method):
    """A cohort skips binding each member's tensors when the method has no regularizer: the
    property must never say False for a method whose loss comes (KaSA, MoDULA, MoSLD)."""
    case = MODEL_CASES["bert_cls"]
    adapters = inject_adapters(case.build(), peft_cfg(method, case))
    if adapters.regularization_loss() is not None:
        assert adapters.has_regularizer
    assert adapters.has_regularizer == (method in {"kasa", "modula", "mosld"})
