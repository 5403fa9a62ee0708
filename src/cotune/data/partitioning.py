"""Split training examples across devices: iid, Dirichlet label skew, label shards, quantity skew.

``partition`` returns one list of example indices per device; every index appears exactly once
and the result depends only on the inputs and the seed. ``partition_summary`` measures what a
scheme did (sizes, label counts, distance of each device's label mix from the global one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cotune.config import PartitionSection
from cotune.errors import DataError

MAX_DIRICHLET_TRIES = 200
_LABELLED = ("dirichlet", "shards")


def partition(
    labels: Sequence[int | None], num_devices: int, cfg: PartitionSection, seed: int
) -> list[list[int]]:
    """Assign ``range(len(labels))`` to ``num_devices`` devices by ``cfg.scheme``.

    ``labels`` holds one class id per example, or ``None`` per example for causal LM
    (then only ``iid`` and ``quantity`` apply).
    """
    if labels is None:
        raise DataError("partition needs one entry per example: for causal LM pass [None] * n")
    n = len(labels)
    if num_devices < 1:
        raise DataError(f"num_devices must be >= 1, got {num_devices}")
    if n < num_devices * cfg.min_size:
        raise DataError(
            f"cannot give {num_devices} devices at least {cfg.min_size} example(s) each from {n} "
            f"training examples: use fewer devices, a smaller partition.min_size or more data"
        )
    unlabelled = any(y is None for y in labels)
    if unlabelled and cfg.scheme in _LABELLED:
        raise DataError(
            f"partition.scheme={cfg.scheme!r} needs class labels; for causal LM use 'iid' or 'quantity'"
        )
    rng = np.random.default_rng([seed, 0xD15C])
    if cfg.scheme == "iid":
        parts = [p.tolist() for p in np.array_split(rng.permutation(n), num_devices)]
    elif cfg.scheme == "quantity":
        parts = _quantity(n, num_devices, cfg, rng)
    elif cfg.scheme == "dirichlet":
        parts = _dirichlet(np.asarray(labels, dtype=np.int64), num_devices, cfg, rng)
    elif cfg.scheme == "shards":
        parts = _shards(np.asarray(labels, dtype=np.int64), num_devices, cfg, rng)
    else:  # config validation makes this unreachable; kept for direct callers
        raise DataError(
            f"unknown partition scheme {cfg.scheme!r} (schemes: iid, dirichlet, shards, quantity)"
        )
    _check(parts, n, cfg)
    return parts


def _check(parts: list[list[int]], n: int, cfg: PartitionSection) -> None:
    small = [d for d, p in enumerate(parts) if len(p) < cfg.min_size]
    if small:
        raise DataError(
            f"partition.scheme={cfg.scheme!r} left device {small[0]} with {len(parts[small[0]])} "
            f"example(s) (< min_size {cfg.min_size}; {len(small)} such device(s)): use fewer devices "
            f"or more data"
        )
    assert sorted(i for p in parts for i in p) == list(range(n)), (
        "partition lost or duplicated examples"
    )


def _quantity(n: int, k: int, cfg: PartitionSection, rng: np.random.Generator) -> list[list[int]]:
    # Power-law sizes: the device of rank r gets weight r^-power; ranks are shuffled over devices.
    weights = np.arange(1, k + 1, dtype=np.float64) ** -cfg.power
    weights = weights[rng.permutation(k)]
    spare = n - k * cfg.min_size
    raw = weights / weights.sum() * spare
    sizes = np.floor(raw).astype(np.int64)
    # Largest remainders get the leftover examples, so sizes sum to n exactly.
    sizes[np.argsort(-(raw - sizes), kind="stable")[: spare - int(sizes.sum())]] += 1
    sizes += cfg.min_size
    cuts = np.cumsum(sizes)[:-1]
    return [p.tolist() for p in np.split(rng.permutation(n), cuts)]


def _dirichlet(
    labels: np.ndarray, k: int, cfg: PartitionSection, rng: np.random.Generator
) -> list[list[int]]:
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    smallest = 0
    for _ in range(MAX_DIRICHLET_TRIES):
        parts: list[list[int]] = [[] for _ in range(k)]
        for members in by_class:
            members = rng.permutation(members)
            # Each class is spread over devices in Dirichlet(alpha) proportions.
            props = rng.dirichlet(np.full(k, cfg.alpha))
            cuts = (np.cumsum(props)[:-1] * len(members)).astype(np.int64)
            for d, chunk in enumerate(np.split(members, cuts)):
                parts[d].extend(chunk.tolist())
        smallest = min(len(p) for p in parts)
        if smallest >= cfg.min_size:
            return [sorted(p) for p in parts]
    raise DataError(
        f"dirichlet partition (alpha={cfg.alpha}) could not give all {k} devices at least "
        f"{cfg.min_size} example(s) in {MAX_DIRICHLET_TRIES} tries (smallest device got {smallest}): "
        f"raise partition.alpha, lower partition.min_size or use fewer devices"
    )


def _shards(
    labels: np.ndarray, k: int, cfg: PartitionSection, rng: np.random.Generator
) -> list[list[int]]:
    # McMahan et al.: sort by label, cut into k * classes_per_device equal shards, deal each
    # device classes_per_device random shards. A shard can straddle two labels.
    num_shards = k * cfg.classes_per_device
    if num_shards > len(labels):
        raise DataError(
            f"shards partition needs {num_shards} shards ({k} devices x classes_per_device="
            f"{cfg.classes_per_device}) but there are only {len(labels)} examples"
        )
    order = np.lexsort((rng.random(len(labels)), labels))  # by label, random within a label
    shards = np.array_split(order, num_shards)
    deal = rng.permutation(num_shards).reshape(k, cfg.classes_per_device)
    return [sorted(int(i) for s in row for i in shards[s]) for row in deal]


def partition_summary(
    parts: list[list[int]], labels: Sequence[int | None], label_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Per-device sizes and label counts, and the mean total-variation distance between each
    device's label distribution and the global one (0 = identical mix, 1 = disjoint labels)."""
    sizes = [len(p) for p in parts]
    out: dict[str, Any] = {
        "num_devices": len(parts),
        "num_examples": int(sum(sizes)),
        "sizes": sizes,
        "min_size": min(sizes) if sizes else 0,
        "max_size": max(sizes) if sizes else 0,
        "mean_size": float(np.mean(sizes)) if sizes else 0.0,
        "label_names": list(label_names) if label_names is not None else None,
        "label_counts": None,
        "divergence": None,
        "mean_divergence": None,
    }
    if not labels or any(y is None for y in labels):
        return out
    y = np.asarray(labels, dtype=np.int64)
    num_classes = max(int(y.max()) + 1, len(label_names or []))
    counts = np.stack([np.bincount(y[p], minlength=num_classes) for p in parts])
    glob = np.bincount(y, minlength=num_classes) / len(y)
    mix = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    tv = 0.5 * np.abs(mix - glob).sum(axis=1)
    out["label_counts"] = counts.tolist()
    out["divergence"] = [round(float(t), 4) for t in tv]
    out["mean_divergence"] = round(float(tv.mean()), 4)
    return out


def format_partition_table(summary: dict[str, Any], max_rows: int = 20, top_labels: int = 3) -> str:
    """A plain-text table: one row per device (the first ``max_rows``), then the totals."""
    names = summary.get("label_names")
    counts = summary.get("label_counts")
    lines = [f"{'device':>6}  {'size':>7}  {'TV':>6}  top labels"]
    for d, size in enumerate(summary["sizes"][:max_rows]):
        tv, top = "-", ""
        if counts is not None:
            tv = f"{summary['divergence'][d]:.3f}"
            row = np.asarray(counts[d])
            best = [int(c) for c in np.argsort(-row, kind="stable")[:top_labels] if row[c] > 0]
            top = ", ".join(f"{names[c] if names else c}:{row[c]}" for c in best)
        lines.append(f"{d:>6}  {size:>7}  {tv:>6}  {top}")
    if len(summary["sizes"]) > max_rows:
        lines.append(f"{'...':>6}  ({len(summary['sizes']) - max_rows} more devices)")
    tail = (
        f"{summary['num_devices']} devices, {summary['num_examples']} examples, size "
        f"min {summary['min_size']} / mean {summary['mean_size']:.1f} / max {summary['max_size']}"
    )
    if summary.get("mean_divergence") is not None:
        tail += f"; mean TV distance from the global label mix {summary['mean_divergence']:.3f}"
    return "\n".join([*lines, tail])
