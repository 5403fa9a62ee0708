"""APCA-GGM's graph step: the ℓ2,g-regularized Gaussian graphical model and the node selection.

Nodes are rank-1 principal components (see ``cotune.peft.ggm``); one sample is one step's vector
of node importance scores. From the samples' log-scores (rows L2-normalized, columns centred) the
sample covariance ``S``; the ``important`` nodes are those with the highest mean score. Then

    min_{Ω ≻ 0, Δ}  −log det Ω + tr(SΩ) + λ‖Ω − Δ‖²_F + τ Σ_{j ∉ I} ‖Δ_{I,j}‖₂^p

by block coordinate descent (Zheng & Cao, arXiv 2412.08592; written out from the authors' code).
The Δ-step is exact: per column, generalized soft-thresholding (Zuo et al. 2013) of the
important-row block's norm. The Ω-step is the authors' gradient step (``omega_step: authors``) or
the closed-form minimizer (``exact``: ``Ω⁻¹ = S + 2λ(Ω − Δ)`` solved by one eigendecomposition),
with which every sweep provably lowers the objective. Nodes are kept by ``‖Ω_{I,j}‖₂``, the
important ones always.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

LOG_CLIP = 200.0  # the authors clip log(0) = −inf (and +inf) to ±200
RIDGE = 1e-10  # Ω₀ = pinv(S + ridge·I), as the authors' code starts


def gst(y: torch.Tensor, w: float, p: float, iters: int = 5) -> torch.Tensor:
    """Generalized soft-thresholding: argmin_x ½(x − y)² + w|x|^p, elementwise (0 < p < 1).

    Below the threshold the minimizer is 0; above it, the fixed point of ``δ = |y| − w·p·δ^{p−1}``
    (``iters`` iterations from ``δ = |y|``, as Zuo et al. and the authors' code)."""
    if not 0 < p < 1:
        raise ValueError(f"gst needs 0 < p < 1, got {p}")
    y = torch.as_tensor(y, dtype=torch.float64)
    if w <= 0:
        return y.clone()
    base = (2 * w * (1 - p)) ** (1 / (2 - p))
    threshold = base + w * p * base ** (p - 1)
    mag = y.abs()
    delta = mag.clone()
    for _ in range(iters):
        delta = mag - w * p * delta.clamp(min=1e-300) ** (p - 1)
    return torch.where(mag > threshold, torch.sign(y) * delta, torch.zeros_like(y))


def covariance(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S [n, n], the row-normalized log-scores' column means [n]) from scores [samples, nodes]."""
    if scores.dim() != 2 or scores.shape[0] < 2:
        raise ValueError(
            f"GGM needs 2 or more score samples (steps), got a matrix of shape {tuple(scores.shape)}"
        )
    x = torch.log(scores.to(torch.float64)).nan_to_num(-LOG_CLIP, LOG_CLIP, -LOG_CLIP)
    x = x.clamp(-LOG_CLIP, LOG_CLIP)
    x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-300)
    means = x.mean(0)
    xc = x - means
    return xc.T @ xc / (x.shape[0] - 1), means


def penalty(delta: torch.Tensor, important: torch.Tensor, tau: float, p: float) -> torch.Tensor:
    others = torch.ones(delta.shape[1], dtype=torch.bool)
    others[important] = False
    return tau * (delta[important][:, others].norm(dim=0) ** p).sum()


def objective(
    s: torch.Tensor,
    omega: torch.Tensor,
    delta: torch.Tensor,
    important: torch.Tensor,
    lam: float,
    tau: float,
    p: float,
) -> float:
    """The value BCD minimizes (``inf`` when Ω is not positive definite)."""
    sign, logdet = torch.linalg.slogdet(omega)
    if sign <= 0:
        return math.inf
    fit = -logdet + (s * omega).sum() + lam * ((omega - delta) ** 2).sum()
    return float(fit + penalty(delta, important, tau, p))


def delta_step(
    omega: torch.Tensor, important: torch.Tensor, lam: float, tau: float, p: float
) -> torch.Tensor:
    """Exact minimizer over Δ: columns outside I have their important-row block shrunk radially."""
    delta = omega.clone()
    others = torch.ones(omega.shape[1], dtype=torch.bool)
    others[important] = False
    block = omega[important][:, others]  # [|I|, n − |I|]
    norms = block.norm(dim=0)
    shrunk = gst(norms, tau / (2 * lam), p)
    scale = torch.where(norms > 0, shrunk / norms.clamp(min=1e-300), torch.zeros_like(norms))
    rows = important[:, None]
    cols = others.nonzero().flatten()[None, :]
    delta[rows, cols] = block * scale
    return delta


def omega_step_exact(s: torch.Tensor, delta: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin_Ω −log det Ω + tr(SΩ) + λ‖Ω − Δ‖²: with ``M = S − 2λΔ = Q diag(m) Qᵀ``, the
    stationarity condition ``2λΩ² + MΩ = I`` gives ``ω = (−m + √(m² + 8λ)) / 4λ`` (positive)."""
    m = s - 2 * lam * delta
    m = (m + m.T) / 2
    evals, q = torch.linalg.eigh(m)
    w = (-evals + torch.sqrt(evals**2 + 8 * lam)) / (4 * lam)
    return (q * w) @ q.T


def omega_step_authors(
    s: torch.Tensor,
    delta: torch.Tensor,
    omega: torch.Tensor,
    lam: float,
    eta: float,
    iters: int,
    tol: float = 1e-6,
) -> torch.Tensor:
    """The authors' Ω-step: gradient ascent on ``log det Ω − tr(AΩ) − λ‖Ω‖²`` with
    ``A = (S − 2λΔ)/2λ``, step ``η/2λ`` (their code; it optimizes a rescaled form of the
    objective, and with their η moves Ω little from its start)."""
    a = (s - 2 * lam * delta) / (2 * lam)
    for _ in range(iters):
        grad = torch.linalg.inv(omega) - a - 2 * lam * omega
        new = omega + eta * grad / (2 * lam)
        new = (new + new.T) / 2
        moved = float((new - omega).norm())
        omega = new
        if moved < tol:
            break
    return omega


@dataclass
class GgmResult:
    omega: torch.Tensor
    delta: torch.Tensor
    important: torch.Tensor  # node indices
    objective: list[float] = field(default_factory=list)  # after every sweep
    sweeps: int = 0


def solve(
    s: torch.Tensor,
    important: torch.Tensor,
    *,
    lam: float = 1000.0,
    tau: float = 20.0,
    p: float = 0.9,
    max_iter: int = 50,
    omega_step: str = "authors",
    eta: float = 1e-4,
    omega_iters: int = 100,
    tol: float = 1e-6,
) -> GgmResult:
    """Block coordinate descent from ``Ω₀ = pinv(S + ridge·I)``, ``Δ₀ = Ω₀``."""
    s = s.to(torch.float64)
    n = s.shape[0]
    omega = torch.linalg.pinv(s + RIDGE * torch.eye(n, dtype=s.dtype), hermitian=True)
    omega = (omega + omega.T) / 2
    delta = omega.clone()
    result = GgmResult(omega, delta, important)
    for sweep in range(max_iter):
        new_delta = delta_step(omega, important, lam, tau, p)
        if omega_step == "exact":
            new_omega = omega_step_exact(s, new_delta, lam)
        else:
            new_omega = omega_step_authors(s, new_delta, omega, lam, eta, omega_iters)
        moved = max(float((new_omega - omega).norm()), float((new_delta - delta).norm()))
        omega, delta = new_omega, new_delta
        result.objective.append(objective(s, omega, delta, important, lam, tau, p))
        result.sweeps = sweep + 1
        if moved < tol:
            break
    result.omega, result.delta = omega, delta
    return result


def count(value: int | float, total: int, name: str) -> int:
    """A node count given as a count (int ≥ 1) or a fraction of ``total`` (float in (0, 1))."""
    n = int(value) if isinstance(value, int) or value >= 1 else max(1, round(value * total))
    if n >= total:
        raise ValueError(
            f"peft.options.{name} = {value} keeps {n} of the {total} component nodes: nothing "
            f"left to choose; give fewer (a count below {total}, or a fraction such as 0.2)"
        )
    return n


def select_nodes(
    scores: torch.Tensor,
    important: int | float,
    kept: int | float,
    *,
    selection: str = "graph",
    **solver: object,
) -> tuple[list[int], GgmResult | None]:
    """The kept node indices (sorted) from score samples [steps, nodes], and the solver's result
    (``selection="score"``: the top ``kept`` by mean log-score, no graph, no result)."""
    total = scores.shape[1]
    n_important = count(important, total, "important_nodes")
    n_kept = count(kept, total, "kept_nodes")
    if n_kept < n_important:
        raise ValueError(
            f"peft.options.kept_nodes ({n_kept} nodes) must be at least important_nodes "
            f"({n_important} nodes): the important nodes are always kept"
        )
    s, means = covariance(scores)
    if selection == "score":
        top = torch.argsort(means, descending=True, stable=True)[:n_kept]
        return sorted(int(i) for i in top), None
    top = torch.argsort(means, descending=True, stable=True)[:n_important]
    result = solve(s, top.sort().values, **solver)  # type: ignore[arg-type]
    column = result.omega[result.important].norm(dim=0)
    column[result.important] = math.inf
    keep = torch.argsort(column, descending=True, stable=True)[:n_kept]
    return sorted(int(i) for i in keep), result
