"""Row groups: one batched forward where each row group runs its own adapter tensors equals
running each group alone (outputs and each group's gradients), for every method."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cotune.errors import AdapterError
from cotune.peft import inject_adapters
from cotune.peft.grouped import bind_tensors, row_groups, split_by_layer

from .peft_cases import METHOD_CASES, MODEL_CASES, inputs, peft_cfg, perturb

GROUPS = 3


def _states(adapters, seed):
    """GROUPS distinct sets of the adapter-layer tensors (the head is shared)."""
    live, _ = split_by_layer(adapters.layers, adapters.named_trainable())
    names = [f"{path}.{k}" for path, d in live.items() for k in d]
    named = adapters.named_trainable()
    g = torch.Generator().manual_seed(seed)
    return [
        {n: (named[n].detach() + 0.05 * torch.randn(named[n].shape, generator=g)) for n in names}
        for _ in range(GROUPS)
    ]


def _objective(case, out):
    # A fixed random projection of the outputs: every output element gets its own gradient.
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    return (out * w).sum()


@pytest.mark.parametrize("case_name", ["bert_cls", "llama_causal"])
@pytest.mark.parametrize("method", list(METHOD_CASES))
def test_grouped_forward_equals_each_group_alone(method, case_name):
    case = MODEL_CASES[case_name]
    model = case.build()
    adapters = inject_adapters(model, peft_cfg(method, case, options={}))
    perturb(adapters)
    states = _states(adapters, seed=3)
    batches = [inputs(seed=10 + i) for i in range(GROUPS)]
    trainable = adapters.named_trainable()

    ref_out, ref_grads = [], []
    for state, batch in zip(states, batches):
        with torch.no_grad():
            saved = {n: trainable[n].detach().clone() for n in state}
            for n, t in state.items():
                trainable[n].copy_(t)
        model.zero_grad(set_to_none=True)
        out = model(**batch).logits
        _objective(case, out).backward()
        ref_out.append(out.detach())
        ref_grads.append({n: trainable[n].grad.clone() for n in state})
        with torch.no_grad():
            for n, t in saved.items():
                trainable[n].copy_(t)

    model.zero_grad(set_to_none=True)
    leaves = [{n: t.clone().requires_grad_(True) for n, t in s.items()} for s in states]
    joint = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    rows = [b["input_ids"].shape[0] for b in batches]
    with row_groups(adapters.layers, rows, leaves):
        out = model(**joint).logits
    total = sum(_objective(case, o) for o in out.split(rows))
    total.backward()
    for i, (o, ro) in enumerate(zip(out.split(rows), ref_out)):
        torch.testing.assert_close(o, ro, atol=1e-5, rtol=1e-5, msg=f"group {i} output")
        for n, leaf in leaves[i].items():
            torch.testing.assert_close(leaf.grad, ref_grads[i][n], atol=1e-5, rtol=1e-4,
                                       msg=f"group {i} grad {n}")  # fmt: skip
    # The shared Parameters were not used by the adapter branches: no gradient reached them.
    for n in states[0]:
        assert trainable[n].grad is None or method in ("dora", "bora"), n
    assert all(layer.row_groups is None for layer in adapters.layers.values())


def test_row_groups_refuse_head_tensors_and_merged_layers():
    case = MODEL_CASES["bert_cls"]
    model = case.build()
    adapters = inject_adapters(model, peft_cfg("lora", case, options={}))
    named = adapters.named_trainable()
    with (
        pytest.raises(AdapterError, match="not adapter-layer tensors"),
        row_groups(adapters.layers, [2], [named]),
    ):
        pass
    layer = next(iter(adapters.layers.values()))
    own = {f"{layer.path}.{k}": p for k, p in layer.adapter_named_parameters()}
    layer.merge()
    with pytest.raises(AdapterError, match="merged"), row_groups(adapters.layers, [2], [own]):
        pass


def test_bind_tensors_restores_on_error():
    lin = torch.nn.Linear(2, 2)
    original = lin.weight
    with pytest.raises(RuntimeError), bind_tensors(lin, {"weight": torch.zeros(2, 2)}):
        assert torch.equal(lin.weight, torch.zeros(2, 2))
        raise RuntimeError("boom")
    assert lin.weight is original
    with (
        pytest.raises(AdapterError, match="no parameter or buffer"),
        bind_tensors(lin, {"nope": torch.zeros(1)}),
    ):
        pass


def test_lora_runs_equal_groups_as_two_batched_matmuls_and_unequal_ones_per_group():
    from cotune.peft.lora import LoraLayer

    case = MODEL_CASES["bert_cls"]
    model = case.build()
    adapters = inject_adapters(model, peft_cfg("lora", case, options={}))
    perturb(adapters)
    layer = next(iter(adapters.layers.values()))
    assert type(layer) is LoraLayer
    own = [{k: v.detach() + i for k, v in layer.adapter_named_parameters()} for i in range(3)]
    x = torch.randn(6, 5, layer.in_features)
    fast = layer.grouped_delta(x, [2, 2, 2], own)
    assert fast is not None
    slow = []
    for xs, t in zip(x.split([2, 2, 2]), own):
        with bind_tensors(layer, t):
            slow.append(layer.delta(xs))
    torch.testing.assert_close(fast, torch.cat(slow), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(9, 64), (9, 3, 64)], ids=["packed-tokens", "rows"])
def test_lora_runs_unequal_groups_as_masked_matmuls_with_each_groups_gradients(shape):
    """A padding-free cohort's groups hold unequal token counts: all groups' A and B at once,
    each row kept to its own group's rank columns; outputs and every group's gradients equal
    running the groups one by one."""
    from cotune.peft.base import LayerSpec
    from cotune.peft.lora import LoraLayer

    torch.manual_seed(0)
    layer = LoraLayer(nn.Linear(64, 48), LayerSpec(path="q", r=4, alpha=8))
    rows = [2, 4, 3]
    own = [
        {k: (v.detach() + torch.randn_like(v)).requires_grad_(True)
         for k, v in layer.adapter_named_parameters()}
        for _ in rows
    ]  # fmt: skip
    x = torch.randn(*shape)
    fast = layer.grouped_delta(x, rows, own)
    assert fast is not None
    weight = torch.randn_like(fast)  # a linear objective: gradients of moderate size
    (fast * weight).sum().backward()
    fast_grads = [{k: v.grad.clone() for k, v in t.items()} for t in own]
    for t in own:
        for v in t.values():
            v.grad = None
    slow = []
    for xs, t in zip(x.split(rows), own):
        with bind_tensors(layer, t):
            slow.append(layer.delta(xs))
    slow = torch.cat(slow)
    (slow * weight).sum().backward()
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    for f, t in zip(fast_grads, own):
        for k, v in t.items():
            torch.testing.assert_close(f[k], v.grad, atol=1e-5, rtol=1e-4)
    # Many groups: their rank columns would cost more than the layer's own product.
    many = [{k: v.detach() for k, v in t.items()} for t in own for _ in range(3)]
    assert layer.grouped_delta(torch.randn(10, 64), [1] * 8 + [2], many) is None
