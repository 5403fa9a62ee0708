"""Padding-free blocks (``train.padding_free``): a batch's real tokens only, packed ``[N, D]``.

Dynamic padding pads every row of a batch to its longest row; on the demo's data a third of
the token slots a batch of 16 computes are padding, and every projection and MLP of every block
computes them. A block that supports packing (``Anatomy.packs``) runs its token-wise parts (the
projections, MLPs, norms, dropout) on the ``N`` real tokens and only its attention in the
padded ``[B, heads, T, d]`` layout: the queries, keys and values are scattered to their padded
places, attended under the padding mask and gathered back. Each real token's result is the
padded computation's (same arithmetic per token, up to the rounding of other matmul shapes).

When the head reads only each row's first token (BERT's pooler, RoBERTa's classification
head), the last block computes keys and values for every token but queries, the attention
output and the MLP for the first tokens only (``Segment`` asks for it with ``keep="first"``).

Only call sites that count FLOPs with the real-token count (``token_dims``) ask for packing
(``padding_free``): the FLOPs of a packed step depend on ``N``, not only on the batch's shape.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a ``[B, T]`` padding mask are: ``index`` (flat positions in
    ``B*T``, row-major), ``lengths`` (real tokens per row) and ``first`` (each row's first real
    token in the packed order)."""

    batch: int
    width: int
    index: Tensor | None  # None: no padding, packing is a reshape
    lengths: tuple[int, ...]
    first: Tensor

    @classmethod
    def of(cls, attention_mask: Tensor) -> Packing:
        b, t = (int(s) for s in attention_mask.shape)
        lengths = tuple(int(n) for n in attention_mask.bool().sum(1).tolist())
        starts = [0, *itertools.accumulate(lengths[:-1])]
        index = None  # no padding: packing is a reshape
        if sum(lengths) != b * t:
            index = attention_mask.reshape(-1).bool().nonzero().squeeze(1)
        first = torch.tensor(starts, device=attention_mask.device)
        return cls(b, t, index, lengths, first)

    @functools.cached_property
    def tokens(self) -> int:
        return sum(self.lengths)

    @functools.cached_property
    def last(self) -> Tensor:
        """Each row's last real token in the packed order (rows hold at least one)."""
        return self.first + torch.tensor(self.lengths, device=self.first.device) - 1

    def columns(self, kept: Tensor) -> Tensor:
        """The columns in the padded ``[B, T]`` layout of packed tokens ``kept`` (one a row)."""
        flat = kept if self.index is None else self.index.index_select(0, kept)
        return flat % self.width

    def query_rows(self, mask: Tensor | None, columns: Tensor) -> Tensor | None:
        """A causal ``[B, 1, T, T]`` attention mask's rows for one query per batch row, at
        ``columns``: ``[B, 1, 1, T]``. Without a mask (no padding, SDPA's causal path) a query
        in the last column sees every key (None); one elsewhere, the keys up to its own."""
        if mask is not None:
            rows = torch.arange(self.batch, device=columns.device)
            return mask[rows, :, columns, :].unsqueeze(2)
        if bool((columns == self.width - 1).all()):
            return None
        keys = torch.arange(self.width, device=columns.device)
        return (keys[None, :] <= columns[:, None])[:, None, None, :]

    def pack(self, hidden: Tensor) -> Tensor:
        """``[B, T, ...]`` → the real tokens ``[N, ...]``."""
        flat = hidden.reshape(self.batch * self.width, *hidden.shape[2:])
        return flat if self.index is None else flat.index_select(0, self.index)

    def unpack(self, packed: Tensor) -> Tensor:
        """``[N, ...]`` → ``[B, T, ...]`` with zeros at the padding."""
        if self.index is not None:
            full = packed.new_zeros(self.batch * self.width, *packed.shape[1:])
            packed = full.index_copy(0, self.index, packed)
        return packed.reshape(self.batch, self.width, *packed.shape[1:])

    def heads(self, y: Tensor, size: int) -> Tensor:
        """Packed projections ``[N, heads*size]`` → the padded attention layout ``[B, heads, T, size]``."""
        return self.unpack(y).view(self.batch, self.width, -1, size).transpose(1, 2)

    def tokens_of(self, att: Tensor) -> Tensor:
        """An attention output ``[B, heads, T, size]`` → its real tokens ``[N, heads*size]``."""
        return self.pack(att.transpose(1, 2).reshape(self.batch, self.width, -1))

    def row_heads(self, y: Tensor, size: int) -> Tensor:
        """One kept token's projection per row ``[B, heads*size]`` → ``[B, heads, 1, size]``
        (a block that keeps only the token its consumer reads queries with those alone)."""
        return y.view(self.batch, 1, -1, size).transpose(1, 2)

    def row_tokens(self, att: Tensor) -> Tensor:
        """The attention output of one query per row ``[B, heads, 1, size]`` → ``[B, heads*size]``."""
        return att.transpose(1, 2).reshape(self.batch, -1)

    def attention_tokens(self, att: Tensor, keep: Tensor | None) -> Tensor:
        """A block's attention output back to tokens: every real one, or the kept one per row."""
        return self.tokens_of(att) if keep is None else self.row_tokens(att)

    def group_tokens(self, rows: Sequence[int]) -> list[int]:
        """Real tokens of consecutive row groups (a cohort's ``rows``)."""
        out, start = [], 0
        for n in rows:
            out.append(sum(self.lengths[start : start + n]))
            start += n
        return out


_REQUESTED: ContextVar[bool] = ContextVar("padding_free", default=False)
_ACTIVE: ContextVar[Packing | None] = ContextVar("packing", default=None)


@contextlib.contextmanager
def padding_free(enabled: bool = True) -> Iterator[None]:
    """Segments run in the block may pack their blocks (those whose family supports it)."""
    token = _REQUESTED.set(enabled)
    try:
        yield
    finally:
        _REQUESTED.reset(token)


def requested() -> bool:
    return _REQUESTED.get()


@contextlib.contextmanager
def active(packing: Packing) -> Iterator[None]:
    """While a packed block runs (its checkpointed recompute too): lets adapter layers with
    per-row-group tensors map row counts to token counts."""
    token = _ACTIVE.set(packing)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def group_sizes(x: Tensor, rows: list[int]) -> list[int]:
    """The split sizes along ``x``'s first dimension of row groups of ``rows`` rows: token
    counts when ``x`` holds a packed batch's tokens, else ``rows``."""
    packing = _ACTIVE.get()
    if packing is None or x.dim() != 2 or x.shape[0] != packing.tokens:
        return rows
    return packing.group_tokens(rows)


def per_token(x: Tensor, per_row: Tensor) -> Tensor | None:
    """``per_row`` (one value per example of the batch) lined up with ``x``'s first dimension:
    as it is when ``x`` has a row per example, repeated over each row's real tokens when ``x``
    holds a packed batch's tokens ``[N, D]``; None when it is neither."""
    if per_row.numel() == x.shape[0]:
        return per_row
    packing = _ACTIVE.get()
    if (
        packing is not None
        and x.dim() == 2
        and x.shape[0] == packing.tokens
        and per_row.numel() == packing.batch
    ):
        lengths = torch.tensor(packing.lengths, device=per_row.device)
        return per_row.repeat_interleave(lengths)
    return None


def token_dims(attention_mask: Tensor, enabled: bool) -> tuple[int, ...]:
    """A batch's FLOP dimensions: ``(B, T)``, and its real tokens ``N`` when it may pack."""
    b, t = (int(s) for s in attention_mask.shape)
    if not enabled:
        return (b, t)
    return (b, t, int(attention_mask.bool().sum()))
