"""One progress helper for long work: a single updating line on a terminal, silent otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``Progress(total, "central")``; ``update(n, **fields)``; ``close()``.

    Quiet when ``quiet`` is set or the stream is not a terminal, so logs and CI stay clean.
    """

    def __init__(
        self, total: int, label: str, *, quiet: bool = False, stream: TextIO | None = None
    ):
        self.total = max(1, total)
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = not quiet and getattr(self.stream, "isatty", lambda: False)()
        self.done = 0
        self.fields: dict[str, str] = {}
        self._start = time.perf_counter()
        self._last_draw = 0.0

    def update(self, n: int = 1, **fields: float | str) -> None:
        self.done = min(self.total, self.done + n)
        for k, v in fields.items():
            self.fields[k] = f"{v:.4g}" if isinstance(v, float) else str(v)
        now = time.perf_counter()
        # Redraw at most ~10 times a second: drawing must never slow training.
        if self.enabled and (now - self._last_draw > 0.1 or self.done == self.total):
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        width = 24
        filled = int(width * self.done / self.total)
        elapsed = now - self._start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        extra = " ".join(f"{k}={v}" for k, v in self.fields.items())
        line = (
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}"
            f" {elapsed:5.1f}s eta {eta:5.1f}s {extra}"
        )
        self.stream.write(line[:160].ljust(80))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
