"""Bytes in pieces, joined late. Kept free of torch: the deploy layer's frames use it in
processes (a Ray host) that must set their threads' environment before torch is imported."""

from __future__ import annotations


class Encoded:
    """An encoded message before its pieces are joined: ``pieces`` (header, JSON, views of the
    tensors' memory, checksum) and their total length. A sender that frames it joins the pieces
    once, together with its own prefix (``deploy/frames.py``), so a tensor is copied once on its
    way out. The views see the tensors as they are when joined: join before they can change."""

    __slots__ = ("pieces", "nbytes")

    def __init__(self, pieces: list[bytes | memoryview]) -> None:
        self.pieces = pieces
        self.nbytes = sum(len(p) for p in pieces)

    def __len__(self) -> int:
        return self.nbytes

    def __bytes__(self) -> bytes:
        return b"".join(self.pieces)
