"""Peak training memory of a node: weights + gradients + optimizer state + saved activations.

Saved activations are measured, not modelled: one forward runs under a ``saved_tensors_hooks``
that records every distinct storage autograd keeps for backward. Weights count the bytes a
parameter really occupies (a bitsandbytes 4-bit weight: its packed data and statistics). With
gradient checkpointing the blocks keep only their inputs; the block being recomputed in
backward holds its activations again, so one block's share is added back. On a CUDA node the
probe also runs a real forward + backward and reports the allocator's peak (``measured``);
simulated devices are still judged by the estimate (their memory is not the GPU's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from cotune.errors import ConfigError
from cotune.sim.profiles import DeviceProfile

OPTIMIZER_STATE_FACTOR = {"adamw": 2, "adam": 2, "sgd_momentum": 1, "sgd": 0}


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


def saved_activation_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs its
    forward, leaving out ``exclude`` (the parameters: they are counted as weights). Views and
    tensors saved twice share a storage and count once."""
    return _saved_storages(fn, exclude)[0]


def _saved_storages(
    fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()
) -> tuple[int, set[tuple[int, int]], Any]:
    skip = {_storage_key(p) for p in exclude if p.device.type != "meta"}
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta" and not t.is_sparse:
            key = _storage_key(t)
            if key not in skip:
                seen[key] = key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), set(seen) | skip, out


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # every parameter the device holds (frozen and trainable)
    grads: int  # one gradient per trainable parameter
    optimizer: int  # optimizer state (AdamW: 2 × trainable)
    activations: int  # tensors saved for backward
    total: int
    # A CUDA node's allocator peak over a real forward + backward, plus the optimizer state
    # that appears at the first step (None: not measured, e.g. on a CPU).
    measured: int | None = None

    def fits(self, profile: DeviceProfile) -> bool:
        return self.total <= profile.memory_bytes


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
    """``(frozen_bytes, trainable_bytes)`` of a module's parameters, as stored (a quantized
    weight counts its packed bytes and statistics; a layer the node does not hold, nothing)."""
    from cotune.accel.quantize import parameter_bytes

    frozen = trainable = 0
    for p, n in parameter_bytes(model):
        if p.requires_grad:
            trainable += n
        else:
            frozen += n
    return frozen, trainable


class MemoryProbe:
    """Measures saved activations once per ``(key, shapes)`` and builds the estimate."""

    def __init__(self) -> None:
        self._cache: dict[tuple, tuple[int, int | None]] = {}

    def estimate(
        self, key: str, model: torch.nn.Module, forward: Callable[..., Any], *args: Any,
        optimizer: str = "adamw", **kwargs: Any,
    ) -> MemoryEstimate:  # fmt: skip
        """Runs ``forward(*args, **kwargs)`` once per shape (its result is discarded)."""
        from cotune.sim.costs import shape_signature

        ck = (key, shape_signature(*args, **kwargs))
        params = [p for p in model.parameters() if p.device.type != "meta"]
        if ck not in self._cache:
            acts = _activation_bytes(model, lambda: forward(*args, **kwargs), params)
            peak = None
            if params and params[0].device.type == "cuda":
                peak = _cuda_peak(lambda: forward(*args, **kwargs), params)
            self._cache[ck] = (acts, peak)
        acts, peak = self._cache[ck]
        frozen, trainable = model_param_bytes(model)
        est = estimate_memory(
            frozen_bytes=frozen, trainable_bytes=trainable, activation_bytes=acts,
            optimizer=optimizer,
        )  # fmt: skip
        if peak is None:
            return est
        return dataclasses.replace(est, measured=peak + est.optimizer)


def _activation_bytes(
    model: torch.nn.Module, fn: Callable[[], Any], params: list[torch.Tensor]
) -> int:
    from cotune.accel.compute import compute_of, kept_for_checkpoint, without_checkpointing

    root = _root(model)
    compute = compute_of(root)
    if not compute.checkpointing:
        return saved_activation_bytes(fn, params)
    with kept_for_checkpoint() as kept:
        outside, seen, _ = _saved_storages(fn, params)
    boundary = sum(k[1] for k in {_storage_key(t) for t in kept} - seen)
    with without_checkpointing(root):
        whole = saved_activation_bytes(fn, params)
    # Backward recomputes one block at a time: its activations are alive again meanwhile.
    one_block = max(0, whole - outside) // max(1, len(kept))
    return outside + boundary + one_block


def _root(model: torch.nn.Module) -> torch.nn.Module:
    """The whole model a module (a ``Segment``) belongs to: where its compute settings live."""
    anatomy = getattr(model, "anatomy", None)
    return anatomy.model if anatomy is not None else model


def _cuda_peak(fn: Callable[[], Any], params: list[torch.Tensor]) -> int:
    """The CUDA allocator's peak while ``fn``'s forward and a backward from its output run."""
    device = params[0].device
    grads_before = [p.grad for p in params]
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    tensors = [t for t in _tensors(out) if t.requires_grad]
    if tensors:
        torch.autograd.backward([t.float().sum() for t in tensors])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    for p, g in zip(params, grads_before):
        p.grad = g
    return int(peak)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    hidden = getattr(out, "hidden", None)  # a segment's Activations
    if isinstance(hidden, torch.Tensor):
        return [hidden]
    if isinstance(out, list | tuple):
        return [t for o in out for t in _tensors(o)]
    return []
