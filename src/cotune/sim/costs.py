"""Costs of what actually ran: FLOPs (counted by torch, cached per shape) and energy (the
per-device peak memory estimate is ``cotune.sim.memory``).

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and
attention; element-wise ops are not counted, as in the usual ``6·params·tokens`` rule). The
counter runs once per ``(key, input shapes)``; later calls with the same shapes run the
callable untouched and reuse the count, so steady-state training pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
    """Counts the FLOPs of callables once per ``(key, shapes)`` and keeps running totals.

    With ``dims=(batch, seq)`` a key also learns its exact FLOP law. A transformer step's counted
    FLOPs are ``a·B·T + b·B·T² + c·B`` (projections and MLPs, attention scores, the head), so
    after three counted shapes the integer coefficients are solved for and then *verified*
    against a fourth counted shape; only a verified law predicts later shapes. Dynamic padding
    makes many shapes, and counting each one would slow a run by tens of percent at its start.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple, int] = {}
        self.total: int = 0
        self.by_key: dict[str, int] = {}
        self._samples: dict[str, dict[tuple[int, int], int]] = {}
        self._law: dict[str, tuple[int, int, int] | None] = {}  # verified coefficients

    def run(
        self,
        key: str,
        fn: Callable[..., T],
        *args: Any,
        dims: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> tuple[T, int]:
        """Call ``fn(*args, **kwargs)`` (e.g. forward + backward) and return ``(result, flops)``."""
        cache_key = (key, shape_signature(*args, **kwargs))
        flops = self._cache.get(cache_key)
        if flops is None and dims is not None and self._law.get(key) is not None:
            a, b, c = self._law[key]  # type: ignore[misc]
            bsz, seq = dims
            flops = self._cache[cache_key] = a * bsz * seq + b * bsz * seq * seq + c * bsz
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

    def _learn(self, key: str, dims: tuple[int, int], flops: int) -> None:
        samples = self._samples.setdefault(key, {})
        samples[dims] = flops
        if self._law.get(key) is not None or len(samples) < 4:
            return
        pts = list(samples.items())
        fit = _solve_law(pts[:3])
        if fit is not None and all(_predict(fit, d) == f for d, f in pts):
            self._law[key] = fit

    def add(self, key: str, flops: int) -> None:
        """Charge ``flops`` to ``key`` without running anything (e.g. a cached estimate)."""
        self.total += flops
        self.by_key[key] = self.by_key.get(key, 0) + flops

    @property
    def cached_shapes(self) -> int:
        return len(self._cache)

    def has_law(self, key: str) -> bool:
        return self._law.get(key) is not None

    def known(self, key: str, dims: tuple[int, int]) -> int | None:
        """FLOPs of ``key`` at ``dims`` if already counted there or predicted by its verified law."""
        law = self._law.get(key)
        if law is not None:
            return _predict(law, dims)
        return self._samples.get(key, {}).get(dims)

    def charge_known(self, key: str, dims: tuple[int, int]) -> int:
        """Charge ``key``'s known FLOPs at ``dims`` without running anything (work that ran batched
        with other roles' work is charged to each role as if it ran alone)."""
        flops = self.known(key, dims)
        if flops is None:
            raise KeyError(f"FLOPs of {key!r} at {dims} are not known yet")
        self.add(key, flops)
        return flops


def _predict(law: tuple[int, int, int], dims: tuple[int, int]) -> int:
    a, b, c = law
    bsz, seq = dims
    return a * bsz * seq + b * bsz * seq * seq + c * bsz


def _solve_law(pts: list[tuple[tuple[int, int], int]]) -> tuple[int, int, int] | None:
    """Integer ``(a, b, c)`` with ``a·B·T + b·B·T² + c·B = flops`` through three points, or None."""
    from fractions import Fraction

    rows = [[Fraction(bs * t), Fraction(bs * t * t), Fraction(bs)] for (bs, t), _ in pts]
    rhs = [Fraction(f) for _, f in pts]
    # Gaussian elimination in exact rationals: the counts are integers and so must the law be.
    n = 3
    for col in range(n):
        piv = next((r for r in range(col, n) if rows[r][col] != 0), None)
        if piv is None:
            return None
        rows[col], rows[piv] = rows[piv], rows[col]
        rhs[col], rhs[piv] = rhs[piv], rhs[col]
        for r in range(n):
            if r != col and rows[r][col] != 0:
                k = rows[r][col] / rows[col][col]
                rows[r] = [x - k * y for x, y in zip(rows[r], rows[col])]
                rhs[r] -= k * rhs[col]
    sol = [rhs[i] / rows[i][i] for i in range(n)]
    if any(x.denominator != 1 for x in sol):
        return None
    return (int(sol[0]), int(sol[1]), int(sol[2]))


def energy_j(profile: DeviceProfile, flops: float, nbytes: float) -> float:
    """Energy of ``flops`` of compute and ``nbytes`` moved on ``profile``'s link."""
    return flops * profile.energy_per_flop_j + nbytes * profile.energy_per_byte_j
