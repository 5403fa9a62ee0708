"""Frames: what travels on a device's stream. A frame is a type byte, a JSON header and an
opaque payload (an encoded cotune ``Message``, a state, nothing). Large frames are cut into
chunks so no gRPC message exceeds ``CHUNK`` bytes; the receiver reassembles them in order.

    frame  = type:u8 | header_len:u32le | header (UTF-8 JSON) | payload
    chunk  = frame_id:u64le | index:u32le | last:u8 | piece
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cotune.buffers import Encoded
from cotune.errors import ProtocolError

CHUNK = (4 << 20) - 4096  # per gRPC message: under the 8 MiB limit the ends configure
_FRAME = struct.Struct("<BI")
_CHUNK = struct.Struct("<QIB")

# Frame types (one byte on the wire).
HELLO, WELCOME, REFUSED = 1, 2, 3  # device → server: who I am; server → device: the run / no
START = 4  # server → device: build this role on your node
REQUEST, REPLY, SEND = 5, 6, 7  # an encoded Message (either way); a reply; a one-way message
TICK, DONE = 8, 9  # a local event; its result (any control call's completion)
SNAPSHOT, RESTORE, MEASURE = 10, 11, 12  # the measurement channel
METER = 13  # device → server: compute / memory reports (out of band, in order)
ERROR = 14  # the peer's handler failed (header: message)
BYE = 15  # the run is over
READY = 16  # device → server: my node is built (header: what it holds, e.g. examples)
# server → a host of several nodes (Ray): requests for several of its roles at once (header:
# seqs, nodes, sizes, arrivals, codec; payload: the encoded messages one after another), so
# the roles' class may answer them as one batch (a cohort); one REPLY per request comes back.
BATCH = 17
NAMES = {v: k for k, v in dict(globals()).items() if k.isupper() and isinstance(v, int) and v < 64}


@dataclass
class Frame:
    """A frame. ``payload`` is bytes, a view of received bytes (a one-chunk frame is not
    copied out of its gRPC message), or an :class:`Encoded` message, which the sender joins
    into its chunks in ``send`` (one copy on the way out)."""

    type: int
    header: dict[str, Any] = field(default_factory=dict)
    payload: bytes | memoryview | Encoded = b""

    def prefix(self) -> bytes:
        """Everything before the payload (type, header length, header)."""
        head = json.dumps(self.header, separators=(",", ":")).encode()
        return _FRAME.pack(self.type, len(head)) + head

    def pieces(self) -> list[bytes | memoryview]:
        """The payload as pieces to join."""
        p = self.payload
        return p.pieces if isinstance(p, Encoded) else [p]

    def owned(self) -> Frame:
        """This frame with a payload of its own bytes, for a sender that keeps the frame
        after ``send`` returns (the tensors an ``Encoded`` payload views may change)."""
        if isinstance(self.payload, bytes):
            return self
        return Frame(self.type, self.header, bytes(self.payload))

    def encode(self) -> bytes:
        return b"".join((self.prefix(), *self.pieces()))

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Frame:
        return cls.decode_parts([memoryview(data)])

    @classmethod
    def decode_parts(cls, parts: list[memoryview]) -> Frame:
        """The frame whose bytes are ``parts`` one after another (a chunked frame's pieces,
        still in their gRPC messages): the payload is copied once, straight from the pieces."""
        first, total = parts[0], sum(len(p) for p in parts)
        if total < _FRAME.size:
            raise ProtocolError(f"frame of {total} bytes is shorter than its header")
        if len(first) < _FRAME.size:  # a header split across pieces: join them first
            return cls.decode(b"".join(parts))
        kind, n = _FRAME.unpack_from(first)
        if kind not in NAMES:
            raise ProtocolError(f"unknown frame type {kind}")
        if _FRAME.size + n > total:
            raise ProtocolError(f"frame header of {n} bytes overruns the frame")
        if _FRAME.size + n > len(first):
            return cls.decode(b"".join(parts))
        try:
            header = json.loads(bytes(first[_FRAME.size : _FRAME.size + n]))
        except ValueError as err:
            raise ProtocolError(f"frame header is not JSON: {err}") from None
        if not isinstance(header, dict):
            raise ProtocolError("frame header is not a JSON object")
        body = first[_FRAME.size + n :]
        # One piece: a view of the received message (immutable bytes), no copy.
        payload = body if len(parts) == 1 else b"".join([body, *parts[1:]])
        return cls(kind, header, payload)

    def describe(self) -> str:
        return f"{NAMES.get(self.type, self.type)} {self.header.get('kind', '')}".strip()


def frame_chunks(frame_id: int, frame: Frame) -> Iterator[bytes]:
    """A frame as gRPC messages; a small one (most) in one message, built with one copy."""
    prefix, pieces = frame.prefix(), frame.pieces()
    if len(prefix) + len(frame.payload) <= CHUNK:  # an Encoded payload knows its length
        yield b"".join((_CHUNK.pack(frame_id, 0, 1), prefix, *pieces))
    else:
        yield from chunks(frame_id, prefix, *pieces)


def chunks(frame_id: int, *data: bytes | memoryview) -> Iterator[bytes]:
    """The bytes of ``data`` (one after another) as gRPC messages of at most ``CHUNK`` payload
    bytes each; each message is built with one copy of its bytes (never the whole first)."""
    views = [memoryview(d).cast("B") for d in data]
    total = sum(len(v) for v in views)
    n = max(1, -(-total // CHUNK))
    k, at = 0, 0  # the view being cut, and where in it
    for i in range(n):
        pieces: list[bytes | memoryview] = [_CHUNK.pack(frame_id, i, int(i == n - 1))]
        want = min(CHUNK, total - i * CHUNK)
        while want:
            if at == len(views[k]):
                k, at = k + 1, 0
                continue
            take = min(want, len(views[k]) - at)
            pieces.append(views[k][at : at + take])
            at, want = at + take, want - take
        yield b"".join(pieces)


class Reassembler:
    """Collects one stream's chunks back into frames (chunks of one frame arrive in order)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._parts: dict[int, list[memoryview]] = {}
        self._sizes: dict[int, int] = {}

    def add(self, msg: bytes) -> Frame | None:
        if len(msg) < _CHUNK.size:
            raise ProtocolError(f"chunk of {len(msg)} bytes is shorter than its header")
        frame_id, index, last = _CHUNK.unpack_from(msg)
        if index == 0 and last and frame_id not in self._parts:  # one-message frame: no copy
            if len(msg) - _CHUNK.size > self.max_bytes:
                raise ProtocolError(f"frame {frame_id} exceeds {self.max_bytes} bytes")
            return Frame.decode(memoryview(msg)[_CHUNK.size :])
        parts = self._parts.setdefault(frame_id, [])
        if index != len(parts):
            raise ProtocolError(f"frame {frame_id}: chunk {index} arrived after {len(parts)}")
        size = self._sizes.get(frame_id, 0) + len(msg) - _CHUNK.size
        if size > self.max_bytes:
            raise ProtocolError(f"frame {frame_id} exceeds {self.max_bytes} bytes")
        self._sizes[frame_id] = size
        parts.append(memoryview(msg)[_CHUNK.size :])  # a view: the join below is the one copy
        if not last:
            return None
        del self._parts[frame_id], self._sizes[frame_id]
        return Frame.decode_parts(parts)
