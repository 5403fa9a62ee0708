"""Progress of long work: a tqdm bar on a terminal, plain log lines elsewhere, nothing if quiet.

On a terminal the bar redraws in place (tqdm clears what the previous line left), shows the
phase (training, evaluating, aggregating, ...), steps or rounds done, elapsed time and an ETA
smoothed over recent updates (so the first step's one-off costs do not inflate it), and the
latest metrics labelled by where they come from (``train_loss``, ``eval_accuracy``). Piped or
logged output gets one plain line every ``every_s`` seconds and a last one at the end, so a CI
log or ``nohup`` shows the run moving. ``quiet`` prints nothing (the CLI still prints the result).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _columns(stream: TextIO) -> int:
    import os

    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Progress:
    """``Progress(total, "central demo", unit="step")``; ``update(n, **fields)``;
    ``phase("evaluating")``; ``close()`` (or use it as a context manager)."""

    def __init__(
        self,
        total: int,
        label: str,
        *,
        quiet: bool = False,
        stream: TextIO | None = None,
        unit: str = "step",
        every_s: float = 30.0,
    ) -> None:
        self.total = max(1, total)
        self.label, self.unit, self.every_s = label, unit, every_s
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = not quiet and bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self.fields: dict[str, str] = {}
        self.current = "training"
        self._start = self._last_line = time.perf_counter()
        self._bar: Any = None
        if self.tty:
            from tqdm import tqdm

            # A terminal that reports no width (a bare pseudo-terminal) gets 160 columns.
            sized = _columns(self.stream) > 0
            self._bar = tqdm(total=self.total, desc=self._desc(), unit=unit, file=self.stream,
                             dynamic_ncols=sized, ncols=None if sized else 160, leave=True,
                             smoothing=0.3)  # fmt: skip

    def _desc(self) -> str:
        return f"{self.label} · {self.current}"

    def update(self, n: int = 1, **fields: Any) -> None:
        """``n`` more steps (or rounds) done; ``fields``: metrics to show, by name."""
        self.done = min(self.total, self.done + n)
        self.fields.update({k: _fmt(v) for k, v in fields.items() if v is not None})
        if self._bar is not None:
            self._bar.set_postfix(self.fields, refresh=False)
            if n:
                self._bar.update(n)
            else:
                self._bar.refresh()
        elif not self.quiet and time.perf_counter() - self._last_line >= self.every_s:
            self._line()

    def phase(self, name: str) -> None:
        """What the run is doing now (training, evaluating, aggregating, round k/N, ...)."""
        self.current = name
        if self._bar is not None:
            self._bar.set_description(self._desc())

    def _line(self) -> None:
        now = time.perf_counter()
        self._last_line = now
        elapsed = now - self._start
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        extra = " ".join(f"{k}={v}" for k, v in self.fields.items())
        self.stream.write(
            f"{self.label}: {self.current}, {self.done}/{self.total} {self.unit}s, "
            f"{elapsed:.0f}s elapsed, eta {eta:.0f}s {extra}".rstrip()
            + "\n"
        )
        self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif not self.quiet:
            self.current = "done"
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def eval_fields(ev: dict[str, float]) -> dict[str, float]:
    """An evaluation's headline metrics, labelled as evaluation (not the training loss)."""
    return {
        f"eval_{k}": v
        for k, v in ev.items()
        if k in ("accuracy", "exact_match", "perplexity", "loss")
    }
