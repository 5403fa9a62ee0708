"""A message body's safetensors bytes, as pieces that view the tensors' own memory.

``safetensors.torch.save`` returns the body as one new ``bytes`` object, built by its Rust
serializer. On the machines cotune is measured on that costs ~2.5 ms for a 1.5 MiB activation
(the copy alone costs ~0.05 ms): most of a message's encoding time. The format is simple (a
little-endian u64 header length, the JSON header padded with spaces to a multiple of 8, then
the tensors' bytes), so the encoder writes it itself, as the header plus a view of each tensor,
and joins everything once together with the message's own header and checksum.

The bytes are exactly the library's: tensors ordered by dtype (safetensors' order, highest
first) then by name, the same header JSON (``tests/runtime/test_stbody.py`` compares the two
on every dtype a message may carry). Anything outside what was compared (a name that needs
JSON escaping, a big-endian host) falls back to it.

Reading (``safetensors_views``) is the same format backwards: the library's ``load`` copies
every tensor out of the body into a new ``bytes`` and the receiver then copies it again into
memory it owns; here the tensors are views of the received bytes, checked as strictly as the
library checks them (header length, JSON, dtypes, shapes, offsets covering the data exactly),
and the receiver's own copy is the only one.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import warnings

import torch

from cotune.jsonsafe import is_count

# safetensors' dtype order (its Rust enum), lowest first: its files list the highest first.
_ORDER = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
}
_RANK = {dtype: i for i, dtype in enumerate(_ORDER)}
_U64 = struct.Struct("<Q")


def _plain(name: str) -> bool:
    # Printable ASCII without quote or backslash: JSON writes it as it is, in any library.
    return name.isascii() and name.isprintable() and '"' not in name and "\\" not in name


def safetensors_pieces(tensors: dict[str, torch.Tensor]) -> list[bytes | memoryview] | None:
    """``safetensors.torch.save(tensors)`` as pieces to join (None: use the library). The
    tensors must be contiguous and on the CPU, as a message body's parts are."""
    if sys.byteorder != "little":
        return None
    if any(t.dtype not in _RANK or not _plain(k) for k, t in tensors.items()):
        return None
    ordered = sorted(tensors.items(), key=lambda kv: (-_RANK[kv[1].dtype], kv[0]))
    header: dict[str, dict] = {}
    data: list[bytes | memoryview] = []
    offset = 0
    for name, t in ordered:
        raw = t.detach().reshape(-1).view(torch.uint8)
        n = raw.numel()
        header[name] = {
            "dtype": _ORDER[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        data.append(memoryview(raw.numpy()))
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return [_U64.pack(len(head)), head, *data]


_BY_NAME = {name: dtype for dtype, name in _ORDER.items()}
_MAX_HEADER = 100_000_000  # the library's limit on the JSON header


class BodyError(ValueError):
    """A safetensors body that is not well formed (the message names what)."""


def safetensors_views(body: bytes | memoryview) -> dict[str, torch.Tensor] | None:
    """The tensors of a safetensors ``body`` as read-only views of it (the caller copies what
    it keeps); None on a big-endian host (use the library). ``BodyError`` says what is wrong
    with a malformed body."""
    if sys.byteorder != "little":
        return None
    view = memoryview(body).cast("B")
    n = len(view)
    if n < 8:
        raise BodyError(f"{n} bytes: too short for the header length")
    (head_len,) = _U64.unpack_from(view)
    if head_len > _MAX_HEADER or 8 + head_len > n:
        raise BodyError(f"header length {head_len} does not fit in {n} bytes")
    try:
        header = json.loads(bytes(view[8 : 8 + head_len]))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BodyError(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise BodyError("header is not a JSON object")
    header.pop("__metadata__", None)
    data = view[8 + head_len :]
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise BodyError(f"entry {name!r} is not {{dtype, shape, data_offsets}}")
        dtype = _BY_NAME.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise BodyError(f"entry {name!r}: dtype {entry['dtype']!r} is not supported")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list) or not all(is_count(d) for d in shape):
            raise BodyError(f"entry {name!r}: shape {shape!r} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_count, offsets))):
            raise BodyError(f"entry {name!r}: data_offsets {offsets!r} are not two offsets")
        start, end = offsets
        want = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if end < start or end - start != want:
            raise BodyError(f"entry {name!r}: offsets {offsets} hold {end - start} bytes, "
                            f"{entry['dtype']}{shape} needs {want}")  # fmt: skip
        spans.append((start, end, name, dtype, shape))
    spans.sort()
    at = 0
    for start, end, name, _, _ in spans:
        if start != at:
            raise BodyError(f"entry {name!r} starts at {start}, the data before ends at {at}")
        at = end
    if at != len(data):
        raise BodyError(f"the entries cover {at} data bytes, the body holds {len(data)}")
    out = {}
    with warnings.catch_warnings():
        # A view of immutable bytes: torch warns that it is not writable; nothing writes it.
        warnings.simplefilter("ignore", UserWarning)
        for start, end, name, dtype, shape in spans:
            if end == start:
                out[name] = torch.empty(shape, dtype=dtype)
            else:
                flat = torch.frombuffer(data[start:end], dtype=torch.uint8)
                out[name] = flat.view(dtype).reshape(shape)
    return out
