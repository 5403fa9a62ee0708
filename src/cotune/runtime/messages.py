"""Messages and their real encoded form.

Wire layout (all integers little-endian)::

    header  20 bytes  magic b"COTM" | version u16 | flags u16 (0) | json_len u32 | body_len u64
    json    json_len  UTF-8 JSON: kind, sender, receiver, meta, codec, tensors[{name, codec, dtype,
                      shape, parts, side}]; floats at a fixed width (``wire_json``)
    body    body_len  safetensors bytes holding every codec part under the key "<index>:<part>"
    crc     4 bytes   CRC32C of header + json + body (format 1: zlib's CRC32; still read)

Keys in the body are positional (not tensor names) so any tensor name is allowed and the JSON
says, in order, which parts rebuild which tensor.
"""

from __future__ import annotations

import functools
import json
import math
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from crc32c import crc32c
from safetensors.torch import save as st_save

from cotune.buffers import Encoded
from cotune.errors import ProtocolError
from cotune.jsonsafe import finite_or_none
from cotune.runtime.codecs import get_codec
from cotune.runtime.stbody import safetensors_pieces

MAGIC = b"COTM"
# 2: the checksum is CRC32C (hardware-accelerated: 0.09 ms for 1.5 MiB, against 0.6 ms for
# zlib's CRC32, which format 1 used; 4 of them per activation round trip). Both are read.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
HEADER_STRUCT = struct.Struct("<4sHHIQ")
HEADER_SIZE = HEADER_STRUCT.size  # 20
CRC_SIZE = 4
_KIND_RE = re.compile(r"^[a-z][a-z0-9_]*$")
WIRE_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


@dataclass
class Message:
    """What one role hands another: named tensors plus small JSON-able metadata.

    ``kind`` is a lowercase identifier (``[a-z][a-z0-9_]*``) because a receiving role
    dispatches it to ``on_<kind>``. ``meta`` round-trips through JSON (tuples become lists).
    A ``"codec"`` entry in ``meta`` overrides the engine's codec for this message.
    """

    kind: str
    sender: str
    receiver: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    # When it reached its receiver, set by whoever delivers it (the simulator: simulated
    # seconds); never on the wire, never compared.
    arrival: float | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not _KIND_RE.match(self.kind):
            raise ProtocolError(
                f"message kind {self.kind!r} from {self.sender!r} must match [a-z][a-z0-9_]* "
                "(it is dispatched to on_<kind>)"
            )

    def reply(
        self,
        kind: str,
        tensors: dict[str, torch.Tensor] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Message:
        """A message from this message's receiver back to its sender."""
        return Message(kind, self.receiver, self.sender, tensors or {}, meta or {})

    def describe(self) -> str:
        """Short human label used in error messages."""
        return f"message {self.kind!r} from {self.sender!r} to {self.receiver!r}"


def _wire_tensors(msg: Message, codec_name: str) -> tuple[list[dict[str, Any]], dict]:
    """Encode each tensor with the codec; return the per-tensor JSON entries and the body dict."""
    codec = get_codec(codec_name)
    identity = get_codec("fp32")
    entries: list[dict[str, Any]] = []
    body: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for i, (name, tensor) in enumerate(msg.tensors.items()):
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise ProtocolError(
                f"{msg.describe()}: tensor entries must be str -> Tensor, got {name!r}"
            )
        if tensor.layout != torch.strided or tensor.is_complex():
            raise ProtocolError(f"{msg.describe()}: tensor {name!r} must be dense and real")
        t = tensor.detach().cpu()
        if str(t.dtype).removeprefix("torch.") not in WIRE_DTYPES:
            raise ProtocolError(
                f"{msg.describe()}: tensor {name!r} has unsupported dtype {t.dtype}"
            )
        c = codec if codec.applies_to(t) else identity
        try:
            parts, side = c.encode(t)
        except ProtocolError as e:  # codecs do not know which tensor they encode: say it here
            raise ProtocolError(f"{msg.describe()}: tensor {name!r}: {e}") from None
        for part, pt in parts.items():
            pt = pt.detach().cpu().contiguous()
            # safetensors refuses two entries sharing storage (e.g. the same tensor sent twice).
            ptr = pt.untyped_storage().data_ptr()
            if pt.numel() and ptr in seen_storage:
                pt = pt.clone()
            seen_storage.add(pt.untyped_storage().data_ptr())
            body[f"{i}:{part}"] = pt
        entries.append(
            {
                "name": name,
                "codec": c.name,
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape),
                "parts": list(parts),
                "side": side,
            }
        )
    return entries, body


def _wire_float(x: float) -> str:
    # 17 significant digits round-trip any float64; the exponent gets three digits and a
    # positive number a leading space (JSON allows whitespace before a value), so every finite
    # float takes 24 characters whatever its value.
    mantissa, exponent = f"{abs(x):.16e}".split("e")
    return f"{'-' if math.copysign(1.0, x) < 0 else ' '}{mantissa}e{int(exponent):+04d}"


def _wire_str(text: str) -> str:
    # Keys, kinds and role ids repeat in every message: short strings are encoded once.
    return _short_str(text) if len(text) <= 64 else json.dumps(text, ensure_ascii=False)


@functools.lru_cache(maxsize=4096)
def _short_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _wire_key(key: Any) -> str:
    if isinstance(key, str):
        return _wire_str(key)
    if isinstance(key, bool) or not isinstance(key, int):
        raise TypeError(f"keys must be str or int, not {type(key).__name__}")
    return _wire_str(str(int(key)))


def wire_json(value: Any) -> str:
    """Compact JSON of a message's header document, in which a number's length never depends on
    its value: two runs equal to float precision (a device cohort against one device at a time,
    one engine against another) send the same bytes, so their counted bytes and simulated times
    are equal too. Non-finite floats must already be ``None``; raises TypeError like json."""
    kind = type(value)  # the commonest exact types first (bool is not int here)
    if kind is str:
        return _wire_str(value)
    if kind is int:
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"non-finite float {value!r} in message JSON")
        return _wire_float(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{_wire_key(k)}:{wire_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join([wire_json(v) for v in value]) + "]"
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def encode_message(msg: Message, codec: str = "fp32") -> bytes:
    """The bytes that travel for ``msg``: header + JSON + safetensors body + CRC32C."""
    return bytes(encode_message_pieces(msg, codec))  # one copy of the tensors


def encode_message_pieces(msg: Message, codec: str = "fp32") -> Encoded:
    """:func:`encode_message`'s bytes, not joined yet (see :class:`Encoded`)."""
    js, body_tensors = wire_parts(msg, codec)
    body = body_pieces(body_tensors)
    header = HEADER_STRUCT.pack(MAGIC, FORMAT_VERSION, 0, len(js), sum(len(p) for p in body))
    crc = crc32c(js, crc32c(header))
    for piece in body:
        crc = crc32c(piece, crc)
    return Encoded([header, js, *body, struct.pack("<I", crc)])


def body_pieces(body_tensors: dict[str, torch.Tensor]) -> list[bytes | memoryview]:
    """The safetensors body of a message, as pieces to join (``runtime/stbody.py``)."""
    pieces = safetensors_pieces(body_tensors)
    return [st_save(body_tensors)] if pieces is None else pieces


def wire_parts(msg: Message, codec: str) -> tuple[bytes, dict[str, torch.Tensor]]:
    """A message's JSON header document (encoded) and the codec's parts its body serializes."""
    entries, body_tensors = _wire_tensors(msg, codec)
    # The document is {"kind", "sender", "receiver", "codec", "meta", "tensors"}, written as
    # wire_json would write it, from pieces that repeat message after message (the head, a
    # tensor entry of a given name, dtype and shape) encoded once.
    try:
        # JSON has no NaN or infinity: a non-finite number (a skipped step's loss) goes as null.
        meta = wire_json(finite_or_none(msg.meta))
        head = _doc_head(msg.kind, msg.sender, msg.receiver, codec)
        tensors = ",".join([_entry_json(e) for e in entries])
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"{msg.describe()}: meta is not JSON-serialisable ({e})") from None
    return f'{head}{meta},"tensors":[{tensors}]}}'.encode(), body_tensors


@functools.lru_cache(maxsize=4096)
def _doc_head(kind: str, sender: str, receiver: str, codec: str) -> str:
    doc = {"kind": kind, "sender": sender, "receiver": receiver, "codec": codec}
    return wire_json(doc)[:-1] + ',"meta":'


def _entry_json(entry: dict[str, Any]) -> str:
    if entry["side"]:  # a lossy codec's scales or indices: different every time
        return wire_json(entry)
    key = (entry["name"], entry["codec"], entry["dtype"], tuple(entry["shape"]))
    return _plain_entry_json(key, tuple(entry["parts"]))


@functools.lru_cache(maxsize=8192)
def _plain_entry_json(key: tuple, parts: tuple[str, ...]) -> str:
    name, codec, dtype, shape = key
    entry = {"name": name, "codec": codec, "dtype": dtype, "shape": list(shape),
             "parts": list(parts), "side": {}}  # fmt: skip
    return wire_json(entry)


def checksum(data: bytes | memoryview, version: int = FORMAT_VERSION) -> int:
    """The checksum a message of format ``version`` carries over ``data``."""
    return crc32c(data) if version >= 2 else zlib.crc32(data)
