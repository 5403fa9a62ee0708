"""Messages and their real encoded form.

Wire layout (all integers little-endian)::

    header  20 bytes  magic b"COTM" | version u16 | flags u16 (0) | json_len u32 | body_len u64
    json    json_len  UTF-8 JSON: kind, sender, receiver, meta, codec, tensors[{name, codec, dtype,
                      shape, parts, side}]
    body    body_len  safetensors bytes holding every codec part under the key "<index>:<part>"
    crc     4 bytes   CRC32 of header + json + body

Keys in the body are positional (not tensor names) so any tensor name is allowed and the JSON
says, in order, which parts rebuild which tensor.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from cotune.errors import ProtocolError
from cotune.runtime.codecs import get_codec

MAGIC = b"COTM"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sHHIQ")
HEADER_SIZE = _HEADER.size  # 20
CRC_SIZE = 4
_KIND_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_DTYPES = {
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
        if str(t.dtype).removeprefix("torch.") not in _DTYPES:
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


def encode_message(msg: Message, codec: str = "fp32") -> bytes:
    """The bytes that travel for ``msg``: header + JSON + safetensors body + CRC32."""
    entries, body_tensors = _wire_tensors(msg, codec)
    doc = {
        "kind": msg.kind,
        "sender": msg.sender,
        "receiver": msg.receiver,
        "codec": codec,
        "meta": msg.meta,
        "tensors": entries,
    }
    try:
        js = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"{msg.describe()}: meta is not JSON-serialisable ({e})") from None
    body = st_save(body_tensors)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(js), len(body))
    payload = header + js + body
    return payload + struct.pack("<I", zlib.crc32(payload))


def _context(js_bytes: bytes) -> str:
    """Best-effort 'message kind from sender' for error messages about a damaged message."""
    try:
        doc = json.loads(js_bytes.decode("utf-8"))
        return f"message {doc['kind']!r} from {doc['sender']!r}: "
    except Exception:
        return "message (kind unknown): "


def _check_frame(data: bytes) -> tuple[bytes, bytes]:
    """Validate header, lengths and CRC; return the JSON and body slices."""
    n = len(data)
    if n < HEADER_SIZE:
        raise ProtocolError(f"message truncated: {n} bytes, the header alone needs {HEADER_SIZE}")
    magic, version, flags, js_len, body_len = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"not a cotune message: magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise ProtocolError(
            f"message format version {version} is not supported (this cotune reads {FORMAT_VERSION})"
        )
    if flags != 0:
        raise ProtocolError(f"message header has unknown flags {flags:#06x}")
    expected = HEADER_SIZE + js_len + body_len + CRC_SIZE
    js = data[HEADER_SIZE : HEADER_SIZE + js_len]
    if n < expected:
        raise ProtocolError(
            f"{_context(js)}truncated: {n} bytes received, header announces {expected}"
        )
    if n > expected:
        raise ProtocolError(
            f"{_context(js)}{n - expected} trailing bytes after the end announced by the header "
            f"({expected} bytes)"
        )
    (stored,) = struct.unpack_from("<I", data, expected - CRC_SIZE)
    computed = zlib.crc32(memoryview(data)[: expected - CRC_SIZE])
    if stored != computed:
        raise ProtocolError(
            f"{_context(js)}CRC32 mismatch (stored {stored:#010x}, computed {computed:#010x}): "
            "the message was corrupted"
        )
    return js, data[HEADER_SIZE + js_len : expected - CRC_SIZE]


def decode_message(data: bytes) -> Message:
    """Rebuild a :class:`Message` from :func:`encode_message` bytes; damage is a ``ProtocolError``."""
    data = bytes(data)
    js, body = _check_frame(data)
    try:
        doc = json.loads(js.decode("utf-8"))
        kind, sender, receiver = doc["kind"], doc["sender"], doc["receiver"]
        meta, entries = doc["meta"], doc["tensors"]
        if not all(isinstance(x, str) for x in (kind, sender, receiver)):
            raise TypeError("kind/sender/receiver must be strings")
        if not isinstance(meta, dict) or not isinstance(entries, list):
            raise TypeError("meta must be an object and tensors a list")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ProtocolError(f"message metadata is malformed: {e}") from None
    where = f"message {kind!r} from {sender!r}"
    if not body:
        raise ProtocolError(
            f"{where}: tensor body is empty (expected at least a safetensors header)"
        )
    try:
        flat = st_load(body)
    except Exception as e:  # safetensors raises its own error types
        raise ProtocolError(f"{where}: tensor body is not valid safetensors ({e})") from None
    tensors: dict[str, torch.Tensor] = {}
    used = 0
    for i, entry in enumerate(entries):
        try:
            name, dtype_name = entry["name"], entry["dtype"]
            shape, part_names, side = tuple(entry["shape"]), entry["parts"], entry["side"]
            codec = get_codec(entry["codec"])
            dtype = _DTYPES[dtype_name]
            parts = {p: flat[f"{i}:{p}"] for p in part_names}
        except ProtocolError as e:
            raise ProtocolError(f"{where}: {e}") from None
        except (KeyError, TypeError) as e:
            raise ProtocolError(
                f"{where}: tensor entry {i} is malformed or incomplete ({e})"
            ) from None
        used += len(parts)
        # Clone: safetensors returns views over the immutable input bytes; the receiver must
        # own writable memory independent of anything else.
        try:
            t = codec.decode(parts, side, dtype, shape).clone()
        except Exception as e:  # a codec's own failure on damaged parts
            raise ProtocolError(
                f"{where}: codec {codec.name!r} cannot decode {name!r} ({e})"
            ) from None
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ProtocolError(
                f"{where}: tensor {name!r} decoded as {t.dtype}{list(t.shape)}, "
                f"header says {dtype}{list(shape)}"
            )
        if name in tensors:
            raise ProtocolError(f"{where}: tensor {name!r} appears twice")
        tensors[name] = t
    if used != len(flat):
        raise ProtocolError(f"{where}: body holds {len(flat)} parts, header lists {used}")
    try:
        return Message(kind, sender, receiver, tensors, meta)
    except ProtocolError as e:
        raise ProtocolError(f"received {e}") from None
