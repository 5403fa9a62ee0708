"""Wire codecs: how a tensor is turned into the tensors that actually travel.

A codec encodes one tensor into named *parts* (tensors stored in the safetensors body) plus
JSON-able *side* data (stored in the message's JSON header), and decodes them back to the
original dtype and shape. ``fp16``/``bf16`` need one part; int8 per-channel quantization
(``{"q": int8, "scale": fp32}``) or top-k sparsification (``{"idx": int64, "val": fp16}``,
side ``{"k": ...}``) fit the same interface, so they plug in with :func:`register_codec`.

A codec only touches the tensors it ``applies_to`` (by default: floating point); every other
tensor (ids, labels, masks) travels as is under the identity codec ``fp32``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from cotune.errors import ProtocolError

Parts = dict[str, torch.Tensor]
Side = dict[str, Any]


class Codec(ABC):
    """One way of putting a tensor on the wire. Subclasses set ``name`` and ``rel_error_bound``."""

    name: str = ""
    #: Worst-case relative error per element for normal-range values (0.0 = lossless).
    rel_error_bound: float = 0.0

    def applies_to(self, tensor: torch.Tensor) -> bool:
        """Whether this codec transforms ``tensor``; others travel unchanged (identity codec)."""
        return tensor.is_floating_point()

    @abstractmethod
    def encode(self, tensor: torch.Tensor) -> tuple[Parts, Side]:
        """Return the wire parts (CPU tensors) and JSON-able side data for ``tensor``."""

    @abstractmethod
    def decode(
        self, parts: Parts, side: Side, dtype: torch.dtype, shape: tuple[int, ...]
    ) -> torch.Tensor:
        """Rebuild a tensor of ``dtype`` and ``shape`` from what :meth:`encode` produced."""


class IdentityCodec(Codec):
    """Every tensor as is: bitwise lossless, whatever its dtype (float64 stays float64)."""

    name = "fp32"
    rel_error_bound = 0.0

    def applies_to(self, tensor: torch.Tensor) -> bool:
        return True

    def encode(self, tensor: torch.Tensor) -> tuple[Parts, Side]:
        return {"data": tensor}, {}

    def decode(
        self, parts: Parts, side: Side, dtype: torch.dtype, shape: tuple[int, ...]
    ) -> torch.Tensor:
        return parts["data"]


class CastCodec(Codec):
    """Cast floating tensors to a narrower float for the wire; restore the dtype on decode."""

    def __init__(self, name: str, wire_dtype: torch.dtype, rel_error_bound: float) -> None:
        self.name = name
        self.wire_dtype = wire_dtype
        self.rel_error_bound = rel_error_bound

    def encode(self, tensor: torch.Tensor) -> tuple[Parts, Side]:
        wire = tensor.to(self.wire_dtype)
        # fp16 overflows to inf above 65504: a silent inf would poison training later, so fail
        # here with the fix instead.
        if not bool(torch.isfinite(wire).all()) and bool(torch.isfinite(tensor).all()):
            big = float(tensor.abs().max())
            raise ProtocolError(
                f"codec {self.name!r}: a value of magnitude {big:.3g} does not fit in "
                f"{self.wire_dtype}; use codec 'bf16' or 'fp32' for this message"
            )
        return {"data": wire}, {}

    def decode(
        self, parts: Parts, side: Side, dtype: torch.dtype, shape: tuple[int, ...]
    ) -> torch.Tensor:
        return parts["data"].to(dtype)


_CODECS: dict[str, Codec] = {}


def register_codec(codec: Codec, *, replace: bool = False) -> None:
    """Make ``codec`` available by ``codec.name`` to messages and engines."""
    if not codec.name or not codec.name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"codec name {codec.name!r} must be a short alphanumeric identifier")
    if codec.name in _CODECS and not replace:
        raise ValueError(f"codec {codec.name!r} is already registered (pass replace=True)")
    _CODECS[codec.name] = codec


def get_codec(name: str) -> Codec:
    """The registered codec called ``name``; unknown names are a ``ProtocolError``."""
    try:
        return _CODECS[name]
    except (KeyError, TypeError):
        raise ProtocolError(
            f"unknown codec {name!r}; registered codecs: {', '.join(available_codecs())}"
        ) from None


def available_codecs() -> list[str]:
    """Names of all registered codecs, sorted."""
    return sorted(_CODECS)


register_codec(IdentityCodec())
# Unit roundoff of the wire format: 2^-11 for fp16 (10 mantissa bits), 2^-8 for bf16 (7 bits).
register_codec(CastCodec("fp16", torch.float16, 2.0**-11))
register_codec(CastCodec("bf16", torch.bfloat16, 2.0**-8))
