"""The baselines HAT is measured against, in the same harness (same messages, same clock):

- ``cloud_only``: token ids up, the whole model on the cloud, each new token down;
- ``device_only``: the whole model on the device, nothing on the link;
- ``small_draft_speculative``: standard speculative decoding, a small separate draft model on
  the device and the whole model on the cloud (token ids travel, as in cloud-only).

U-shaped decoding without drafting is ``UGenerator(..., gamma=0)``. Greedy output of every
baseline equals the model's own ``generate`` (tests), so they differ only in where work runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cotune.infer.cache import KVCache
from cotune.infer.generate import GREEDY, Generation
from cotune.infer.speculative import Sampling, accept
from cotune.infer.split import LinkStats
from cotune.infer.timeline import Timeline, counted
from cotune.models.base import Anatomy
from cotune.runtime.messages import Message, encode_message


class FullDecoder:
    """Every block of a decoder with one cache: ``logits(ids, pos)`` for new positions."""

    def __init__(self, anatomy: Anatomy) -> None:
        self.anatomy = anatomy
        self.cache = KVCache()

    @torch.no_grad()
    def logits(self, ids: Tensor, pos: int) -> Tensor:
        self.cache.crop(pos)
        a = self.anatomy
        h = a.embed_at(ids, pos)
        ctx = a.decode_context(h, pos)
        for i in range(a.num_layers):
            h = a.run_block_cached(i, h, ctx, self.cache)
        return a.run_head(h, None)[0]


def _ids_message(kind: str, sender: str, receiver: str, ids: list[int], codec: str) -> int:
    """Encoded size of a message carrying token ids (what a token-level link sends)."""
    tokens = torch.tensor(ids, dtype=torch.long)
    return len(encode_message(Message(kind, sender, receiver, {"ids": tokens}), codec))


def cloud_only(
    anatomy: Anatomy,
    prompt: list[int],
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    *,
    seed: int = 0,
    timeline: Timeline | None = None,
    codec: str = "fp32",
) -> Generation:
    """The device sends its prompt's ids, the cloud generates and streams each token down."""
    gen, on = torch.Generator().manual_seed(seed), timeline is not None
    stats = LinkStats()
    out = Generation([], len(prompt), stats)
    cloud = FullDecoder(anatomy)
    t, send, pos = 0.0, list(prompt), 0
    while len(out.tokens) < max_new_tokens:
        # The request carries the prompt; later tokens are generated on the cloud without a
        # request, so after the first only the stream down is on the link.
        up = _ids_message("tokens", "device-0", "server", send, codec) if pos == 0 else 0
        logits, f = counted(on, cloud.logits, torch.tensor([send]), pos)
        pos += len(send)
        tok = sampling.pick(logits[-1], gen)
        down = _ids_message("token", "server", "device-0", [tok], codec)
        stats.add(up, down, messages=1 + (up > 0))
        if timeline is not None:
            arrived = timeline.up(up, t) if up else 0.0
            t = timeline.down(down, timeline.on_cloud(f, arrived, "model"))
            timeline.emit(1, t)
        out.tokens.append(tok)
        out.decode_rounds += 1
        send = [tok]
    out.decode_rounds -= 1  # the prefill is not a decode round
    return out


def device_only(
    anatomy: Anatomy,
    prompt: list[int],
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    *,
    seed: int = 0,
    timeline: Timeline | None = None,
) -> Generation:
    """The whole model on the device (where it fits): no link at all."""
    gen, on = torch.Generator().manual_seed(seed), timeline is not None
    out = Generation([], len(prompt), LinkStats())
    model = FullDecoder(anatomy)
    t, send, pos = 0.0, list(prompt), 0
    while len(out.tokens) < max_new_tokens:
        logits, f = counted(on, model.logits, torch.tensor([send]), pos)
        pos += len(send)
        tok = sampling.pick(logits[-1], gen)
        if timeline is not None:
            t = timeline.on_device(f, t, "model")
            timeline.emit(1, t)
        out.tokens.append(tok)
        send = [tok]
    out.decode_rounds = len(out.tokens) - 1
    return out


def small_draft_speculative(
    anatomy: Anatomy,
    draft: Anatomy,
    prompt: list[int],
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    *,
    gamma: int = 4,
    seed: int = 0,
    timeline: Timeline | None = None,
    codec: str = "fp32",
) -> Generation:
    """Standard speculative decoding with a small draft model on the device: each round the
    device drafts ``gamma`` tokens and sends their ids; the cloud scores them with the whole
    model and returns how many it keeps and the next token."""
    gen, on = torch.Generator().manual_seed(seed), timeline is not None
    stats = LinkStats()
    out = Generation([], len(prompt), stats)
    cloud, dev = FullDecoder(anatomy), FullDecoder(draft)
    n = len(prompt)

    def link(up_ids: list[int], down_ids: list[int], flops: float, ready: float) -> float:
        up = _ids_message("verify", "device-0", "server", up_ids, codec)
        down = _ids_message("verified", "server", "device-0", down_ids, codec)
        stats.add(up, down)
        if timeline is None:
            return 0.0
        return timeline.down(down, timeline.on_cloud(flops, timeline.up(up, ready), "model"))

    logits, f = counted(on, cloud.logits, torch.tensor([prompt]), 0)
    pending = sampling.pick(logits[-1], gen)
    t = link(prompt, [pending], f, 0.0)
    if timeline is not None:
        timeline.emit(1, t)
    out.tokens.append(pending)
    _, fd = counted(on, dev.logits, torch.tensor([prompt]), 0)  # the draft model's prefill
    t = timeline.on_device(fd, t, "draft") if timeline else 0.0
    pos = n  # positions both caches hold: the prompt (pending is not processed yet)
    seq = [*prompt, pending]
    while len(out.tokens) < max_new_tokens:
        g = min(gamma, max_new_tokens - len(out.tokens) - 1)
        drafts, qs, cur, fd = [], [], pending, 0
        for j in range(g):
            dl, f = counted(on, dev.logits, torch.tensor([[cur]]), pos + j)
            fd += f
            q = None if sampling.greedy else sampling.probs(dl[-1])
            cur = int(dl[-1].argmax()) if q is None else int(torch.multinomial(q, 1, generator=gen))
            drafts.append(cur)
            qs.append(q)
        ready = timeline.on_device(fd, t, "draft") if timeline else 0.0
        logits, f = counted(on, cloud.logits, torch.tensor([[pending, *drafts]]), pos)
        k, nxt = accept(drafts, logits, None if sampling.greedy else qs, sampling, gen)
        t = link([pending, *drafts], [k, nxt], f, ready)
        out.drafted += g
        out.accepted += k
        out.decode_rounds += 1
        pos += 1 + k
        seq += [*drafts[:k], nxt]
        dev.cache.crop(min(dev.cache.length(), pos))
        if dev.cache.length() < pos:  # all accepted: the draft model never saw the last draft
            lag = dev.cache.length()
            _, f = counted(on, dev.logits, torch.tensor([seq[lag:pos]]), lag)
            t = timeline.on_device(f, t, "draft") if timeline else 0.0
        new = [*drafts[:k], nxt][: max_new_tokens - len(out.tokens)]
        if timeline is not None:
            timeline.emit(len(new), t)
        out.tokens.extend(new)
        pending = nxt
    return out
