"""Segments reproduce the unsplit HF forward and its gradients, for every family, task and split."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cotune.models import Activations, task_loss

from .models_testlib import CASES, LAYERS, batch, make_tiny, tiny

ATOL = 1e-5


def hf_logits(lm, ids, mask):
    return lm.model(input_ids=ids, attention_mask=mask).logits


def assert_logits_close(lm, got, want, mask):
    if lm.task == "causal_lm":  # padded positions carry no meaning
        got, want = got[mask.bool()], want[mask.bool()]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def run_chain(segments, ids, mask, *, cut: bool):
    """Run segments in order; with ``cut`` each boundary is detached as across a real split.

    Returns the logits and a function that backpropagates a loss through every piece."""
    sent: list[tuple[Activations, Activations]] = []
    out = segments[0](ids, mask)
    for seg in segments[1:]:
        received = out.detached() if cut else out
        sent.append((out, received))
        out = seg(received)

    def backward(loss):
        loss.backward()
        for produced, received in reversed(sent):
            if cut:
                produced.hidden.backward(received.hidden.grad)

    return out, backward


def grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(("kind", "task"), CASES)
def test_full_matches_hf(kind, task):
    lm = tiny(kind, task)
    ids, mask, _ = batch(task)
    with torch.no_grad():
        assert_logits_close(lm, lm.anatomy.full()(ids, mask), hf_logits(lm, ids, mask), mask)


@pytest.mark.parametrize(("kind", "task"), CASES)
def test_every_two_way_split_matches_forward_and_gradients(kind, task):
    lm = tiny(kind, task)
    ids, mask, labels = batch(task)
    lm.model.zero_grad()
    want = hf_logits(lm, ids, mask)
    task_loss(want, labels, task).backward()
    want_grads = grads(lm.model)
    assert all(g is not None for g in want_grads.values())  # every weight takes part
    for k in range(LAYERS + 1):
        lm.model.zero_grad()
        # k == 0: embedding-only first part; k == LAYERS: head-only second part. The flags only
        # matter there: by default a segment starting at 0 embeds and one ending at L has the head.
        first = lm.anatomy.segment(0, k, head=False)
        second = lm.anatomy.segment(k, LAYERS, embed=False)
        assert first.embed and not first.head and second.head and not second.embed
        logits, backward = run_chain([first, second], ids, mask, cut=True)
        assert_logits_close(lm, logits, want.detach(), mask)
        backward(task_loss(logits, labels, task))
        got_grads = grads(lm.model)
        for name, g in want_grads.items():
            assert (got_grads[name] is None) == (g is None), name
            if g is not None:
                torch.testing.assert_close(
                    got_grads[name], g, atol=ATOL, rtol=0, msg=f"k={k} {name}"
                )
    lm.model.zero_grad()


@pytest.mark.parametrize(("kind", "task"), CASES)
def test_three_way_split_then_head_only(kind, task):
    lm = tiny(kind, task)
    a = lm.anatomy
    ids, mask, labels = batch(task, lengths=(4, 6, 2, 6), seed=2)
    lm.model.zero_grad()
    want = hf_logits(lm, ids, mask)
    task_loss(want, labels, task).backward()
    want_grads = grads(lm.model)
    lm.model.zero_grad()
    pieces = [a.segment(0, 1), a.segment(1, 2), a.segment(2, 3, head=False), a.segment(3, 3)]
    logits, backward = run_chain(pieces, ids, mask, cut=True)
    assert_logits_close(lm, logits, want.detach(), mask)
    backward(task_loss(logits, labels, task))
    for name, p in lm.model.named_parameters():
        if want_grads[name] is not None:
            torch.testing.assert_close(p.grad, want_grads[name], atol=ATOL, rtol=0, msg=name)
    lm.model.zero_grad()


@pytest.mark.parametrize(
    ("kind", "window_config"),
    [
        ("mistral", {"sliding_window": 3}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}),
    ],
)
def test_sliding_window_layers(kind, window_config):
    lm = tiny(kind, "causal_lm", **window_config)
    ids, mask, _ = batch("causal_lm")
    assert [lm.anatomy.window(i) for i in range(LAYERS)] != [None] * LAYERS
    with torch.no_grad():
        want = hf_logits(lm, ids, mask)
        assert_logits_close(
            lm,
            run_chain([lm.anatomy.segment(0, 2), lm.anatomy.segment(2, 3)], ids, mask, cut=False)[
                0
            ],
            want,
            mask,
        )
        # The window binds at T=7 > 3: the same weights without it give other logits.
        full_attention = hf_logits(tiny(kind, "causal_lm"), ids, mask)
    assert not torch.allclose(want, full_attention)


@pytest.mark.parametrize(
    ("kind", "task"),
    [("gpt2", "causal_lm"), ("llama", "classification"), ("bert", "classification")],
)
def test_eager_attention_masks_match(kind, task):
    lm = tiny(kind, task)
    ids, mask, _ = batch(task)
    lm.model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            assert_logits_close(lm, lm.anatomy.full()(ids, mask), hf_logits(lm, ids, mask), mask)
    finally:
        lm.model.config._attn_implementation = "sdpa"


def test_unpadded_batch_and_single_row():
    for kind, task in [("llama", "causal_lm"), ("roberta", "classification")]:
        lm = tiny(kind, task)
        for ids, mask, _ in (batch(task, lengths=(5, 5)), batch(task, lengths=(6,))):
            with torch.no_grad():
                assert_logits_close(
                    lm, lm.anatomy.full()(ids, mask), hf_logits(lm, ids, mask), mask
                )


class _Shift(nn.Module):
    """Stands in for an adapter: wraps a layer and adds a constant to its output."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base_layer = base

    def forward(self, x):
        return self.base_layer(x) + 0.5


def test_segment_uses_modules_replaced_after_it_was_built():
    lm = make_tiny("llama", "classification")  # a private copy: it is modified here
    ids, mask, _ = batch("classification")
    seg = lm.anatomy.segment(0, 2)
    rest = lm.anatomy.segment(2, 3)
    with torch.no_grad():
        before = rest(seg(ids, mask))
        attn = lm.model.model.layers[1].self_attn
        attn.q_proj = _Shift(attn.q_proj)
        after = rest(seg(ids, mask))
        want = hf_logits(lm, ids, mask)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, want, atol=ATOL, rtol=0)


def test_segment_parts_and_ownership():
    lm = tiny("gpt2", "classification")
    a = lm.anatomy
    first, last = a.segment(0, 1), a.segment(1, 3)
    assert first.paths == [
        "transformer.wte",
        "transformer.wpe",
        "transformer.drop",
        "transformer.h.0",
    ]
    assert last.paths[-2:] == ["transformer.ln_f", "score"]
    n_first = sum(p.numel() for p in first.parameters())
    n_last = sum(p.numel() for p in last.parameters())
    assert n_first + n_last == sum(p.numel() for p in lm.model.parameters())
    for name, _ in lm.model.named_parameters():
        assert first.owns(name) != last.owns(name), name
    assert last.owns("base_model.model.transformer.h.2.attn.c_attn.lora_A.weight")
    lm.model.train()
    last.eval()
    assert not a.block(1).training and a.block(0).training
    lm.model.eval()


def test_task_loss_shifts_and_ignores_padding():
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[1, 2, 3, 4], [0, 1, -100, -100]])
    want = torch.nn.functional.cross_entropy(
        torch.cat([logits[0, :3], logits[1, :1]]), torch.tensor([2, 3, 4, 1])
    )
    torch.testing.assert_close(task_loss(logits, labels, "causal_lm"), want)
    cls = torch.randn(3, 4)
    y = torch.tensor([0, 3, 1])
    torch.testing.assert_close(
        task_loss(cls, y, "classification"), torch.nn.functional.cross_entropy(cls, y)
    )


def _takes_cache(hidden, attention_mask=None, cache=None, use_cache=False, **kwargs):
    return hidden


def _takes_past_key_values(hidden, attention_mask=None, past_key_values=None, **kwargs):
    return hidden


def _takes_neither(hidden, attention_mask=None, use_cache=False, **kwargs):
    return hidden


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_a_block_gets_its_kv_cache_by_the_keyword_its_forward_names(kind, monkeypatch):
    """transformers 5.x renamed the blocks' ``past_key_values`` to ``cache``: a block given
    the other name takes it into ``**kwargs`` and caches nothing, so the anatomy asks the
    block's signature once and refuses a block that names neither."""
    from cotune.errors import ModelError

    cache = object()
    for forward, name in ((_takes_cache, "cache"), (_takes_past_key_values, "past_key_values")):
        anatomy = make_tiny(kind, "causal_lm").anatomy  # a fresh one: it asks its blocks once
        monkeypatch.setattr(anatomy.blocks[0], "forward", forward)
        assert anatomy.cache_keyword(cache) == {name: cache}
    anatomy = make_tiny(kind, "causal_lm").anatomy
    monkeypatch.setattr(anatomy.blocks[0], "forward", _takes_neither)
    with pytest.raises(ModelError, match="neither as 'cache' nor as 'past_key_values'"):
        anatomy.cache_keyword(cache)
