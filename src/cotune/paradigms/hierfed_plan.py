"""HierFedLoRA's planning: near-IID device groups and the per-group (τ_g, D_g) controller.

Kept apart from the driver (``hierfed.py``) because both are pure functions of the partition
and the fleet: they are unit-tested without training anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from cotune.errors import ConfigError


def label_histograms(parts: Sequence[Sequence[int]], labels: Sequence[int | None]) -> np.ndarray:
    """``[devices, classes]`` label counts; unlabelled data (causal LM) is one class."""
    if not labels or any(y is None for y in labels):
        return np.array([[len(p)] for p in parts], dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    classes = int(y.max()) + 1
    return np.stack([np.bincount(y[list(p)], minlength=classes) for p in parts]).astype(np.float64)


def _tv(counts: np.ndarray, glob: np.ndarray) -> float:
    """Total-variation distance of a count vector's mix from the global mix (0 = same mix)."""
    total = counts.sum()
    return 0.5 * float(np.abs(counts / total - glob).sum()) if total > 0 else 1.0


def group_divergence(groups: Sequence[Sequence[int]], hists: np.ndarray) -> list[float]:
    glob = hists.sum(0) / hists.sum()
    return [_tv(hists[list(g)].sum(0), glob) for g in groups]


def group_devices(hists: np.ndarray, num_groups: int, how: str, seed: int) -> list[list[int]]:
    """Split devices into ``num_groups`` non-empty groups.

    ``random``: a seeded shuffle cut into equal parts. ``balanced``: the largest ``num_groups``
    shards seed one group each; every other device (largest first, since big shards move a mix
    the most) joins the group, among those below ``ceil(n / G)`` members, whose divergence from
    the global label mix it lowers the most (ties: the group with fewer examples); then
    pairwise swaps between groups while they lower the groups' summed divergence.
    """
    n = hists.shape[0]
    if num_groups > n:
        raise ConfigError(
            f"paradigm.options.num_groups: {num_groups} groups for {n} devices would leave a "
            f"group empty (use num_groups <= devices.count = {n})"
        )
    if how == "random":
        perm = np.random.default_rng([seed, 0x6E0]).permutation(n)
        return [sorted(int(i) for i in chunk) for chunk in np.array_split(perm, num_groups)]
    glob = hists.sum(0) / hists.sum()
    order = sorted(range(n), key=lambda i: (-hists[i].sum(), i))
    cap = math.ceil(n / num_groups)
    groups: list[list[int]] = [[i] for i in order[:num_groups]]
    sums = [hists[i].copy() for i in order[:num_groups]]
    for i in order[num_groups:]:
        open_groups = [g for g in range(num_groups) if len(groups[g]) < cap]

        def gain(g: int, i: int = i) -> tuple[float, float]:
            delta = _tv(sums[g] + hists[i], glob) - _tv(sums[g], glob)
            return (delta, float(sums[g].sum()))

        best = min(open_groups, key=gain)
        groups[best].append(i)
        sums[best] += hists[i]
    _swap_refine(groups, sums, hists, glob)
    return [sorted(g) for g in groups]


def _swap_refine(
    groups: list[list[int]], sums: list[np.ndarray], hists: np.ndarray, glob: np.ndarray
) -> None:
    """Swap devices between groups while a swap lowers the two groups' summed divergence
    (greedy order can strand a skewed device last); group sizes stay as they are."""
    for _ in range(20):  # passes; each accepted swap strictly lowers the total
        improved = False
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                before = _tv(sums[a], glob) + _tv(sums[b], glob)
                for x in list(groups[a]):
                    for y in list(groups[b]):
                        sa, sb = sums[a] - hists[x] + hists[y], sums[b] - hists[y] + hists[x]
                        after = _tv(sa, glob) + _tv(sb, glob)
                        if after < before - 1e-12:
                            groups[a][groups[a].index(x)] = y
                            groups[b][groups[b].index(y)] = x
                            sums[a], sums[b], before = sa, sb, after
                            improved = True
                            break
        if not improved:
            return


@dataclass
class GroupPlan:
    members: list[int]  # device indices
    tau: int  # group rounds per cloud round
    depth: int  # trained blocks, counted from the output
    est_round_s: float  # estimated simulated seconds of one cloud round for this group
    divergence: float = 0.0  # TV distance of the group's label mix from the global one

    def as_dict(self) -> dict:
        return asdict(self)


def plan_groups(
    groups: list[list[int]],
    group_round_s: Callable[[list[int], int], float],
    *,
    controller: str,
    tau: int,
    depth: int,
    min_depth: int,
) -> list[GroupPlan]:
    """Choose (τ_g, D_g) per group.

    ``fixed``: every group gets ``tau`` and ``depth``. ``balanced`` (our reconstruction of the
    paper's joint optimisation, whose formulation was not available): the budget ``T*`` is the
    mean, over groups, of one group round at the deepest depth. Each group takes the deepest
    ``D`` in ``[min_depth, depth]`` whose group round fits ``T*`` (``min_depth`` if none does),
    then as many group rounds ``τ ≤ tau`` as still fit (at least 1): slow groups train
    shallower, fast groups aggregate more often, and every group finishes near ``T*``.
    ``group_round_s(members, D)`` estimates one group round (slowest member's local training
    plus its adapter download and upload).
    """
    if controller == "fixed":
        return [GroupPlan(g, tau, depth, tau * group_round_s(g, depth)) for g in groups]
    budget = float(np.mean([group_round_s(g, depth) for g in groups]))
    plans = []
    for g in groups:
        d = next(
            (d for d in range(depth, min_depth - 1, -1) if group_round_s(g, d) <= budget * 1.0001),
            min_depth,
        )
        t = group_round_s(g, d)
        k = max(1, min(tau, int(budget * 1.0001 // t))) if t > 0 else tau
        plans.append(GroupPlan(g, k, d, k * t))
    return plans
