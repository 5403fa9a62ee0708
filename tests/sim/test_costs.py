"""FLOP counts vs the analytic transformer count, and the memory estimate vs a measured peak.

Measured peak (CPU): PyTorch's profiler with ``profile_memory=True`` records every CPU
allocator malloc/free with its size; the running sum of those events over one training step
(forward, backward, first AdamW step) gives the peak of live tensor bytes above the
parameters that already existed. That is what the allocator really held (RSS would add
allocator caching and the rest of the process, and is too noisy at this size).
"""

import itertools

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cotune.errors import ConfigError  # noqa: E402
from cotune.sim.costs import FlopCounter, MemoryProbe, energy_j, estimate_memory  # noqa: E402
from cotune.sim.profiles import BUILTIN_PROFILES  # noqa: E402

D, L, H, V = 64, 2, 4, 500


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=L, n_embd=D, n_head=H, vocab_size=V, n_positions=128)
    return transformers.GPT2LMHeadModel(cfg)


def bert(num_labels=3):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=4 * D,
        vocab_size=V, max_position_embeddings=128, num_labels=num_labels,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(cfg)


def train_step(model, **batch):
    out = model(**batch)
    out.loss.backward()
    return out.loss


def test_gpt2_flops_match_analytic_and_are_cached():
    m, B, T = gpt2(), 2, 16
    ids = torch.randint(0, V, (B, T))
    fc = FlopCounter()
    _, flops = fc.run("gpt2", train_step, m, input_ids=ids, labels=ids)
    # forward: 2·(12·D²·L block params + D·V head)·tokens + attention (QKᵀ and AV) 4·B·L·T²·D;
    # backward = 2 × forward (gradients w.r.t. inputs and weights)
    fwd = 2 * (12 * D * D * L + D * V) * B * T + 4 * B * L * T * T * D
    assert flops == pytest.approx(3 * fwd, rel=0.05)
    fc.run("gpt2", train_step, m, input_ids=ids, labels=ids)
    assert fc.cached_shapes == 1 and fc.total == 2 * flops
    ids2 = torch.randint(0, V, (B, 2 * T))
    fc.run("gpt2", train_step, m, input_ids=ids2, labels=ids2)
    assert fc.cached_shapes == 2 and fc.by_key["gpt2"] > 2 * flops


def test_bert_flops_match_analytic():
    m, B, T = bert(), 3, 20
    ids = torch.randint(0, V, (B, T))
    labels = torch.tensor([0, 1, 2])
    _, flops = FlopCounter().run("bert", train_step, m, input_ids=ids, labels=labels)
    fwd = (
        2 * 12 * D * D * L * B * T + 4 * B * L * T * T * D + 2 * (D * D + D * 3) * B
    )  # + pooler, head
    assert flops == pytest.approx(3 * fwd, rel=0.05)


def measured_peak(model, step) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    above = max(itertools.accumulate((e.nbytes() for e in events), initial=0))
    return above + sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("B,T", [(4, 32), (8, 64)])
def test_memory_estimate_within_30_percent_of_measured_peak(B, T):
    m = gpt2()
    ids = torch.randint(0, V, (B, T))
    est = MemoryProbe().estimate("gpt2", m, lambda i: m(input_ids=i, labels=i), ids)
    assert est.optimizer == 2 * est.grads and est.activations > 0
    opt = torch.optim.AdamW(m.parameters())

    def step():
        train_step(m, input_ids=ids, labels=ids)
        opt.step()

    peak = measured_peak(m, step)
    assert est.total == pytest.approx(peak, rel=0.30)


def test_memory_estimate_counts_frozen_weights_once():
    m = bert()
    for n, p in m.named_parameters():
        p.requires_grad_(n.startswith("classifier"))
    ids = torch.randint(0, V, (2, 16))
    est = MemoryProbe().estimate(
        "bert", m, lambda i: m(input_ids=i, labels=torch.tensor([0, 1])), ids
    )
    head = sum(p.numel() * 4 for n, p in m.named_parameters() if n.startswith("classifier"))
    assert est.grads == head and est.weights == sum(p.numel() * 4 for p in m.parameters())
    with pytest.raises(ConfigError, match="unknown optimizer"):
        estimate_memory(frozen_bytes=0, trainable_bytes=1, activation_bytes=0, optimizer="lion")


def test_energy():
    p = BUILTIN_PROFILES["phone-mid"]
    assert energy_j(p, 1e9, 1e6) == pytest.approx(
        1e9 * p.energy_per_flop_j + 1e6 * p.energy_per_byte_j
    )
