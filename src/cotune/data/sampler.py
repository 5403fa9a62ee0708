"""``BatchSampler``: seeded shuffled epochs over one device's shard, resumable from a state dict."""

from __future__ import annotations

from typing import Any

import numpy as np

from cotune.errors import DataError


class BatchSampler:
    """Yields index batches of ``range(n)``; every index once per epoch, a new order each epoch.

    The last batch of an epoch may be short (no example is dropped or repeated). A shard smaller
    than ``batch_size`` yields the whole shard every time. The order of epoch ``e`` depends only
    on ``(seed, e)``, so the state is just (epoch, position) and resuming is exact.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < 1:
            raise DataError("BatchSampler needs at least one example (the shard is empty)")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.n // self.batch_size)

    def next_indices(self) -> list[int]:
        if self.pos >= self.n:
            self.epoch += 1
            self.pos = 0
            self._order = self._epoch_order(self.epoch)
        batch = self._order[self.pos : self.pos + self.batch_size]
        self.pos += len(batch)
        return [int(i) for i in batch]

    def state_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "epoch": self.epoch,
            "pos": self.pos,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("n", "batch_size", "seed"):
            if state.get(key) != getattr(self, key):
                raise DataError(
                    f"sampler state was saved with {key}={state.get(key)!r}, this sampler has {getattr(self, key)!r}"
                )
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._epoch_order(self.epoch)
