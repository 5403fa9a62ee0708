"""Generation across the U-shaped cut: chunked prefill, then plain or speculative decoding.

``UGenerator.generate`` returns the tokens and what it took: messages and bytes each way, how
many drafts the full model accepted, and host-side timing (time to first token, time between
tokens). Greedy output equals the unsplit model's ``generate`` token for token, with or without
drafting (tests); sampled output follows the full model's distribution exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor

from cotune.errors import ConfigError
from cotune.infer.speculative import MiddleAdapter, Sampling, accept
from cotune.infer.split import (
    DEVICE,
    Blocks,
    CloudMiddle,
    DeviceEnds,
    Link,
    LinkStats,
    MessageLink,
    UCut,
)
from cotune.infer.timeline import FlopMemo, Step, Timeline
from cotune.models.base import Anatomy

DEFAULT_CUT, GREEDY = UCut(), Sampling()
T = TypeVar("T")


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
    #: What each prefill chunk and decode round did (FLOPs counted with a timeline).
    trace: list[Step] = field(default_factory=list)

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
        self.flops = FlopMemo()  # kept across generations: counting stops once laws are known

    def _fresh(
        self, count_flops: bool = False, link: Link | None = None, role_id: str = DEVICE
    ) -> tuple[DeviceEnds, Blocks | None]:
        if link is None:  # in-process: the cloud's handler runs here, messages still encoded
            link = MessageLink(CloudMiddle(self.anatomy, self.cut), self.codec, count_flops)
        device = DeviceEnds(self.anatomy, self.cut, link, role_id)
        L = self.anatomy.num_layers
        draft_out = (
            Blocks(self.anatomy, L - self.cut.n_out, L) if self.drafter is not None else None
        )
        return device, draft_out

    @torch.no_grad()
    def _draft_prefill(self, draft_out: Blocks, hidden: Tensor, pos: int) -> None:
        assert self.drafter is not None
        draft_out(self.drafter(hidden), pos)

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
        timeline: Timeline | None = None,
        link: Link | None = None,
        role_id: str = DEVICE,
        on_device_flops: Callable[[int], None] | None = None,
    ) -> Generation:
        """Generate up to ``max_new_tokens`` after ``prompt``. With a ``timeline``, every
        operation's FLOPs are counted, recorded with the messages' bytes (``Generation.trace``)
        and replayed on its simulated clock (``timeline.token_times``: when each token appears
        on the device; ``parallel_drafting`` decides whether drafting overlaps verification).

        ``link``: the device's line to the cloud (default: an in-process cloud behind encoded
        messages; ``GridLink``: the cloud role over a Grid), ``role_id`` the device's name on
        it. ``on_device_flops`` hears the FLOPs of every device operation as it runs (the
        device's meter), which turns counting on."""
        ids = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)
        n = ids.size(1)
        if n < 1 or max_new_tokens < 1:
            raise ConfigError("infer: need a non-empty prompt and max_new_tokens >= 1")
        gen = torch.Generator().manual_seed(seed)
        guesses = torch.Generator().manual_seed(seed + 1)  # the drafter's bonus guesses only
        on = timeline is not None or on_device_flops is not None
        device, draft_out = self._fresh(on, link, role_id)

        def dev(op: str, q: int, at: int, fn: Callable[..., T], *args: Any) -> tuple[T, int]:
            """Device operation ``op`` on ``q`` positions at ``at``; its FLOPs reported."""
            result, flops = self.flops.run(on, (op, q), at, fn, *args)
            if on_device_flops is not None:
                on_device_flops(flops)
            return result, flops

        link = device.link.stats
        out = Generation([], n, link)
        trace = out.trace
        start = time.perf_counter()

        def emit(tokens: list[int]) -> list[int]:
            """Append what fits; the tokens kept (generation ends at the limit or eos)."""
            kept = []
            for t in tokens:
                if len(out.tokens) >= max_new_tokens or (
                    out.tokens and out.tokens[-1] == eos_token_id
                ):
                    break
                out.tokens.append(t)
                out.token_times.append(time.perf_counter() - start)
                kept.append(t)
            return kept

        def finished() -> bool:
            return len(out.tokens) >= max_new_tokens or out.tokens[-1] == eos_token_id

        def exchange(hidden: Tensor, pos: int) -> tuple[Tensor, int, int, int]:
            """Up, the cloud's middle, down: the hidden states back, bytes up, FLOPs, bytes down."""
            mid = device.middle(hidden, pos)
            (up, down), flops = link.sizes[-1], link.cloud_flops[-1]
            return mid, up, flops, down

        # Prefill in chunks (the timeline pipelines them: the cloud works on chunk i while
        # chunk i+1 is computed and sent).
        chunk = self.prefill_chunk or n
        for p in range(0, n, chunk):
            piece = ids[:, p : p + chunk]
            h, f_in = dev("input", piece.size(1), p, device.input_hidden, piece, p)
            mid, up, f_mid, down = exchange(h, p)
            logits, f_out = dev("output", mid.size(1), p, device.output_logits, mid, p)
            f_draft = 0
            if draft_out is not None:  # the drafter's own output cache follows the prompt
                _, f_draft = dev(
                    "draft-prefill", h.size(1), p, self._draft_prefill, draft_out, h, p
                )
            trace.append(Step("prefill", f_in, up, f_mid, down, f_out, 0, after_token=f_draft))
        pending, pos = sampling.pick(logits[-1], gen), n
        trace[-1].tokens = len(emit([pending]))
        while not finished():
            g = min(self.gamma, max_new_tokens - len(out.tokens) - 1)
            out.decode_rounds += 1
            if g <= 0 or draft_out is None:  # plain U-shaped step: one token per round trip
                h, f_in = dev("input", 1, pos, device.input_hidden, torch.tensor([[pending]]), pos)
                mid, up, f_mid, down = exchange(h, pos)
                logits, f_out = dev("output", mid.size(1), pos, device.output_logits, mid, pos)
                pending, pos = sampling.pick(logits[-1], gen), pos + 1
                trace.append(Step("plain", f_in, up, f_mid, down, f_out, len(emit([pending]))))
                continue
            (drafts, qs, hins), f_draft = dev(
                "draft", g, pos, self._draft, device, draft_out, pending, pos, g, sampling, gen
            )
            mid, up, f_mid, down = exchange(torch.cat(hins, dim=1), pos)
            logits, f_out = dev("output", mid.size(1), pos, device.output_logits, mid, pos)
            k, nxt = accept(drafts, logits, None if sampling.greedy else qs, sampling, gen)
            out.drafted += g
            out.accepted += k
            new_pos = pos + 1 + k  # pending and the accepted drafts are now processed
            device.inputs.cache.crop(new_pos)
            device.outputs.cache.crop(new_pos)
            draft_out.cache.crop(min(draft_out.cache.length(), new_pos))
            guessed = False
            if draft_out.cache.length() < new_pos:  # all accepted: the drafter never saw the last
                guess, f2 = dev(
                    "draft-logits",
                    1,
                    new_pos - 1,
                    self._draft_logits,
                    draft_out,
                    hins[-1],
                    new_pos - 1,
                )
                f_out += f2
                # Parallel drafting would have drafted on from this guess of the bonus token.
                guessed = sampling.pick(guess[-1], guesses) == nxt
            pending, pos = nxt, new_pos
            kept = emit([*drafts[:k], nxt])
            trace.append(Step("speculative", f_draft, up, f_mid, down, f_out, len(kept), guessed))
        if timeline is not None:
            timeline.replay(trace)
        return out

    def _draft(
        self,
        device: DeviceEnds,
        draft_out: Blocks,
        pending: int,
        pos: int,
        g: int,
        sampling: Sampling,
        gen: torch.Generator,
    ) -> tuple[list[int], list[Tensor | None], list[Tensor]]:
        """``g`` drafts after ``pending``: the input blocks run on ``pending`` and every draft
        (their hidden states go up for verification), the drafter on all but the last."""
        drafts: list[int] = []
        qs: list[Tensor | None] = []
        hins: list[Tensor] = []
        cur = pending
        for j in range(g + 1):
            h = device.input_hidden(torch.tensor([[cur]]), pos + j)
            hins.append(h)
            if j == g:
                break
            dl = self._draft_logits(draft_out, h, pos + j)
            q = None if sampling.greedy else sampling.probs(dl[-1])
            cur = int(dl[-1].argmax()) if q is None else int(torch.multinomial(q, 1, generator=gen))
            drafts.append(cur)
            qs.append(q)
        return drafts, qs, hins
