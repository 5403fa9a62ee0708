"""Checks a receiving role runs on tensors before computing with them (a split server's inputs).

Decoding a message already guarantees a well-formed tensor of the dtype and shape its header
announces; these checks are about whether that is what the receiver *expects*.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from cotune.errors import ProtocolError


def check_activation(
    name: str,
    tensor: torch.Tensor,
    *,
    shape: Sequence[int | None] | None = None,
    dtype: torch.dtype | None = None,
    allow_nonfinite: bool = False,
) -> torch.Tensor:
    """Return ``tensor`` if it is a dense tensor of the expected ``shape``/``dtype`` with only finite
    values; otherwise raise ``ProtocolError`` naming ``name`` (e.g. ``"message 'fwd' from
    'device-1': tensor 'hidden'"``), the expected and the actual value, or the NaN/inf counts.

    ``shape`` entries of ``None`` match any size (a batch or sequence length that varies).
    """
    if not isinstance(tensor, torch.Tensor):
        raise ProtocolError(f"{name}: expected a tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise ProtocolError(f"{name}: expected a dense tensor, got layout {tensor.layout}")
    if dtype is not None and tensor.dtype != dtype:
        raise ProtocolError(f"{name}: expected dtype {dtype}, got {tensor.dtype}")
    if shape is not None and not _shape_matches(tuple(tensor.shape), tuple(shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ProtocolError(f"{name}: expected shape {want}, got {list(tensor.shape)}")
    if not allow_nonfinite and tensor.is_floating_point() and not all_finite(tensor):
        nan = int(tensor.isnan().sum())
        inf = int(tensor.isinf().sum())
        raise ProtocolError(
            f"{name}: {nan} NaN and {inf} inf values among {tensor.numel()} "
            f"(shape {list(tensor.shape)}); non-finite activations are refused"
        )
    return tensor


def _shape_matches(actual: tuple[int, ...], expected: tuple[int | None, ...]) -> bool:
    return len(actual) == len(expected) and all(
        e is None or a == e for a, e in zip(actual, expected)
    )


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf in ``tensor`` (an empty one has none); a tenth of ``isfinite().all()``'s
    time on a large tensor."""
    # A NaN or inf anywhere makes the sum NaN or inf, so a finite sum proves every value finite
    # with one reduction; a non-finite sum (or an overflow of huge finite values) looks closer.
    if tensor.numel() and bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return True
    return bool(tensor.isfinite().all())


_REQUIRED: Any = object()


def finite_number(value: Any) -> bool:
    """A peer's number: an int or float (not a bool, a string or a container) and finite.
    Subclasses count (NumPy's float64, which the in-process engine hands over unencoded); a
    decoded message only ever holds plain ints and floats."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def meta_number(
    msg: Any, key: str, default: Any = _REQUIRED, *, minimum: float | None = None
) -> float:
    """A number a peer put in a message's meta (a loss, a squared norm, a regularizer): a
    finite real (not a bool), at least ``minimum`` when given; else ``ProtocolError`` naming
    the message and the field (a float() of a peer's string would end the run with a
    traceback instead)."""
    value = msg.meta.get(key, default)
    if value is _REQUIRED:
        raise ProtocolError(f"{msg.describe()}: meta {key!r} is missing")
    if not finite_number(value) or (minimum is not None and value < minimum):
        want = "a finite number" + (f" >= {minimum:g}" if minimum is not None else "")
        raise ProtocolError(f"{msg.describe()}: meta {key!r} is {value!r}, expected {want}")
    return float(value)
