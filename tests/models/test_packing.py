"""Padding-free blocks (``cotune.models.packing``): the real tokens only, the same results."""

from __future__ import annotations

import pytest
import torch

from cotune.accel.compute import Compute, set_compute
from cotune.config import PeftSection
from cotune.errors import ModelError
from cotune.flops import flop_counter
from cotune.models import segment_loss, task_loss
from cotune.models.packing import Packing, group_sizes, padding_free, token_dims
from cotune.models.packing import active as packing_active
from cotune.peft import inject_adapters
from cotune.peft.grouped import row_groups
from tests.models.models_testlib import CASES, ENCODERS, batch, make_tiny


def adapted(kind: str, task: str = "classification", **random_config):
    loaded = make_tiny(kind, task, **random_config)
    adapters = inject_adapters(
        loaded.model,
        PeftSection(target_modules=[".*(query|value|c_attn|q_proj|v_proj)$"]),
        anatomy=loaded.anatomy,
        head_paths=loaded.anatomy.head_paths(),
    )
    with torch.no_grad():  # B = 0 at init would hide the adapter from the comparison
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    loaded.model.eval()
    return loaded, adapters


def logits_and_grads(loaded, ids, mask, labels, packed: bool, task: str = "classification"):
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    with padding_free(packed):
        logits = loaded.anatomy.full()(ids, mask)
    task_loss(logits, labels, task).backward()
    if task == "causal_lm":  # what padded positions predict is no one's business
        logits = logits * mask[..., None]
    return logits.detach(), [p.grad.clone() for p in params]


def test_packing_lays_out_the_real_tokens_and_back():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    layout = Packing.of(mask)
    assert layout.lengths == (3, 1, 4) and layout.tokens == 8
    assert layout.first.tolist() == [0, 3, 4]
    hidden = torch.arange(3 * 4 * 2, dtype=torch.float).reshape(3, 4, 2)
    packed = layout.pack(hidden)
    assert packed.shape == (8, 2)
    assert torch.equal(layout.unpack(packed), hidden * mask[..., None])
    assert layout.group_tokens([2, 1]) == [4, 4]
    full = Packing.of(torch.ones(2, 3, dtype=torch.long))
    assert full.index is None and full.first.tolist() == [0, 3]
    assert torch.equal(full.unpack(full.pack(hidden[:2, :3])), hidden[:2, :3])


def test_row_groups_of_a_packed_batch_split_by_tokens():
    layout = Packing.of(torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]]))
    with packing_active(layout):
        assert group_sizes(torch.zeros(6, 4), [2, 1]) == [5, 1]  # the packed tokens
        assert group_sizes(torch.zeros(3, 4), [2, 1]) == [2, 1]  # first tokens only: rows
    assert group_sizes(torch.zeros(6, 4), [2, 1]) == [2, 1]  # no packed block running


def test_token_dims_add_the_real_tokens_only_when_padding_free():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert token_dims(mask, False) == (2, 3)
    assert token_dims(mask, True) == (2, 3, 3)


@pytest.mark.parametrize(("kind", "task"), CASES)
@pytest.mark.parametrize("lengths", [(7, 5, 3, 1), (6, 6)], ids=["padded", "unpadded"])
def test_padding_free_blocks_give_the_padded_logits_and_gradients(kind, task, lengths):
    loaded, _ = adapted(kind, task)
    assert loaded.anatomy.packs
    assert loaded.anatomy.head_reads_first == (kind in ENCODERS)
    ids, mask, labels = batch(task, lengths)
    a_logits, a_grads = logits_and_grads(loaded, ids, mask, labels, False, task)
    b_logits, b_grads = logits_and_grads(loaded, ids, mask, labels, True, task)
    torch.testing.assert_close(b_logits, a_logits, rtol=1e-5, atol=1e-6)
    assert len(a_grads) == len(b_grads) > 0
    for a, b in zip(a_grads, b_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_sliding_windows_hold_in_padding_free_blocks():
    loaded, _ = adapted("mistral", "causal_lm", sliding_window=2)
    ids, mask, labels = batch("causal_lm", (7, 5, 3))
    a, _ = logits_and_grads(loaded, ids, mask, labels, False, "causal_lm")
    b, _ = logits_and_grads(loaded, ids, mask, labels, True, "causal_lm")
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    loaded.model.config.sliding_window = None  # the window really changes the result
    c, _ = logits_and_grads(loaded, ids, mask, labels, False, "causal_lm")
    assert (c - a).abs().max() > 1e-3


def test_padding_free_blocks_checkpoint_and_recompute_the_same():
    loaded, _ = adapted("bert")
    ids, mask, labels = batch("classification", (7, 2, 4))
    a_logits, a_grads = logits_and_grads(loaded, ids, mask, labels, True)
    set_compute(loaded.model, Compute(checkpointing=True))
    b_logits, b_grads = logits_and_grads(loaded, ids, mask, labels, True)
    torch.testing.assert_close(b_logits, a_logits)
    for a, b in zip(a_grads, b_grads):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral"])
@pytest.mark.parametrize("lengths", [(7, 5, 3, 1), (6, 6)], ids=["padded", "unpadded"])
def test_a_decoder_classifier_computes_its_last_block_for_each_rows_last_token(kind, lengths):
    """A decoder's classification head reads each row's last real token: the packed last block
    computes keys and values for every token but the rest for those B tokens only, with the
    padded model's logits and gradients (sliding windows and gradient checkpointing too)."""
    extra = {"sliding_window": 2} if kind == "mistral" else {}
    loaded, _ = adapted(kind, "classification", **extra)
    anatomy = loaded.anatomy
    assert anatomy.head_reads_last and not anatomy.head_reads_first
    kept, real = [], anatomy.run_block_packed

    def spy(i, x, layout, context, keep):
        kept.append((i, None if keep is None else keep.tolist()))
        return real(i, x, layout, context, keep)

    anatomy.run_block_packed = spy
    ids, mask, labels = batch("classification", lengths)
    a_logits, a_grads = logits_and_grads(loaded, ids, mask, labels, False)
    for checkpointing in (False, True):
        set_compute(loaded.model, Compute(checkpointing=checkpointing))
        kept.clear()
        b_logits, b_grads = logits_and_grads(loaded, ids, mask, labels, True)
        last = anatomy.num_layers - 1
        ends = torch.tensor(lengths).cumsum(0) - 1
        assert (last, ends.tolist()) in kept and all(k is None for i, k in kept if i != last)
        torch.testing.assert_close(b_logits, a_logits, rtol=1e-5, atol=1e-6)
        for a, b in zip(a_grads, b_grads):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_one_query_a_row_sees_the_keys_its_causal_mask_row_allows():
    layout = Packing.of(torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    assert layout.last.tolist() == [2, 6] and layout.columns(layout.last).tolist() == [2, 3]
    assert layout.columns(layout.first).tolist() == [0, 0]
    full = Packing.of(torch.ones(2, 4, dtype=torch.long))
    assert full.query_rows(None, full.columns(full.last)) is None  # the last query sees all
    first = full.query_rows(None, full.columns(full.first))
    assert (
        first.shape == (2, 1, 1, 4) and first[:, 0, 0].tolist() == [[True, False, False, False]] * 2
    )
    causal = torch.tril(torch.ones(4, 4, dtype=torch.bool))[None, None].expand(2, 1, 4, 4)
    rows = layout.query_rows(causal, torch.tensor([2, 3]))
    assert rows[:, 0, 0].tolist() == [[True, True, True, False], [True, True, True, True]]


def test_a_body_that_keeps_the_first_token_feeds_the_head_as_the_whole_model():
    loaded, _ = adapted("bert")
    anatomy = loaded.anatomy
    n = anatomy.num_layers
    body = anatomy.segment(0, n, embed=True, head=False, keep="first")
    head = anatomy.segment(n, n, embed=False, head=True)
    ids, mask, _ = batch("classification", (7, 5, 3))
    with torch.no_grad():
        whole = anatomy.full()(ids, mask)
        for packed in (False, True):
            with padding_free(packed):
                acts = body(ids, mask)
                assert acts.hidden.shape[:2] == (3, 1) and acts.attention_mask.shape == (3, 1)
                torch.testing.assert_close(head(acts), whole, rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelError, match="keep"):
        anatomy.segment(0, n, keep="first")  # a segment with the head keeps what it returns


def test_blocks_a_family_cannot_pack_run_padded_under_padding_free():
    loaded = make_tiny("gpt2", "causal_lm", reorder_and_upcast_attn=True)
    assert not loaded.anatomy.packs
    ids, mask, _ = batch("causal_lm")
    with torch.no_grad():
        a = loaded.anatomy.full()(ids, mask)
        with padding_free():
            b = loaded.anatomy.full()(ids, mask)
    assert torch.equal(a, b)


def test_a_cohort_of_adapters_runs_padding_free_per_row_group():
    """Two row groups with their own LoRA tensors in one packed batch: each group's logits
    equal that group run alone, padded."""
    loaded, adapters = adapted("bert")
    anatomy = loaded.anatomy
    own = {k: p.detach().clone() for k, p in loaded.model.named_parameters() if "lora_" in k}
    other = {k: v + 0.3 * torch.randn_like(v) for k, v in own.items()}
    ids, mask, _ = batch("classification", (7, 2, 4, 5, 1))
    rows = [2, 3]
    with torch.no_grad():
        with padding_free(), row_groups(adapters.layers, rows, [own, other]):
            joint = anatomy.full()(ids, mask)
        first = anatomy.full()(ids[:2], mask[:2])
        from cotune.peft.grouped import bind_state

        with bind_state(adapters.layers, other):
            second = anatomy.full()(ids[2:], mask[2:])
    torch.testing.assert_close(joint, torch.cat([first, second]), rtol=1e-5, atol=1e-6)


def loss_and_grads(loaded, forward, inputs, mask, labels, packed: bool):
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    with padding_free(packed):
        loss = segment_loss(forward, inputs, mask, labels, "causal_lm")
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("kind", [k for k, task in CASES if task == "causal_lm"])
def test_a_causal_lm_head_computes_logits_and_loss_for_the_real_tokens_only(kind):
    """Under padding_free a causal-LM head projects only the N real tokens onto the
    vocabulary (a [B*T, V] product and softmax shrink to [N, V]): the padded loss and
    gradients, the padded logits at the real positions, and fewer FLOPs."""
    loaded, _ = adapted(kind, "causal_lm")
    anatomy = loaded.anatomy
    whole = anatomy.full()
    ids, mask, labels = batch("causal_lm", (7, 5, 3, 1))
    a_loss, a_grads = loss_and_grads(loaded, whole, ids, mask, labels, False)
    b_loss, b_grads = loss_and_grads(loaded, whole, ids, mask, labels, True)
    torch.testing.assert_close(b_loss, a_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(a_grads, b_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    with torch.no_grad(), padding_free():
        logits, layout = whole.packed_logits(ids, mask)
        padded = whole(ids, mask)  # the blocks packed, the head over every position
    assert logits.shape == (16, anatomy.config.vocab_size) == (layout.tokens, logits.shape[1])
    torch.testing.assert_close(logits, layout.pack(padded), rtol=1e-5, atol=1e-6)
    counted = []
    for packed in (False, True):
        with flop_counter() as fc, torch.no_grad(), padding_free(packed):
            segment_loss(whole, ids, mask, labels, "causal_lm")
        counted.append(fc.get_total_flops())
    assert counted[1] < counted[0]


def test_a_head_only_segment_packs_its_logits_and_the_others_refuse():
    """A U-shaped device's top without blocks packs before its head too; a segment without
    a causal-LM head, or outside padding_free, does not offer packed logits."""
    loaded, _ = adapted("gpt2", "causal_lm")
    anatomy = loaded.anatomy
    n = anatomy.num_layers
    body, top = anatomy.segment(0, n, embed=True, head=False), anatomy.segment(n, n, head=True)
    ids, mask, labels = batch("causal_lm", (6, 2, 4))
    with torch.no_grad():
        acts = body(ids, mask)
    got = []
    for packed in (False, True):  # the loss and the gradient the cut sends down
        cut = acts.detached()
        with padding_free(packed):
            loss = segment_loss(top, cut, None, labels, "causal_lm")
        loss.backward()
        got.append((loss.detach(), cut.hidden.grad))
    torch.testing.assert_close(got[1][0], got[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1][1], got[0][1], rtol=1e-4, atol=1e-6)
    with padding_free():
        assert top.packs_logits() and not body.packs_logits()
        assert not adapted("bert")[0].anatomy.full().packs_logits()  # classification
    assert not top.packs_logits()
    with pytest.raises(ModelError, match="padding_free"):
        top.packed_logits(acts)


def test_a_causal_batch_with_nothing_to_learn_has_loss_zero_not_nan():
    """Instructions whose answers all fell past max_length leave only -100 targets: the loss
    is 0 with zero gradients (a plain mean would be 0/0 and stop the run as a divergence)."""
    from cotune.models.segment import packed_task_loss

    logits = torch.randn(2, 4, 7, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    labels = torch.full((2, 4), -100)
    padded = task_loss(logits, labels, "causal_lm")
    packed = packed_task_loss(Packing.of(mask).pack(logits), labels, Packing.of(mask))
    for loss in (padded, packed):
        assert loss.item() == 0.0
        (g,) = torch.autograd.grad(loss, logits)
        assert torch.equal(g, torch.zeros_like(g))
    labels[0, 2] = 3  # one target: the ordinary mean
    want = torch.nn.functional.cross_entropy(logits[0, 1:2], torch.tensor([3]))
    torch.testing.assert_close(task_loss(logits, labels, "causal_lm"), want)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_per_example_domain_experts_hold_in_padding_free_blocks(kind):
    """MoDULA's domain stage sends each example through its own domain's expert (an id per
    row); packed, its tokens must take their row's id (they took the default expert's)."""
    from cotune.peft.domains import route_domains

    loaded = make_tiny(kind, "classification")
    peft = PeftSection(
        method="modula",
        target_modules=[".*(query|value|c_attn)$"],
        options={"num_experts": 3},
    )
    adapters = inject_adapters(loaded.model, peft, anatomy=loaded.anatomy,
                               head_paths=loaded.anatomy.head_paths())  # fmt: skip
    adapters.set_stage("domain", domain=0)
    for layer in adapters.layers.values():
        layer.train_domains((0, 1, 2))
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "lora_domain" in name and "lora_B" in name:
                p.normal_(std=0.3)
    loaded.model.eval()
    ids, mask, labels = batch("classification", (7, 2, 4, 5))
    experts = [2, 0, 1, 2]
    got = []
    for packed in (False, True):
        with route_domains(adapters, experts):
            got.append(logits_and_grads(loaded, ids, mask, labels, packed))
    (padded, g_padded), (packed, g_packed) = got
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_packed, g_padded):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in g_packed)  # every routed expert learns
