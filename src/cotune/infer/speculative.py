"""Speculative decoding across the cut: the on-device drafter and the acceptance rules.

The drafter (HAT) is the device's own input blocks, a small adapter standing in for the cloud's
middle, and the device's output blocks: it proposes tokens without a round trip. The full model
then scores every proposal in one cloud pass, and the standard rule keeps the prefix it agrees
with: exact for greedy decoding, and for sampling the rejection rule of Leviathan et al. / Chen
et al. (accept ``d`` with probability ``min(1, p(d)/q(d))``, else sample from ``max(0, p - q)``),
so the output is distributed exactly as the full model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


class MiddleAdapter(nn.Module):
    """What the drafter puts where the cloud's blocks would be: ``h + W2 gelu(W1 norm(h))``.
    The last layer starts at zero, so an untrained drafter skips the middle (identity)."""

    def __init__(self, hidden_size: int, width: int | None = None) -> None:
        super().__init__()
        width = width or hidden_size
        self.norm = nn.LayerNorm(hidden_size)
        self.up = nn.Linear(hidden_size, width)
        self.down = nn.Linear(width, hidden_size)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, h: Tensor) -> Tensor:
        x = self.down(nn.functional.gelu(self.up(self.norm(h.to(self.up.weight.dtype)))))
        return h + x.to(h.dtype)


@dataclass(frozen=True)
class Sampling:
    """``temperature`` 0 is greedy decoding; otherwise sampling from ``softmax(logits / T)``."""

    temperature: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def probs(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits.float() / self.temperature, dim=-1)

    def pick(self, logits: Tensor, gen: torch.Generator | None) -> int:
        """One token from ``logits`` ``[V]``."""
        if self.greedy:
            return int(logits.argmax())
        return int(torch.multinomial(self.probs(logits), 1, generator=gen))


def accept(
    drafts: list[int],
    target_logits: Tensor,
    draft_probs: list[Tensor] | None,
    sampling: Sampling,
    gen: torch.Generator | None,
) -> tuple[int, int]:
    """``(accepted, next)``: how many leading drafts the full model keeps, and the token that
    follows them (its correction at the first rejection, or a bonus token when all pass).

    ``target_logits`` ``[len(drafts) + 1, V]``: row ``i`` is the full model's prediction for the
    position of ``drafts[i]`` (the last row: the position after every draft).
    """
    for i, d in enumerate(drafts):
        row = target_logits[i]
        if sampling.greedy:
            if int(row.argmax()) != d:
                return i, int(row.argmax())
            continue
        p, q = sampling.probs(row), draft_probs[i]  # type: ignore[index]
        u = torch.rand((), generator=gen)
        if u * q[d] > p[d]:  # rejected with probability 1 - min(1, p/q)
            residual = (p - q).clamp_min(0)
            total = residual.sum()
            dist = residual / total if total > 0 else p
            return i, int(torch.multinomial(dist, 1, generator=gen))
    return len(drafts), sampling.pick(target_logits[len(drafts)], gen)
