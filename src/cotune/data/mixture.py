"""Domain mixtures: training (and evaluation) data drawn in chosen proportions per domain.

A mixture maps domain names (``TaskData.group_names``: a causal LM's domains, or a classifier's
labels) to non-negative weights; unlisted domains get weight 0. Every shard (the server's pooled
data is the devices' shards together) is resampled to its own size so that each domain it holds
gets the share its weight asks for among the domains it holds (a device cannot train on data it
does not have). Draws are seeded full passes over each domain's examples, so a domain is
repeated only when its share exceeds what the shard holds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from cotune.errors import ConfigError

log = logging.getLogger(__name__)


def mixture_weights(
    mixture: Mapping[str, float], names: Sequence[str] | None, field: str
) -> list[float]:
    """Weights per group id, normalized to sum 1, from a ``{domain name: weight}`` mapping."""
    if not names:
        raise ConfigError(
            f"{field}: this dataset has no domains or labels to mix (its examples carry no group)"
        )
    unknown = sorted(set(mixture) - set(names))
    if unknown:
        raise ConfigError(
            f"{field}: unknown domain(s) {unknown}; the data's domains: {list(names)}"
        )
    bad = {k: v for k, v in mixture.items() if not v >= 0}
    if bad:
        raise ConfigError(f"{field}: weights must be >= 0, got {bad}")
    total = float(sum(mixture.values()))
    if total <= 0:
        raise ConfigError(f"{field}: the weights sum to 0; give at least one domain a weight")
    return [float(mixture.get(n, 0.0)) / total for n in names]


def quotas(n: int, weights: Sequence[float]) -> list[int]:
    """``n`` split in proportion to ``weights`` (largest remainder; sums to ``n``)."""
    w = np.asarray(weights, dtype=float)
    raw = n * w / w.sum()
    out = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - out), kind="stable")[: n - int(out.sum())]:
        out[i] += 1
    return out.tolist()


def resample(
    indices: Sequence[int], groups: Sequence[int | None], weights: Sequence[float], seed: int
) -> list[int]:
    """``indices`` resampled to the same count with domain shares ∝ ``weights`` (restricted to the
    domains present). Returned unchanged when none of its domains has weight."""
    by_group: dict[int, list[int]] = {}
    for i in indices:
        g = groups[i]
        if g is not None:
            by_group.setdefault(int(g), []).append(i)
    present = sorted(by_group)
    w = [weights[g] if g < len(weights) else 0.0 for g in present]
    if not indices or sum(w) <= 0:
        return list(indices)
    rng = np.random.default_rng(seed)
    out: list[int] = []
    for g, q in zip(present, quotas(len(indices), w), strict=True):
        pool = by_group[g]
        reps = -(-q // len(pool)) if q else 0
        draws = np.concatenate([rng.permutation(len(pool)) for _ in range(reps)]) if reps else []
        out += [pool[j] for j in draws[:q]]
    return out


def mix_parts(
    parts: list[list[int]],
    groups: Sequence[int | None],
    mixture: Mapping[str, float],
    names: Sequence[str] | None,
    seed: int,
) -> list[list[int]]:
    """Every device's shard resampled to ``data.mixture``."""
    weights = mixture_weights(mixture, names, "data.mixture")
    out, untouched = [], []
    for i, part in enumerate(parts):
        mixed = resample(part, groups, weights, seed * 7919 + i)
        if part and all(groups[j] is None or weights[groups[j]] == 0 for j in part):
            untouched.append(i)
        out.append(mixed)
    if untouched:
        log.warning(
            "data.mixture gives every domain of device(s) %s weight 0; they train on their own "
            "data unchanged (a device holds no other data)",
            untouched,
        )
    return out


def mix_examples(
    examples: Sequence[object],
    mixture: Mapping[str, float],
    names: Sequence[str] | None,
    seed: int,
    field: str = "eval.mixture",
) -> list[object]:
    """A list of examples (each with ``.group``) resampled to a mixture, in a seeded order (so a
    cut to the first N keeps the proportions)."""
    weights = mixture_weights(mixture, names, field)
    groups = [getattr(e, "group", None) for e in examples]
    chosen = resample(range(len(examples)), groups, weights, seed)
    if not any(groups[i] is not None and weights[groups[i]] > 0 for i in chosen):
        raise ConfigError(f"{field}: none of its domains occurs in the evaluation data")
    order = np.random.default_rng(seed).permutation(len(chosen))
    return [examples[chosen[i]] for i in order]
