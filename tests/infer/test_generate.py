"""U-shaped inference (HAT): the split and the speculative rule change how tokens are computed,
never which tokens come out."""

from __future__ import annotations

import pytest
import torch

from cotune.config import ModelSection
from cotune.errors import ConfigError, ProtocolError
from cotune.infer.cache import KVCache
from cotune.infer.generate import UGenerator
from cotune.infer.speculative import MiddleAdapter, Sampling
from cotune.infer.split import CloudMiddle, UCut
from cotune.models import load_model
from cotune.runtime.messages import Message


def decoder(kind: str, layers: int = 4, vocab: int = 60, seed: int = 1):
    cfg = ModelSection(name_or_path=f"random:{kind}", task="causal_lm",
                       random_config={"num_hidden_layers": layers})  # fmt: skip
    return load_model(cfg, vocab_size=vocab, seed=seed)


def noisy_drafter(hidden: int, std: float) -> MiddleAdapter:
    torch.manual_seed(0)
    d = MiddleAdapter(hidden)
    torch.nn.init.normal_(d.down.weight, std=std)
    return d


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_greedy_u_shaped_and_speculative_decoding_equal_generate(kind):
    lm = decoder(kind)
    prompt = torch.randint(2, 60, (1, 9), generator=torch.Generator().manual_seed(4))
    ref = lm.model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0,
                            eos_token_id=None)[0, 9:].tolist()  # fmt: skip
    ids = prompt[0].tolist()
    plain = UGenerator(lm.anatomy, UCut(1, 1)).generate(ids, 20)
    assert plain.tokens == ref and plain.drafted == 0 and plain.decode_rounds == 19
    for cut, drafter, gamma, chunk in [
        (UCut(1, 2), noisy_drafter(lm.anatomy.hidden_size, 0.05), 3, 4),
        (UCut(2, 1), MiddleAdapter(lm.anatomy.hidden_size), 5, None),
        (UCut(1, 1), noisy_drafter(lm.anatomy.hidden_size, 1.0), 4, 1),  # drafts mostly rejected
    ]:
        spec = UGenerator(lm.anatomy, cut, drafter=drafter, gamma=gamma, prefill_chunk=chunk)
        out = spec.generate(ids, 20)
        assert out.tokens == ref, (cut, gamma)
        assert out.drafted > 0 and out.decode_rounds < 19 or out.accepted < out.drafted
    # Some rejections happened above (else rollback would be untested).
    assert out.accepted < out.drafted


def test_sampling_across_the_cut_follows_the_full_models_distribution():
    lm = decoder("gpt2", layers=3, vocab=8, seed=3)
    m, a = lm.model, lm.anatomy
    with torch.no_grad():
        m.lm_head.weight.mul_(3.0)  # a peaked target, unlike the drafter's
    prompt = [2, 5, 3]
    with torch.no_grad():  # the exact law of the second token: sum over the first
        p1 = torch.softmax(m(torch.tensor([prompt])).logits[0, -1], -1)
        p2 = torch.softmax(m(torch.tensor([prompt + [t] for t in range(8)])).logits[:, -1], -1)
        exact = (p1[:, None] * p2).sum(0)
    drafter = MiddleAdapter(a.hidden_size)
    torch.manual_seed(0)
    torch.nn.init.normal_(drafter.down.weight, std=2.0)
    torch.nn.init.normal_(drafter.up.weight, std=2.0)
    gen = UGenerator(a, UCut(1, 1), drafter=drafter, gamma=2)
    n, counts, accepted, drafted = 500, torch.zeros(8), 0, 0
    for s in range(n):
        out = gen.generate(prompt, 3, Sampling(temperature=1.0), seed=s)
        counts[out.tokens[1]] += 1
        accepted, drafted = accepted + out.accepted, drafted + out.drafted
    tv = 0.5 * (counts / n - exact).abs().sum().item()
    assert tv < 0.08  # sampling noise at n=500 is ~0.04
    assert 0.1 < accepted / drafted < 0.9  # both branches of the rule ran
    # The test can tell: the drafter's own law of that token is far from the target's.
    with torch.no_grad():
        qs = []
        for t in range(8):
            device, draft_out = gen._fresh()
            h = device.input_hidden(torch.tensor([prompt + [t]]), 0)
            qs.append(torch.softmax(a.run_head(draft_out(drafter(h), 0), None)[0, -1], -1))
        drafted_law = (p1[:, None] * torch.stack(qs)).sum(0)
    assert 0.5 * (drafted_law - exact).abs().sum().item() > 0.3


def test_chunked_prefill_gives_the_same_logits():
    lm = decoder("llama")
    ids = torch.randint(2, 60, (1, 11), generator=torch.Generator().manual_seed(0))
    logits = {}
    for chunk in (None, 1, 3, 11):
        gen = UGenerator(lm.anatomy, UCut(1, 1), prefill_chunk=chunk)
        device, _ = gen._fresh()
        rows, c = [], chunk or 11
        for p in range(0, 11, c):
            rows.append(device.logits(ids[:, p : p + c], p))
        logits[chunk] = torch.cat(rows)
        if chunk is not None:
            torch.testing.assert_close(logits[chunk], logits[None], atol=1e-5, rtol=0)
    assert device.link.stats.positions_up == 11 and device.link.stats.messages == 2


def test_cache_rollback_is_exact():
    lm = decoder("qwen2")
    a = lm.anatomy
    ids = torch.randint(2, 60, (1, 8), generator=torch.Generator().manual_seed(1))
    gen = UGenerator(a, UCut(1, 1))
    dev1, _ = gen._fresh()
    dev1.logits(ids, 0)  # 8 positions, then undo the last 3 and run them differently
    other = torch.tensor([[7, 8, 9]])
    after_rollback = dev1.logits(other, 5)
    dev2, _ = gen._fresh()
    fresh = dev2.logits(torch.cat([ids[:, :5], other], 1), 0)[5:]
    torch.testing.assert_close(after_rollback, fresh, atol=1e-5, rtol=0)
    cache = KVCache()
    with pytest.raises(ValueError, match="holds 0 positions"):
        cache.crop(1)


def test_bytes_per_token_come_from_the_encoded_messages():
    lm = decoder("gpt2")
    D = lm.anatomy.hidden_size
    out = UGenerator(lm.anatomy, UCut(1, 1)).generate(list(range(2, 12)), 6)
    s = out.link
    assert s.messages == 2 * (1 + 5) and len(s.sizes) == 6
    assert s.bytes_up == sum(u for u, _ in s.sizes) and s.bytes_down == sum(d for _, d in s.sizes)
    # fp32 hidden states: 4 bytes per value and position, plus a frame of its own.
    assert s.sizes[0][0] > 10 * D * 4 and 5 * D * 4 > s.sizes[1][0] > D * 4
    half = UGenerator(lm.anatomy, UCut(1, 1), codec="fp16").generate(list(range(2, 12)), 6)
    assert half.link.bytes_up < 0.7 * s.bytes_up
    assert out.bytes_per_token == (s.bytes_up + s.bytes_down) / 6


def test_bad_requests_and_configs_are_clear_errors():
    lm = decoder("gpt2")
    cloud = CloudMiddle(lm.anatomy, UCut(1, 1))
    h = torch.zeros(1, 2, lm.anatomy.hidden_size)
    with pytest.raises(ProtocolError, match="beyond the 0 cached positions"):
        cloud.on_middle(Message("middle", "device-0", "server", {"hidden": h}, {"pos": 3}))
    with pytest.raises(ProtocolError, match="meta.pos"):
        cloud.on_middle(Message("middle", "device-0", "server", {}, {"pos": 0}))
    with pytest.raises(ConfigError, match="leave the cloud at least one"):
        UCut(2, 2).check(4)
    with pytest.raises(ConfigError, match="causal_lm"):
        UGenerator(load_model(ModelSection(name_or_path="random:gpt2"), num_labels=2).anatomy)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_flop_memo_predicts_exactly_what_counting_every_operation_gives(kind, monkeypatch):
    """Once an operation's line in the cache length is verified, its FLOPs are predicted, not
    counted: the trace (device and cloud FLOPs per step) equals counting everything."""
    from cotune.infer.timeline import FlopMemo, Timeline
    from cotune.sim.profiles import get_profile

    lm = decoder(kind)
    torch.manual_seed(0)
    drafter = MiddleAdapter(lm.anatomy.hidden_size)
    torch.nn.init.normal_(drafter.down.weight, std=0.05)

    def trace(gen, prompt):
        tl = Timeline(get_profile("phone-mid"), get_profile("a100"))
        out = gen.generate(prompt, 12, timeline=tl)
        return [
            (s.kind, s.device_before, s.cloud, s.device_after, s.after_token) for s in out.trace
        ]

    memo = UGenerator(lm.anatomy, UCut(1, 1), drafter=drafter, gamma=3, prefill_chunk=4)
    trace(memo, list(range(2, 12)))  # learns the lines
    learned = trace(memo, list(range(5, 14)))
    assert any(line is not None for line in memo.flops.lines.values())
    monkeypatch.setattr(FlopMemo, "known", lambda self, key, pos: None)  # count everything
    fresh = UGenerator(lm.anatomy, UCut(1, 1), drafter=drafter, gamma=3, prefill_chunk=4)
    assert learned == trace(fresh, list(range(5, 14)))
