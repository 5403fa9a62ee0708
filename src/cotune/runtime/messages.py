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
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from cotune.buffers import Encoded
from cotune.errors import ProtocolError
from cotune.jsonsafe import finite_or_none
from cotune.runtime.codecs import get_codec
from cotune.runtime.stbody import safetensors_pieces, safetensors_views

MAGIC = b"COTM"
# 2: the checksum is CRC32C (hardware-accelerated: 0.09 ms for 1.5 MiB, against 0.6 ms for
# zlib's CRC32, which format 1 used; 4 of them per activation round trip). Both are read.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
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
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(js), sum(len(p) for p in body))
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


def _context(js_bytes: bytes) -> str:
    """Best-effort 'message kind from sender' for error messages about a damaged message."""
    try:
        doc = json.loads(js_bytes.decode("utf-8"))
        return f"message {doc['kind']!r} from {doc['sender']!r}: "
    except Exception:
        return "message (kind unknown): "


def _check_frame(data: bytes | memoryview) -> tuple[bytes, memoryview]:
    """Validate header, lengths and CRC; return the JSON and a view of the body."""
    view = memoryview(data).cast("B")
    n = len(view)
    if n < HEADER_SIZE:
        raise ProtocolError(f"message truncated: {n} bytes, the header alone needs {HEADER_SIZE}")
    magic, version, flags, js_len, body_len = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise ProtocolError(f"not a cotune message: magic {magic!r}, expected {MAGIC!r}")
    if version not in READABLE_VERSIONS:
        raise ProtocolError(
            f"message format version {version} is not supported (this cotune reads "
            f"{', '.join(map(str, READABLE_VERSIONS))})"
        )
    if flags != 0:
        raise ProtocolError(f"message header has unknown flags {flags:#06x}")
    expected = HEADER_SIZE + js_len + body_len + CRC_SIZE
    js = bytes(view[HEADER_SIZE : HEADER_SIZE + js_len])
    if n < expected:
        raise ProtocolError(
            f"{_context(js)}truncated: {n} bytes received, header announces {expected}"
        )
    if n > expected:
        raise ProtocolError(
            f"{_context(js)}{n - expected} trailing bytes after the end announced by the header "
            f"({expected} bytes)"
        )
    (stored,) = struct.unpack_from("<I", view, expected - CRC_SIZE)
    computed = checksum(view[: expected - CRC_SIZE], version)
    if stored != computed:
        raise ProtocolError(
            f"{_context(js)}checksum (CRC32{'C' if version >= 2 else ''}) mismatch (stored {stored:#010x}, computed {computed:#010x}): "
            "the message was corrupted"
        )
    return js, view[HEADER_SIZE + js_len : expected - CRC_SIZE]


_DOC_KEYS = {"kind", "sender", "receiver", "codec", "meta", "tensors"}
_ENTRY_KEYS = {"name", "codec", "dtype", "shape", "parts", "side"}


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} in the metadata (JSON has no NaN or infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} overflows to {value} (metadata numbers must be finite)")
    return value


def _parse_doc(js: bytes) -> dict[str, Any]:
    """The JSON header, with every top-level field checked; ``ProtocolError`` names the field."""
    try:
        doc = json.loads(
            js.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError(f"message metadata is malformed: {e}") from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"message metadata must be a JSON object, got {type(doc).__name__}")
    if set(doc) != _DOC_KEYS:
        missing, extra = sorted(_DOC_KEYS - set(doc)), sorted(set(doc) - _DOC_KEYS)
        raise ProtocolError(
            f"message metadata fields are wrong (missing {missing}, unknown {extra})"
        )
    for key in ("kind", "sender", "receiver", "codec"):
        if not isinstance(doc[key], str):
            raise ProtocolError(
                f"message metadata field {key!r} must be a string, got {doc[key]!r}"
            )
    where = f"message {doc['kind']!r} from {doc['sender']!r}"
    if not isinstance(doc["meta"], dict):
        raise ProtocolError(f"{where}: field 'meta' must be an object")
    if not isinstance(doc["tensors"], list):
        raise ProtocolError(f"{where}: field 'tensors' must be a list")
    try:
        get_codec(doc["codec"])
    except ProtocolError as e:
        raise ProtocolError(f"{where}: field 'codec': {e}") from None
    return doc


def _check_entry(where: str, i: int, entry: Any, message_codec: str) -> tuple:
    """One tensor entry of the header, checked field by field against its codec."""
    at = f"{where}: tensors[{i}]"
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise ProtocolError(f"{at}: expected fields {sorted(_ENTRY_KEYS)}, got {keys}")
    name, codec_name, dtype_name = entry["name"], entry["codec"], entry["dtype"]
    shape, part_names, side = entry["shape"], entry["parts"], entry["side"]
    if not isinstance(name, str):
        raise ProtocolError(f"{at}.name: must be a string, got {name!r}")
    at = f"{where}: tensor {name!r}"
    if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
        raise ProtocolError(f"{at}: field 'dtype' {dtype_name!r} is not one of {sorted(_DTYPES)}")
    dtype = _DTYPES[dtype_name]
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ProtocolError(f"{at}: field 'shape' must be a list of sizes >= 0, got {shape!r}")
    if not isinstance(codec_name, str):
        raise ProtocolError(f"{at}: field 'codec' must be a string, got {codec_name!r}")
    try:
        codec = get_codec(codec_name)
    except ProtocolError as e:
        raise ProtocolError(f"{at}: field 'codec': {e}") from None
    # A sender encodes a tensor with the message's codec if the codec applies to its dtype,
    # else as is: anything else means the header was altered.
    wanted = get_codec(message_codec)
    probe = torch.empty(0, dtype=dtype)
    expected = wanted if wanted.applies_to(probe) else get_codec("fp32")
    if codec.name != expected.name:
        raise ProtocolError(
            f"{at}: field 'codec' is {codec.name!r}, but a {dtype_name} tensor in a "
            f"{message_codec!r} message travels as {expected.name!r}"
        )
    if not isinstance(part_names, list) or not all(isinstance(n, str) for n in part_names):
        raise ProtocolError(f"{at}: field 'parts' must be a list of strings, got {part_names!r}")
    if codec.part_names is not None and part_names != list(codec.part_names):
        raise ProtocolError(
            f"{at}: field 'parts' is {part_names!r}, codec {codec.name!r} writes "
            f"{list(codec.part_names)}"
        )
    if not isinstance(side, dict) or (
        codec.side_keys is not None and sorted(side) != sorted(codec.side_keys)
    ):
        raise ProtocolError(
            f"{at}: field 'side' is {side!r}, codec {codec.name!r} writes keys "
            f"{sorted(codec.side_keys or [])}"
        )
    return name, codec, dtype, tuple(shape), part_names, side


def decode_message(data: bytes) -> Message:
    """Rebuild a :class:`Message` from :func:`encode_message` bytes; damage is a ``ProtocolError``.

    Every header field is checked (types, known codecs and dtypes, parts and side data as the
    codec writes them, shapes consistent with the body, finite metadata numbers): a peer may be
    buggy or hostile, and nothing it sends may crash the receiver with anything else.
    """
    js, body = _check_frame(data)
    doc = _parse_doc(js)
    kind, sender, receiver = doc["kind"], doc["sender"], doc["receiver"]
    where = f"message {kind!r} from {sender!r}"
    if not body:
        raise ProtocolError(
            f"{where}: tensor body is empty (expected at least a safetensors header)"
        )
    try:
        # Views of the received bytes; each tensor is cloned below, its only copy.
        flat = safetensors_views(body)
        if flat is None:
            flat = st_load(bytes(body))
    except Exception as e:  # safetensors raises its own error types
        raise ProtocolError(f"{where}: tensor body is not valid safetensors ({e})") from None
    tensors: dict[str, torch.Tensor] = {}
    used = 0
    for i, entry in enumerate(doc["tensors"]):
        name, codec, dtype, shape, part_names, side = _check_entry(where, i, entry, doc["codec"])
        if name in tensors:
            raise ProtocolError(f"{where}: tensor {name!r} appears twice")
        missing = [p for p in part_names if f"{i}:{p}" not in flat]
        if missing:
            raise ProtocolError(f"{where}: tensor {name!r}: body lacks part(s) {missing}")
        parts = {p: flat[f"{i}:{p}"] for p in part_names}
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
        tensors[name] = t
    if used != len(flat):
        raise ProtocolError(f"{where}: body holds {len(flat)} parts, header lists {used}")
    try:
        return Message(kind, sender, receiver, tensors, doc["meta"])
    except ProtocolError as e:
        raise ProtocolError(f"received {e}") from None
