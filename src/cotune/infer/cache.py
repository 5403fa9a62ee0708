"""A key/value cache for one side of a split model: only the blocks that side runs.

The model's own attention modules call ``update(keys, values, layer_idx)`` on whatever cache they
are given; this class answers that call and adds what speculative decoding needs and Hugging
Face's caches do not promise across versions: an exact rollback to a given length (``crop``) and
a byte count of what the side holds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class KVCache:
    """Keys and values ``[B, heads, T, head_dim]`` per block index, appended as positions run."""

    def __init__(self) -> None:
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}

    def update(
        self, keys: Tensor, values: Tensor, layer_idx: int, *_: Any, **__: Any
    ) -> tuple[Tensor, Tensor]:
        if layer_idx in self.keys:
            keys = torch.cat([self.keys[layer_idx], keys], dim=-2)
            values = torch.cat([self.values[layer_idx], values], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = keys, values
        return keys, values

    def length(self) -> int:
        """Positions held (every block of a side holds the same number)."""
        return next(iter(self.keys.values())).size(-2) if self.keys else 0

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions: undoes the positions a rejected draft added."""
        if not 0 <= length <= self.length():
            raise ValueError(f"crop({length}): the cache holds {self.length()} positions")
        for i in self.keys:
            self.keys[i] = self.keys[i][..., :length, :]
            self.values[i] = self.values[i][..., :length, :]

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for d in (self.keys, self.values) for t in d.values()
        )

    # What Hugging Face's attention code may ask of a cache object.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        t = self.keys.get(layer_idx)
        return 0 if t is None else t.size(-2)

    is_compileable = False
