"""Costs of what actually ran: FLOPs (counted by torch, cached per shape) and energy (the
per-device peak memory estimate is ``cotune.sim.memory``).

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and
attention; element-wise ops are not counted, as in the usual ``6·params·tokens`` rule). The
counter runs once per ``(key, input shapes)``; later calls with the same shapes run the
callable untouched and reuse the count, so steady-state training pays nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any, TypeVar

import torch

from cotune.flops import flop_counter
from cotune.sim.memory import (  # noqa: F401 - the memory model lives beside; re-exported
    MemoryEstimate,
    MemoryProbe,
    estimate_memory,
    model_param_bytes,
    saved_activation_bytes,
)
from cotune.sim.profiles import DeviceProfile

T = TypeVar("T")


def shape_signature(*args: Any, **kwargs: Any) -> tuple:
    """Shapes and dtypes of the tensors in (nested) args; other values by repr."""

    def sig(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return (tuple(x.shape), str(x.dtype))
        if isinstance(x, list | tuple):
            return tuple(sig(v) for v in x)
        if isinstance(x, Mapping):
            return tuple(sorted((str(k), sig(v)) for k, v in x.items()))
        if hasattr(x, "__dataclass_fields__"):
            return sig(vars(x))
        return repr(x) if isinstance(x, int | float | str | bool | None) else type(x).__name__

    return (sig(args), sig(kwargs))


class FlopCounter:
    """Counts the FLOPs of callables once per ``(key, shapes, dims)`` and keeps running totals.

    With ``dims`` a key also learns its exact FLOP law. A transformer step's counted FLOPs at
    ``dims=(B, T)`` are ``a·B·T + b·B·T² + c·B + e·T`` (projections and MLPs, attention
    scores, the head, work shared by the rows); a padding-free step (``dims=(B, T, N)``, N real
    tokens) computes its projections and MLPs on the N tokens and, for a head that reads the
    first token, the last block's rest on the first tokens only:
    ``a·N + b·B·T² + c·B + d·B·T + e·T``. The law is solved exactly from
    the counted shapes and *verified*: it predicts only once one more counted shape than it
    needed agreed with it, and only shapes within the span of the counted ones (a run whose
    batches all have one ``B`` and ``T`` predicts every ``N`` from two of them; a new ``T``
    is counted, and joins the law). Dynamic padding makes many shapes, and counting each one
    would slow a run by tens of percent at its start.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple, int] = {}
        self.total = 0
        self.by_key: dict[str, int] = {}
        self._samples: dict[str, dict[tuple[int, ...], int]] = {}
        self._law: dict[str, _Law | None] = {}  # verified

    def run(
        self,
        key: str,
        fn: Callable[..., T],
        *args: Any,
        dims: tuple[int, ...] | None = None,
        **kwargs: Any,
    ) -> tuple[T, int]:
        """Call ``fn(*args, **kwargs)`` (e.g. forward + backward) and return ``(result, flops)``."""
        # The dims join the key: a padding-free step's count depends on its real tokens too.
        cache_key = (key, shape_signature(*args, **kwargs), dims)
        flops = self._cache.get(cache_key)
        if flops is None and dims is not None:
            flops = self._predicted(key, dims)
            if flops is not None:
                self._cache[cache_key] = flops
        if flops is None:
            with flop_counter() as mode:
                result = fn(*args, **kwargs)
            flops = self._cache[cache_key] = int(mode.get_total_flops())
            if dims is not None:
                self._learn(key, dims, flops)
        else:
            result = fn(*args, **kwargs)
        self.add(key, flops)
        return result, flops

    def _learn(self, key: str, dims: tuple[int, ...], flops: int) -> None:
        samples = self._samples.setdefault(key, {})
        samples[dims] = flops
        self._law[key] = _Law.fit(list(samples.items()))

    def _predicted(self, key: str, dims: tuple[int, ...]) -> int | None:
        law = self._law.get(key)
        return None if law is None else law.predict(dims)

    def add(self, key: str, flops: int) -> None:
        """Charge ``flops`` to ``key`` without running anything (e.g. a cached estimate)."""
        self.total += flops
        self.by_key[key] = self.by_key.get(key, 0) + flops

    @property
    def cached_shapes(self) -> int:
        return len(self._cache)

    def has_law(self, key: str) -> bool:
        return self._law.get(key) is not None

    def known(self, key: str, dims: tuple[int, ...]) -> int | None:
        """FLOPs of ``key`` at ``dims`` if already counted there or predicted by its verified law."""
        counted = self._samples.get(key, {}).get(dims)
        return counted if counted is not None else self._predicted(key, dims)

    def charge_known(self, key: str, dims: tuple[int, ...]) -> int:
        """Charge ``key``'s known FLOPs at ``dims`` without running anything (work that ran batched
        with other roles' work is charged to each role as if it ran alone)."""
        flops = self.known(key, dims)
        if flops is None:
            raise KeyError(f"FLOPs of {key!r} at {dims} are not known yet")
        self.add(key, flops)
        return flops


def _features(dims: tuple[int, ...]) -> tuple[int, ...]:
    """The terms a step's FLOPs are a combination of (see ``FlopCounter``). The last, ``T``
    alone, is work shared by the batch's rows: some transformers releases compute the rotary
    tables as a matmul over the positions ``[1, T]``. A run whose batches keep one ``B`` needs
    no more counted shapes for it (``B·T`` and ``T`` then span one direction)."""
    if len(dims) == 2:
        bsz, seq = dims
        return (bsz * seq, bsz * seq * seq, bsz, seq)
    bsz, seq, tokens = dims
    return (tokens, bsz * seq * seq, bsz, bsz * seq, seq)


class _Law:
    """Exact rational coefficients of ``_features`` fitted to counted shapes, and the span of
    those shapes' features (the only shapes it predicts)."""

    def __init__(self, width: int, coef: list[Fraction], span: list[list[Fraction]]) -> None:
        self.width = width
        self.coef = coef
        self.span = span  # independent feature rows
        # For predictions in integers (a padding-free step's token count is new every step, so
        # most predictions are of a new shape): a shape is in the span when its features are
        # orthogonal to the span's null space, and its FLOPs are Σ num·feature / den.
        self._null = _null_space(span, width)
        self._den = math.lcm(*(c.denominator for c in coef))
        self._num = [int(c * self._den) for c in coef]
        self._memo: dict[tuple[int, ...], int | None] = {}

    @classmethod
    def fit(cls, pts: list[tuple[tuple[int, ...], int]]) -> _Law | None:
        """The law through ``pts``, or None when they disagree with every law or none of them
        checks it (each is needed to determine it)."""
        width = len(_features(pts[0][0]))
        if any(len(d) != len(pts[0][0]) for d, _ in pts):
            return None
        span: list[list[Fraction]] = []
        rhs: list[Fraction] = []
        for d, f in pts:
            row = [Fraction(x) for x in _features(d)]
            if _rank([*span, row]) > len(span):
                span.append(row)
                rhs.append(Fraction(f))
        if len(pts) == len(span):
            return None  # nothing verified the fit yet
        coef = _solve(span, rhs)
        law = cls(width, coef, span)
        if any(law._value(d) != f for d, f in pts):
            return None
        return law

    def _value(self, dims: tuple[int, ...]) -> Fraction:
        return sum((c * x for c, x in zip(self.coef, _features(dims))), Fraction(0))

    def predict(self, dims: tuple[int, ...]) -> int | None:
        if dims in self._memo:
            return self._memo[dims]
        out = None
        feats = _features(dims)
        if len(feats) == self.width and not any(_dot(v, feats) for v in self._null):
            value = _dot(self._num, feats)
            if value % self._den == 0:
                out = value // self._den
        self._memo[dims] = out
        return out


def _dot(a: Sequence[int], b: Sequence[int]) -> int:
    return sum(x * y for x, y in zip(a, b))


def _rref(rows: list[list[Fraction]], width: int) -> tuple[list[list[Fraction]], list[int]]:
    """The reduced row echelon form of ``rows`` over their first ``width`` columns (further
    columns, an augmented right-hand side, are carried along), and its pivot columns."""
    m = [r[:] for r in rows]
    pivots: list[int] = []
    for col in range(width):
        rank = len(pivots)
        piv = next((r for r in range(rank, len(m)) if m[r][col] != 0), None)
        if piv is None:
            continue
        m[rank], m[piv] = m[piv], m[rank]
        lead = m[rank][col]
        m[rank] = [x / lead for x in m[rank]]
        for r in range(len(m)):
            if r != rank and m[r][col] != 0:
                k = m[r][col]
                m[r] = [x - k * y for x, y in zip(m[r], m[rank])]
        pivots.append(col)
    return m, pivots


def _null_space(rows: list[list[Fraction]], width: int) -> list[list[int]]:
    """Integer vectors ``v`` with ``row · v = 0`` for every row: a basis of the null space
    (from the reduced row echelon form; each vector scaled to integers)."""
    m, pivots = _rref(rows, width)
    basis = []
    for free in (c for c in range(width) if c not in pivots):
        v = [Fraction(0)] * width
        v[free] = Fraction(1)
        for r, col in enumerate(pivots):
            v[col] = -m[r][free]
        scale = math.lcm(*(x.denominator for x in v))
        basis.append([int(x * scale) for x in v])
    return basis


def _rank(rows: list[list[Fraction]]) -> int:
    return len(_rref(rows, len(rows[0]) if rows else 0)[1])


def _solve(rows: list[list[Fraction]], rhs: list[Fraction]) -> list[Fraction]:
    """A solution of ``rows · c = rhs`` for independent ``rows`` (fewer rows than unknowns:
    the free unknowns are 0)."""
    n = len(rows[0])
    m, pivots = _rref([r[:] + [b] for r, b in zip(rows, rhs)], n)
    coef = [Fraction(0)] * n
    for r, col in enumerate(pivots):
        coef[col] = m[r][n]
    return coef


def energy_j(profile: DeviceProfile, flops: float, nbytes: float) -> float:
    """Energy of ``flops`` of compute and ``nbytes`` moved on ``profile``'s link."""
    return flops * profile.energy_per_flop_j + nbytes * profile.energy_per_byte_j
