"""Costs of what actually ran: FLOPs (counted by torch, cached per shape), a per-device peak
memory estimate, and energy.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and
attention; element-wise ops are not counted, as in the usual ``6·params·tokens`` rule). The
counter runs once per ``(key, input shapes)``; later calls with the same shapes run the
callable untouched and reuse the count, so steady-state training pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode

from cotune.errors import ConfigError
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
            with FlopCounterMode(display=False) as mode:
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


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


def saved_activation_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs its
    forward, leaving out ``exclude`` (the parameters: they are counted as weights). Views and
    tensors saved twice share a storage and count once."""
    skip = {_storage_key(p) for p in exclude}
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta" and not t.is_sparse:
            key = _storage_key(t)
            if key not in skip:
                seen[key] = key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # every parameter the device holds (frozen and trainable)
    grads: int  # one gradient per trainable parameter
    optimizer: int  # optimizer state (AdamW: 2 × trainable)
    activations: int  # tensors saved for backward
    total: int

    def fits(self, profile: DeviceProfile) -> bool:
        return self.total <= profile.memory_bytes


OPTIMIZER_STATE_FACTOR = {"adamw": 2, "adam": 2, "sgd_momentum": 1, "sgd": 0}


def estimate_memory(
    *,
    frozen_bytes: int,
    trainable_bytes: int,
    activation_bytes: int,
    optimizer: str = "adamw",
) -> MemoryEstimate:
    """Peak-memory estimate of one training step: weights + grads + optimizer state +
    saved activations. Conservative: in reality activations are freed while gradients and
    (lazily) optimizer state appear, but all must fit at some point of the first step."""
    try:
        factor = OPTIMIZER_STATE_FACTOR[optimizer]
    except KeyError:
        raise ConfigError(
            f"unknown optimizer {optimizer!r} for the memory estimate "
            f"(known: {', '.join(OPTIMIZER_STATE_FACTOR)})"
        ) from None
    weights = frozen_bytes + trainable_bytes
    grads, opt = trainable_bytes, factor * trainable_bytes
    return MemoryEstimate(
        weights, grads, opt, activation_bytes, weights + grads + opt + activation_bytes
    )


def model_param_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """``(frozen_bytes, trainable_bytes)`` of a module's parameters."""
    frozen = trainable = 0
    for p in model.parameters():
        n = p.numel() * p.element_size()
        if p.requires_grad:
            trainable += n
        else:
            frozen += n
    return frozen, trainable


class MemoryProbe:
    """Measures saved activations once per ``(key, shapes)`` and builds the estimate."""

    def __init__(self) -> None:
        self._cache: dict[tuple, int] = {}

    def estimate(
        self, key: str, model: torch.nn.Module, forward: Callable[..., Any], *args: Any,
        optimizer: str = "adamw", **kwargs: Any,
    ) -> MemoryEstimate:  # fmt: skip
        """Runs ``forward(*args, **kwargs)`` once per shape (its result is discarded)."""
        ck = (key, shape_signature(*args, **kwargs))
        if ck not in self._cache:
            params = list(model.parameters())
            self._cache[ck] = saved_activation_bytes(lambda: forward(*args, **kwargs), params)
        frozen, trainable = model_param_bytes(model)
        return estimate_memory(
            frozen_bytes=frozen, trainable_bytes=trainable, activation_bytes=self._cache[ck],
            optimizer=optimizer,
        )  # fmt: skip


def energy_j(profile: DeviceProfile, flops: float, nbytes: float) -> float:
    """Energy of ``flops`` of compute and ``nbytes`` moved on ``profile``'s link."""
    return flops * profile.energy_per_flop_j + nbytes * profile.energy_per_byte_j
