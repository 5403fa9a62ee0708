"""The engine's record of transfers: running totals of everything, the transfers themselves only
for the most recent ones.

A run with 10^4 devices and hundreds of rounds makes millions of transfers; keeping every record
(a few hundred bytes each) would grow without bound. Paradigms only look at recent transfers (a
round's traffic: ``log[mark:]``), and totals per role are kept as running sums.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, overload

from cotune.errors import ProtocolError

if TYPE_CHECKING:
    from cotune.runtime.engine import Transfer

#: Transfers kept in full by default (older ones only count in the totals).
DEFAULT_KEEP = 1_000_000


class TransferLog:
    """Append-only, indexed by absolute position (0 = the run's first transfer); ``len`` counts
    every transfer ever appended, indexing reaches only the last ``keep`` of them."""

    def __init__(self, keep: int = DEFAULT_KEEP) -> None:
        if keep < 1:
            raise ValueError(f"TransferLog keep must be >= 1, got {keep}")
        self._recent: deque[Transfer] = deque(maxlen=keep)
        self._count = 0
        self._bytes: dict[str, list[int]] = {}  # role → [sent, received]
        self.total_bytes = 0

    def append(self, t: Transfer) -> None:
        self._recent.append(t)
        self._count += 1
        self._bytes.setdefault(t.sender, [0, 0])[0] += t.nbytes
        self._bytes.setdefault(t.receiver, [0, 0])[1] += t.nbytes
        self.total_bytes += t.nbytes

    def extend(self, ts: Iterable[Transfer]) -> None:
        for t in ts:
            self.append(t)

    def roles(self) -> list[str]:
        """Every role that sent or received something, in order of first appearance."""
        return list(self._bytes)

    def bytes_of(self, role: str) -> tuple[int, int]:
        """(sent, received) bytes of ``role`` over the whole run."""
        sent, received = self._bytes.get(role, (0, 0))
        return sent, received

    @property
    def first_kept(self) -> int:
        """Absolute index of the oldest transfer still held."""
        return self._count - len(self._recent)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Transfer]:
        return iter(self._recent)

    @overload
    def __getitem__(self, i: int) -> Transfer: ...
    @overload
    def __getitem__(self, i: slice) -> list[Transfer]: ...
    def __getitem__(self, i: int | slice) -> Transfer | list[Transfer]:
        if isinstance(i, slice):
            start, stop, step = i.indices(self._count)
            self._check(start if step > 0 else stop + 1, stop - start)
            first = self.first_kept
            return list(self._recent)[slice(start - first, stop - first, step)]
        idx = i + self._count if i < 0 else i
        if not 0 <= idx < self._count:
            raise IndexError(f"transfer {i} out of range ({self._count} transfers)")
        self._check(idx, 1)
        return self._recent[idx - self.first_kept]

    def _check(self, start: int, span: int) -> None:
        if span > 0 and start < self.first_kept:
            raise ProtocolError(
                f"transfer {start} is no longer kept: the log holds the last "
                f"{self._recent.maxlen} of {self._count} transfers (totals cover all of them)"
            )

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, TransferLog | list | tuple):
            return list(self) == list(other) and len(self) == len(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"TransferLog({self._count} transfers, last {len(self._recent)} kept)"
