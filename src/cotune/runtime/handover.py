"""Handing a message to a role in the same process: what the receiver would decode from the
wire, and the exact length of those bytes, without writing them.

The local engine's roles share one process, so writing a message's bytes only to read them back
(safetensors, checksum, parse, validation) is work no real transfer needs: for a split step's
activations it cost more than the tensors' own copy. The codec still runs (a lossy codec's
receiver sees what the wire would carry, bit for bit), the header document is built and parsed
as the wire's (the receiver's metadata went through JSON), and the length is the wire's: the
safetensors body's length depends only on its parts' names, dtypes and shapes, so it is measured
once per layout. ``tests/runtime/test_handover.py`` checks both against the wire codec.
"""

from __future__ import annotations

import json

import torch

from cotune.runtime.codecs import get_codec
from cotune.runtime.messages import (
    CRC_SIZE,
    HEADER_SIZE,
    WIRE_DTYPES,
    Message,
    body_pieces,
    wire_parts,
)

_BODY_LENGTHS: dict[tuple, int] = {}
_MAX_LAYOUTS = 4096  # a run with dynamic padding meets a few hundred; bounded all the same


def hand_over(msg: Message, codec: str = "fp32") -> tuple[Message, int]:
    """``(decode_message(encode_message(msg, codec)), len(encode_message(msg, codec)))``."""
    js, body = wire_parts(msg, codec)
    layout = tuple((k, t.dtype, tuple(t.shape)) for k, t in body.items())
    body_len = _BODY_LENGTHS.get(layout)
    if body_len is None:
        if len(_BODY_LENGTHS) >= _MAX_LAYOUTS:
            _BODY_LENGTHS.clear()
        body_len = _BODY_LENGTHS[layout] = sum(len(p) for p in body_pieces(body))
    doc = json.loads(js)
    tensors: dict[str, torch.Tensor] = {}
    for i, entry in enumerate(doc["tensors"]):
        parts = {p: body[f"{i}:{p}"] for p in entry["parts"]}
        dtype = WIRE_DTYPES[entry["dtype"]]
        t = get_codec(entry["codec"]).decode(parts, entry["side"], dtype, tuple(entry["shape"]))
        tensors[entry["name"]] = t.clone()  # the receiver owns its memory, as a decoded copy
    received = Message(doc["kind"], doc["sender"], doc["receiver"], tensors, doc["meta"])
    return received, HEADER_SIZE + len(js) + body_len + CRC_SIZE
