"""Wire codecs: how a tensor is turned into the tensors that actually travel.

A codec encodes one tensor into named *parts* (tensors stored in the safetensors body) plus
JSON-able *side* data (stored in the message's JSON header), and decodes them back to the
original dtype and shape. ``fp16``/``bf16`` need one part; ``int8`` (per-channel quantization,
parts ``{"q": int8, "scale": fp32}``) and ``topk<fraction>`` (sparsification, parts
``{"idx": int32, "val": fp16}`` + side ``{"k", "scale"}``) live in :mod:`cotune.runtime.lossy`.

Names are either registered as is (:func:`register_codec`) or built from a *family* prefix and
an argument (:func:`register_codec_family`): ``topk`` = ``topk0.1``, ``topk0.05`` = ``topk:0.05``.
A family codec's ``name`` is its canonical spelling, which is what the wire header records.

A codec only touches the tensors it ``applies_to`` (by default: floating point); every other
tensor (ids, labels, masks) travels as is under the identity codec ``fp32``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from cotune.errors import ProtocolError
from cotune.runtime.validate import all_finite

Parts = dict[str, torch.Tensor]
Side = dict[str, Any]


class Codec(ABC):
    """One way of putting a tensor on the wire. Subclasses set ``name`` and ``rel_error_bound``."""

    name: str = ""
    #: Worst-case relative error per element for normal-range values (0.0 = lossless).
    rel_error_bound: float = 0.0
    #: The parts and side keys a message must carry for a tensor under this codec; a decoder
    #: refuses anything else (the peer may be buggy or hostile). ``None``: not declared, the
    #: codec's ``decode`` alone checks what it gets.
    part_names: tuple[str, ...] | None = None
    side_keys: tuple[str, ...] | None = None

    def applies_to(self, tensor: torch.Tensor) -> bool:
        """Whether this codec transforms ``tensor``; others travel unchanged (identity codec)."""
        return tensor.is_floating_point()

    def abs_error_bound(self, tensor: torch.Tensor) -> torch.Tensor:
        """Per-element bound on ``|decode(encode(t)) - t|`` for finite ``tensor`` (same shape).

        The default is ``rel_error_bound * |t|``; codecs whose error is not relative to each element
        (int8: relative to the channel's max; top-k: dropped elements) override it.
        """
        return self.rel_error_bound * tensor.detach().abs().to(torch.float64)

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
    part_names = ("data",)
    side_keys = ()

    def applies_to(self, tensor: torch.Tensor) -> bool:
        return True

    def encode(self, tensor: torch.Tensor) -> tuple[Parts, Side]:
        return {"data": tensor}, {}

    def decode(
        self, parts: Parts, side: Side, dtype: torch.dtype, shape: tuple[int, ...]
    ) -> torch.Tensor:
        data = parts["data"]
        if data.dtype != dtype or tuple(data.shape) != tuple(shape):
            raise ValueError(
                f"data is {data.dtype}{list(data.shape)}, header says {dtype}{list(shape)}"
            )
        return data


def reject_nonfinite(codec: str, tensor: torch.Tensor) -> None:
    """``ProtocolError`` counting the NaN and inf values of ``tensor`` (the caller adds its name)."""
    if not tensor.is_floating_point() or all_finite(tensor):
        return
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    raise ProtocolError(
        f"codec {codec!r}: {nan} NaN and {inf} inf values among {tensor.numel()}; lossy codecs "
        "refuse non-finite values (fix the producer, or send with 'fp32' to inspect them)"
    )


class CastCodec(Codec):
    """Cast floating tensors to a narrower float for the wire; restore the dtype on decode."""

    part_names = ("data",)
    side_keys = ()

    def __init__(self, name: str, wire_dtype: torch.dtype, rel_error_bound: float) -> None:
        self.name = name
        self.wire_dtype = wire_dtype
        self.rel_error_bound = rel_error_bound

    def encode(self, tensor: torch.Tensor) -> tuple[Parts, Side]:
        reject_nonfinite(self.name, tensor)  # as every lossy codec does (docs/architecture.md)
        wire = tensor.to(self.wire_dtype)
        # fp16 overflows to inf above 65504: a silent inf would poison training later, so fail
        # here with the fix instead.
        if not all_finite(wire) and all_finite(tensor):
            big = float(tensor.abs().max())
            raise ProtocolError(
                f"codec {self.name!r}: a value of magnitude {big:.3g} does not fit in "
                f"{self.wire_dtype}; use codec 'bf16' or 'fp32' for this message"
            )
        return {"data": wire}, {}

    def decode(
        self, parts: Parts, side: Side, dtype: torch.dtype, shape: tuple[int, ...]
    ) -> torch.Tensor:
        data = parts["data"]
        if data.dtype != self.wire_dtype or tuple(data.shape) != tuple(shape):
            raise ValueError(
                f"data is {data.dtype}{list(data.shape)}, expected {self.wire_dtype}{list(shape)}"
            )
        return data.to(dtype)


_CODECS: dict[str, Codec] = {}
# prefix -> (factory taking the argument text or None, human description of the accepted forms)
_FAMILIES: dict[str, tuple[Callable[[str | None], Codec], str]] = {}
_BUILT: dict[str, Codec] = {}  # canonical family names already built (codecs are stateless)


def register_codec(codec: Codec, *, replace: bool = False) -> None:
    """Make ``codec`` available by ``codec.name`` to messages and engines."""
    if not codec.name or not codec.name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"codec name {codec.name!r} must be a short alphanumeric identifier")
    if codec.name in _CODECS and not replace:
        raise ValueError(f"codec {codec.name!r} is already registered (pass replace=True)")
    _CODECS[codec.name] = codec


def register_codec_family(
    prefix: str, factory: Callable[[str | None], Codec], forms: str, *, replace: bool = False
) -> None:
    """Make ``<prefix>``, ``<prefix><arg>`` and ``<prefix>:<arg>`` valid codec names.

    ``factory(arg)`` gets the argument text (``None`` for the bare prefix) and returns a codec
    whose ``name`` is the canonical spelling; it raises ``ValueError`` on a bad argument.
    ``forms`` describes the accepted names for error messages.
    """
    if not prefix.isalpha() or not prefix.islower():
        raise ValueError(f"codec family prefix {prefix!r} must be lowercase letters")
    if (prefix in _FAMILIES or prefix in _CODECS) and not replace:
        raise ValueError(f"codec family {prefix!r} is already registered (pass replace=True)")
    _FAMILIES[prefix] = (factory, forms)


def get_codec(name: str) -> Codec:
    """The codec called ``name``: a registered one, or a family member such as ``topk0.05``.

    Unknown names and bad family arguments are a ``ProtocolError`` listing the valid forms.
    """
    if isinstance(name, str):
        if name in _CODECS:
            return _CODECS[name]
        if name in _BUILT:
            return _BUILT[name]
        for prefix, (factory, forms) in _FAMILIES.items():
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix) :]
            arg = None if rest == "" else rest.removeprefix(":")
            try:
                codec = factory(arg)
            except ValueError as e:
                raise ProtocolError(f"bad codec {name!r}: {e}; valid forms: {forms}") from None
            _BUILT[name] = _BUILT[codec.name] = codec
            return codec
    raise ProtocolError(f"unknown codec {name!r}; {_valid_forms()}")


def available_codecs() -> list[str]:
    """Names of all registered codecs, sorted (families are listed by :func:`codec_families`)."""
    return sorted(_CODECS)


def codec_families() -> dict[str, str]:
    """Registered family prefixes and the forms of name each accepts."""
    return {prefix: forms for prefix, (_, forms) in sorted(_FAMILIES.items())}


def _valid_forms() -> str:
    text = f"registered codecs: {', '.join(available_codecs())}"
    if _FAMILIES:
        text += "; parameterized: " + "; ".join(codec_families().values())
    return text


register_codec(IdentityCodec())
# Unit roundoff of the wire format: 2^-11 for fp16 (10 mantissa bits), 2^-8 for bf16 (7 bits).
register_codec(CastCodec("fp16", torch.float16, 2.0**-11))
register_codec(CastCodec("bf16", torch.bfloat16, 2.0**-8))

# Lossy codecs for activations and gradients (int8, topk<fraction>) register themselves on import;
# imported last because they subclass Codec and call the registry above.
from cotune.runtime import lossy  # noqa: E402, F401
