"""Generation across the U-shaped cut: chunked prefill, then plain or speculative decoding.

``UGenerator.generate`` returns the tokens and what it took: messages and bytes each way, how
many drafts the full model accepted, and host-side timing (time to first token, time between
tokens). Greedy output equals the unsplit model's ``generate`` token for token, with or without
drafting (tests); sampled output follows the full model's distribution exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cotune.errors import ConfigError
from cotune.infer.speculative import MiddleAdapter, Sampling, accept
from cotune.infer.split import Blocks, CloudMiddle, DeviceEnds, LinkStats, MessageLink, UCut
from cotune.models.base import Anatomy

DEFAULT_CUT, GREEDY = UCut(), Sampling()


@dataclass
class Generation:
    """What one ``generate`` call produced and cost."""

    tokens: list[int]
    prompt_len: int
    link: LinkStats
    #: Cloud passes after the prefill (one per plain token, one per speculative round).
    decode_rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    #: Host seconds from the call to each generated token.
    token_times: list[float] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def ttft_s(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    @property
    def tbt_s(self) -> float | None:
        """Mean time between tokens after the first."""
        t = self.token_times
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None

    @property
    def bytes_per_token(self) -> float | None:
        return (
            (self.link.bytes_up + self.link.bytes_down) / len(self.tokens) if self.tokens else None
        )


class UGenerator:
    """A decoder cut U-shaped between a device and the cloud, with an optional drafter.

    ``gamma``: tokens drafted per cloud round (0: plain U-shaped decoding, one round per token).
    ``prefill_chunk``: prompt positions per upload during prefill (None: the whole prompt).
    """

    def __init__(
        self,
        anatomy: Anatomy,
        cut: UCut = DEFAULT_CUT,
        *,
        drafter: MiddleAdapter | None = None,
        gamma: int = 4,
        prefill_chunk: int | None = None,
        codec: str = "fp32",
    ) -> None:
        if gamma < 0 or (prefill_chunk is not None and prefill_chunk < 1):
            raise ConfigError(
                f"infer: gamma must be >= 0 and prefill_chunk >= 1 (got {gamma}, {prefill_chunk})"
            )
        if anatomy.task != "causal_lm":
            raise ConfigError(
                "infer: a U-shaped split generates text: model.task must be causal_lm"
            )
        cut.check(anatomy.num_layers)
        self.anatomy, self.cut = anatomy, cut
        self.gamma = gamma if drafter is not None else 0
        self.drafter = drafter
        self.prefill_chunk = prefill_chunk
        self.codec = codec

    def _fresh(self) -> tuple[DeviceEnds, Blocks | None]:
        link = MessageLink(CloudMiddle(self.anatomy, self.cut), self.codec)
        device = DeviceEnds(self.anatomy, self.cut, link)
        L = self.anatomy.num_layers
        draft_out = (
            Blocks(self.anatomy, L - self.cut.n_out, L) if self.drafter is not None else None
        )
        return device, draft_out

    @torch.no_grad()
    def _draft_logits(self, draft_out: Blocks, hidden: Tensor, pos: int) -> Tensor:
        assert self.drafter is not None
        return self.anatomy.run_head(draft_out(self.drafter(hidden), pos), None)[0]

    @torch.no_grad()
    def generate(
        self,
        prompt: list[int] | Tensor,
        max_new_tokens: int,
        sampling: Sampling = GREEDY,
        *,
        seed: int = 0,
        eos_token_id: int | None = None,
    ) -> Generation:
        ids = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)
        n = ids.size(1)
        if n < 1 or max_new_tokens < 1:
            raise ConfigError("infer: need a non-empty prompt and max_new_tokens >= 1")
        gen = torch.Generator().manual_seed(seed)
        device, draft_out = self._fresh()
        out = Generation([], n, device.link.stats)
        start = time.perf_counter()

        def emit(tokens: list[int]) -> bool:
            """Append; True when generation is done."""
            for t in tokens:
                out.tokens.append(t)
                out.token_times.append(time.perf_counter() - start)
                if len(out.tokens) >= max_new_tokens or t == eos_token_id:
                    return True
            return False

        # Prefill, chunk by chunk: each chunk's upload overlaps the cloud's work on the previous
        # one on a real link; the drafter's output cache follows along on the device.
        chunk = self.prefill_chunk or n
        for p in range(0, n, chunk):
            h = device.input_hidden(ids[:, p : p + chunk], p)
            logits = device.output_logits(device.middle(h, p), p)
            if draft_out is not None:
                draft_out(self.drafter(h), p)  # type: ignore[misc]
        pending, pos = sampling.pick(logits[-1], gen), n
        if emit([pending]):
            return out
        while True:
            g = min(self.gamma, max_new_tokens - len(out.tokens) - 1)
            out.decode_rounds += 1
            if g <= 0 or draft_out is None:  # plain U-shaped step: one token per round trip
                logits = device.logits(torch.tensor([[pending]]), pos)
                pending, pos = sampling.pick(logits[-1], gen), pos + 1
                if emit([pending]):
                    return out
                continue
            drafts, qs, hins, cur = [], [], [], pending
            for j in range(
                g + 1
            ):  # input blocks on pending + each draft; drafter on all but the last
                h = device.input_hidden(torch.tensor([[cur]]), pos + j)
                hins.append(h)
                if j == g:
                    break
                dl = self._draft_logits(draft_out, h, pos + j)
                q = None if sampling.greedy else sampling.probs(dl[-1])
                cur = (
                    int(dl[-1].argmax())
                    if q is None
                    else int(torch.multinomial(q, 1, generator=gen))
                )
                drafts.append(cur)
                qs.append(q)
            hidden = torch.cat(hins, dim=1)
            logits = device.output_logits(device.middle(hidden, pos), pos)
            k, nxt = accept(drafts, logits, None if sampling.greedy else qs, sampling, gen)
            out.drafted += g
            out.accepted += k
            new_pos = pos + 1 + k  # pending and the accepted drafts are now processed
            device.inputs.cache.crop(new_pos)
            device.outputs.cache.crop(new_pos)
            draft_out.cache.crop(min(draft_out.cache.length(), new_pos))
            if draft_out.cache.length() < new_pos:  # all accepted: the drafter never saw the last
                draft_out(self.drafter(hins[-1]), new_pos - 1)  # type: ignore[misc]
            pending, pos = nxt, new_pos
            if emit([*drafts[:k], nxt]):
                return out
