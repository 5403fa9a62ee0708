"""A message body's safetensors bytes, as pieces that view the tensors' own memory.

``safetensors.torch.save`` returns the body as one new ``bytes`` object, built by its Rust
serializer. On the machines cotune is measured on that costs ~2.5 ms for a 1.5 MiB activation
(the copy alone costs ~0.05 ms): most of a message's encoding time. The format is simple (a
little-endian u64 header length, the JSON header padded with spaces to a multiple of 8, then
the tensors' bytes), so the encoder writes it itself, as the header plus a view of each tensor,
and joins everything once together with the message's own header and checksum.

The bytes are exactly the library's: tensors ordered by dtype (safetensors' order, highest
first) then by name, the same header JSON (``tests/runtime/test_stbody.py`` compares the two
on every dtype a message may carry). Decoding still uses the library. Anything outside what
was compared (a name that needs JSON escaping, a big-endian host) falls back to it.
"""

from __future__ import annotations

import json
import struct
import sys

import torch

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
