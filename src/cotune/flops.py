"""Counting the FLOPs of what actually ran, with torch's own counter (its formulas for matmuls,
convolutions and attention), for the simulator's meter and for the roles that count their own
work (a cluster choice, an emulator's forward, a decoding step)."""

from __future__ import annotations

from torch.utils.flop_counter import FlopCounterMode


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
    mode = FlopCounterMode(display=False)
    mode.mod_tracker = _TotalsOnly()  # type: ignore[assignment]
    return mode
