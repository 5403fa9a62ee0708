"""Decoding a message from its bytes (``decode_message``), checked as a peer's bytes must be:
header, lengths and checksum first, then every JSON field and tensor entry (names, codecs,
dtypes, shapes, the body's parts), so a damaged or hostile message is a ``ProtocolError``
naming what is wrong, never a crash or a tensor of the wrong size. The layout is in
``cotune.runtime.messages``.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import torch
from safetensors.torch import load as st_load

from cotune.errors import ProtocolError
from cotune.jsonsafe import is_count
from cotune.runtime.codecs import get_codec
from cotune.runtime.messages import (
    CRC_SIZE,
    HEADER_SIZE,
    HEADER_STRUCT,
    MAGIC,
    READABLE_VERSIONS,
    WIRE_DTYPES,
    Message,
    checksum,
)
from cotune.runtime.stbody import safetensors_views


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
    magic, version, flags, js_len, body_len = HEADER_STRUCT.unpack_from(view)
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
    if not isinstance(dtype_name, str) or dtype_name not in WIRE_DTYPES:
        raise ProtocolError(
            f"{at}: field 'dtype' {dtype_name!r} is not one of {sorted(WIRE_DTYPES)}"
        )
    dtype = WIRE_DTYPES[dtype_name]
    if not isinstance(shape, list) or not all(is_count(d) for d in shape):
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
