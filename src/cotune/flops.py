"""Counting the FLOPs of what actually ran, with torch's own counter (its formulas for matmuls,
convolutions and attention, and cotune's for the CPU's attention kernel, below), for the
simulator's meter and for the roles that count their own work (a cluster choice, an
emulator's forward, a decoding step)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def _attention_flops(query: Any, key: Any, value: Any, *_: Any, **__: Any) -> int:
    """Scores ``Q·Kᵀ`` and output ``P·V`` (grouped-query: every query head against its shared
    key/value head), on shapes ``[B, H, T, D]``: torch's own formula for the CUDA kernels."""
    b, heads, sq, d = query
    return 2 * b * heads * sq * key[2] * (d + value[3])


def _attention_backward_flops(
    grad: Any, query: Any, key: Any, value: Any, *_: Any, **__: Any
) -> int:
    """The backward: scores recomputed, then the gradients of ``P``, ``V``, ``Q`` and ``K``
    (torch's formula for the CUDA kernels)."""
    b, heads, sq, d = query
    return 2 * b * heads * sq * key[2] * (3 * d + 2 * value[3])


# torch counts the CUDA attention kernels but not the CPU's fused one (which every
# ``scaled_dot_product_attention`` on a CPU runs): without these a run counted on a CPU would
# charge no attention at all, and the simulator's times would depend on the host's device.
_aten = torch.ops.aten
CPU_ATTENTION: dict[Any, Any] = {
    getattr(_aten, name): formula
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", _attention_flops),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _attention_backward_flops),
    )
    if hasattr(_aten, name)
}


class _TotalsOnly:
    """Stands in for ``FlopCounterMode``'s module tracker: every count goes to "Global"."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _TotalsOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` that counts only the total (``get_total_flops``).

    Its module tracker, which attributes counts to modules for the per-module table we never
    print, hooks every module's forward and registers a gradient hook on every input that
    requires grad: for a split server's segment (whose input is a leaf requiring grad) that
    cost about as much as a small model's whole counted step. Totals are the same: the
    tracker's "Global" entry receives every count whatever the module
    (``tests/test_flops.py``)."""
    mode = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)
    mode.mod_tracker = _TotalsOnly()  # type: ignore[assignment]
    return mode
