"""TwoNN intrinsic-dimension estimator (Facco, d'Errico, Rodriguez & Laio, Sci. Rep. 2017).

For each point, `μ = r₂ / r₁` (distances to its 2nd and 1st nearest neighbour). On a manifold of
intrinsic dimension `d` with locally uniform density, `μ` follows a Pareto law `P(μ) = d μ^{−d−1}`,
so `d` is estimated either by maximum likelihood, `d̂ = N / Σ log μᵢ`, or by the paper's linear
fit of `−log(1 − F(μ))` against `log μ` through the origin, discarding the largest 10% of `μ`.

The MLE needs only `(Σ log μᵢ, N)`: devices can compute these sufficient statistics on their own
points and a server adds them up (`TwoNNStats.combine`) without seeing any raw data.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from cotune.errors import AdapterError


def log_ratios(points: torch.Tensor) -> torch.Tensor:
    """`log(r₂/r₁)` for every point of `points` [N, D] whose neighbours are distinct (float64)."""
    if points.dim() != 2 or points.shape[0] < 3:
        raise AdapterError(
            f"TwoNN needs an [N, D] tensor with N >= 3 points, got shape {tuple(points.shape)}"
        )
    x = points.detach().to(torch.float64)
    dist = torch.cdist(x, x)
    dist.fill_diagonal_(float("inf"))
    r = torch.topk(dist, 2, dim=1, largest=False).values
    # Duplicate points (r₁ = 0) carry no information about the local dimension: drop them.
    ok = r[:, 0] > 0
    return torch.log(r[ok, 1] / r[ok, 0])


@dataclass(frozen=True)
class TwoNNStats:
    """Sufficient statistics of the TwoNN MLE: `Σ log μ` and the number of points."""

    sum_log_mu: float
    count: int

    @classmethod
    def of(cls, points: torch.Tensor) -> TwoNNStats:
        lr = log_ratios(points)
        return cls(float(lr.sum()), int(lr.numel()))

    @staticmethod
    def combine(stats: Iterable[TwoNNStats]) -> TwoNNStats:
        """Pool per-device statistics (what a server does in `source: federated`)."""
        items = list(stats)
        return TwoNNStats(sum(s.sum_log_mu for s in items), sum(s.count for s in items))

    def dimension(self) -> float:
        if self.count == 0 or self.sum_log_mu <= 0:
            raise AdapterError(
                "TwoNN: no usable points (all duplicates, or fewer than 3 points per sample)"
            )
        return self.count / self.sum_log_mu

    def to_dict(self) -> dict[str, float | int]:
        return {"sum_log_mu": self.sum_log_mu, "count": self.count}


def twonn_fit(points: torch.Tensor, discard: float = 0.1) -> float:
    """Facco et al.'s estimate: least-squares slope of `−log(1 − F)` vs `log μ` through 0."""
    if not 0.0 <= discard < 1.0:
        raise AdapterError(f"TwoNN: discard must be in [0, 1), got {discard}")
    lr = torch.sort(log_ratios(points)).values
    n = lr.numel()
    f = torch.arange(1, n + 1, dtype=torch.float64) / n  # empirical CDF F(μ_(i)) = i/N
    keep = max(2, int(round(n * (1.0 - discard))))
    x, y = lr[:keep], -torch.log1p(-f[:keep].clamp(max=1.0 - 1e-12))
    denom = float((x * x).sum())
    if denom <= 0:
        raise AdapterError("TwoNN: all distance ratios are 1; the sample has no spread")
    return float((x * y).sum()) / denom


def twonn_dimension(points: torch.Tensor, estimator: str = "mle") -> float:
    """Intrinsic dimension of `points` [N, D] by `"mle"` or `"fit"`."""
    if estimator == "mle":
        return TwoNNStats.of(points).dimension()
    if estimator == "fit":
        return twonn_fit(points)
    raise AdapterError(f"TwoNN: estimator must be 'mle' or 'fit', got {estimator!r}")
