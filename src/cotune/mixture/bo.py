"""MFMS-GP and its acquisitions, on BoTorch/GPyTorch (the `mixture` extra).

The surrogate is an exact GP over x = [w₁..w_k, rung, steps] (all in [0, 1]) with the product
kernel RBF(w) × RBF(rung) × RBF(steps), as the authors' code's default `rbf_product`; every
evaluation point of every run is a training point. Proposals: for each fidelity (rung, steps),
the mixture maximizing expected improvement (minimization) over that fidelity's best, scored
EI / cost^{α_t} with ``α_t = α · decay^t`` (cost = FLOPs per step of the rung × steps, measured);
or BoTorch's multi-fidelity knowledge gradient (value at the target fidelity) per unit cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cotune.mixture.space import Fidelity, MixtureSpace, dirichlet

DTYPE = torch.float64


def fit_gp(x: torch.Tensor, y: torch.Tensor, iters: int = 100):
    """The GP fitted as the authors' code does: Adam (lr 0.1) on the exact marginal
    log-likelihood, for ``iters`` steps (their 50 under-fit cotune's test objective; a fixed
    count bounds the cost of each proposal)."""
    from botorch.models import SingleTaskGP
    from botorch.models.transforms.outcome import Standardize
    from gpytorch.constraints import GreaterThan
    from gpytorch.kernels import RBFKernel, ScaleKernel
    from gpytorch.likelihoods import GaussianLikelihood
    from gpytorch.mlls import ExactMarginalLogLikelihood

    k = x.shape[1] - 2
    kernel = ScaleKernel(
        RBFKernel(ard_num_dims=k, active_dims=list(range(k)))
        * RBFKernel(active_dims=[k])
        * RBFKernel(active_dims=[k + 1])
    )
    # A noise floor (standardized units) keeps the kernel matrix well conditioned when runs
    # repeat a configuration (Hyperband's promotions, a noiseless objective).
    likelihood = GaussianLikelihood(noise_constraint=GreaterThan(1e-3))
    model = SingleTaskGP(
        x, y, likelihood=likelihood, covar_module=kernel, outcome_transform=Standardize(m=1)
    )
    mll = ExactMarginalLogLikelihood(model.likelihood, model)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(iters):
        opt.zero_grad()
        try:
            loss = -mll(model(*model.train_inputs), model.train_targets)
            loss.backward()
        except Exception:  # noqa: BLE001 - hyper-parameters left the PSD region: last good ones
            model.load_state_dict(good)
            break
        opt.step()
        good = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    return model


@dataclass
class Proposal:
    weights: list[float]
    fidelity: Fidelity
    score: float


def _dirichlet_candidates(k: int, rng: np.random.Generator, n: int) -> torch.Tensor:
    return torch.tensor([dirichlet(rng, k) for _ in range(n)], dtype=DTYPE)


def refine_on_simplex(fn, start: torch.Tensor, steps: int = 25) -> torch.Tensor:
    """Weights ``start`` [n, k] moved uphill on a differentiable ``fn([n, k]) -> [n]`` by Adam
    on softmax logits (bounded to [−6, 6]); every row on its own."""
    logits = torch.log(start.clamp(min=1e-6)).clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        (-fn(torch.softmax(logits, -1)).sum()).backward()
        opt.step()
        with torch.no_grad():
            logits.clamp_(-6, 6)
    return torch.softmax(logits, -1).detach()


def maximize_on_simplex(fn, k: int, rng: np.random.Generator, raw: int = 256, restarts: int = 5):
    """argmax of a differentiable ``fn([n, k] weights) -> [n]`` over the simplex: the best of
    ``raw`` Dirichlet draws, then ``restarts`` of them refined (``refine_on_simplex``)."""
    cand = _dirichlet_candidates(k, rng, raw)
    with torch.no_grad():
        vals = fn(cand)
    start = cand[torch.argsort(vals, descending=True)[:restarts]]
    all_w = torch.cat([start, refine_on_simplex(fn, start)])
    with torch.no_grad():
        all_v = fn(all_w)
    i = int(torch.argmax(all_v))
    return all_w[i].tolist(), float(all_v[i])


def with_fidelity(space: MixtureSpace, w: torch.Tensor, fid: Fidelity) -> torch.Tensor:
    tail = torch.tensor(space.fidelity_features(fid), dtype=DTYPE)
    return torch.cat([w, tail.expand(w.shape[0], 2)], dim=1)


def propose_ei(
    space: MixtureSpace,
    model,
    observed: dict[Fidelity, list[tuple[list[float], float]]],
    costs: dict[Fidelity, float],
    alpha: float,
    rng: np.random.Generator,
    raw: int = 256,
    restarts: int = 5,
    steps: int = 25,
) -> Proposal:
    """Every fidelity's best mixture by log-EI at once (one batched posterior per step: the
    fidelities share the Dirichlet candidates, each keeps its own best value), then the best
    ``log EI − α·log cost``."""
    fids = space.fidelities()
    ws = torch.tensor([w for runs in observed.values() for w, _ in runs], dtype=DTYPE)
    best_f = []
    for fid in fids:
        seen = observed.get(fid, [])
        if seen:
            best_f.append(min(v for _, v in seen))
        else:  # nothing run here yet: the best posterior mean at the observed mixtures
            with torch.no_grad():
                best_f.append(float(model.posterior(with_fidelity(space, ws, fid)).mean.min()))
    tails = torch.tensor([space.fidelity_features(f) for f in fids], dtype=DTYPE)

    def log_ei(w: torch.Tensor, per: int) -> torch.Tensor:
        """w [F·per, k] (fidelity-major) → log-EI [F·per] at each row's fidelity (BoTorch's
        numerically stable log-EI of a minimization, each row against its fidelity's best)."""
        from botorch.acquisition.analytic import _log_ei_helper

        x = torch.cat([w, tails.repeat_interleave(per, 0)], dim=1)
        post = model.posterior(x)
        mean = post.mean.squeeze(-1)
        sigma = post.variance.squeeze(-1).clamp_min(1e-12).sqrt()
        u = (torch.tensor(best_f, dtype=DTYPE).repeat_interleave(per) - mean) / sigma
        return _log_ei_helper(u) + sigma.log()

    cand = _dirichlet_candidates(space.k, rng, raw)
    with torch.no_grad():
        vals = log_ei(cand.repeat(len(fids), 1), raw).view(len(fids), raw)
    top = torch.argsort(vals, dim=1, descending=True)[:, :restarts]  # [F, restarts]
    start = cand[top].reshape(-1, space.k)
    refined = refine_on_simplex(lambda w: log_ei(w, restarts), start, steps)
    with torch.no_grad():
        both = torch.cat(
            [start.view(len(fids), restarts, -1), refined.view(len(fids), restarts, -1)], 1
        )
        v = log_ei(both.reshape(-1, space.k), 2 * restarts).view(len(fids), 2 * restarts)
    best: Proposal | None = None
    for i, fid in enumerate(fids):
        j = int(torch.argmax(v[i]))
        score = float(v[i, j]) - alpha * math.log(max(costs[fid], 1.0))
        if best is None or score > best.score:
            best = Proposal(both[i, j].tolist(), fid, score)
    assert best is not None
    return best


def _kg_starts(
    kg, k: int, feats: list[float], rng: np.random.Generator, raw: int, restarts: int
) -> torch.Tensor:
    """One-shot KG's starting points: ``raw`` Dirichlet draws of its whole q-batch (the
    candidate and every fantasy's solution, all on the simplex, at ``feats``), the ``restarts``
    best by KG. BoTorch's own initializer samples the simplex constraint by hit-and-run, which
    took ~9 s per fidelity on a 2-core CPU against milliseconds for these."""
    n = kg.get_augmented_q_batch_size(1)
    w = torch.tensor(rng.dirichlet(np.ones(k), size=(raw, n)), dtype=DTYPE)
    x = torch.cat([w, torch.tensor(feats, dtype=DTYPE).expand(raw, n, 2)], dim=-1)
    with torch.no_grad():
        v = kg(x)
    return x[torch.argsort(v, descending=True)[:restarts]]


def propose_kg(
    space: MixtureSpace,
    model,
    costs: dict[Fidelity, float],
    alpha: float,
    rng: np.random.Generator,
    fantasies: int = 8,
    restarts: int = 2,
    raw_samples: int = 32,
) -> Proposal:
    """qMultiFidelityKnowledgeGradient (one-shot, fantasies projected to the target fidelity)
    per fidelity with the mixture on the simplex; the best KG / cost^α."""
    from botorch.acquisition import PosteriorMean
    from botorch.acquisition.fixed_feature import FixedFeatureAcquisitionFunction
    from botorch.acquisition.knowledge_gradient import qMultiFidelityKnowledgeGradient
    from botorch.optim import optimize_acqf

    k = space.k
    target = torch.tensor(space.fidelity_features(space.target), dtype=DTYPE)

    def project(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[..., k:] = target
        return out

    # The value of the current best at the target fidelity (KG's baseline).
    at_target = FixedFeatureAcquisitionFunction(PosteriorMean(model, maximize=False), k + 2,
                                                [k, k + 1], target.tolist())  # fmt: skip
    _, current = maximize_on_simplex(lambda w: at_target(w.unsqueeze(1)), k, rng)
    bounds = torch.stack([torch.zeros(k + 2, dtype=DTYPE), torch.ones(k + 2, dtype=DTYPE)])
    simplex = [(torch.arange(k), torch.ones(k, dtype=DTYPE), 1.0)]
    best: Proposal | None = None
    for fid in space.fidelities():
        kg = qMultiFidelityKnowledgeGradient(
            model, num_fantasies=fantasies, current_value=torch.tensor(current, dtype=DTYPE),
            project=project,
        )  # fmt: skip
        feats = space.fidelity_features(fid)
        torch.manual_seed(int(rng.integers(1 << 31)))
        try:
            starts = _kg_starts(kg, k, feats, rng, raw_samples, restarts)
            cand, value = optimize_acqf(
                kg, bounds=bounds, q=1, num_restarts=restarts, batch_initial_conditions=starts,
                options={"maxiter": 25},
                equality_constraints=simplex, fixed_features={k: feats[0], k + 1: feats[1]},
            )  # fmt: skip
        except Exception:  # noqa: BLE001 - an unlucky start: this fidelity offers nothing
            continue
        w = cand[0, :k].clamp(min=0)
        w = (w / w.sum()).tolist() if float(w.sum()) > 0 else [1.0 / k] * k
        score = math.log(max(float(value), 1e-12)) - alpha * math.log(max(costs[fid], 1.0))
        if best is None or score > best.score:
            best = Proposal(w, fid, score)
    if best is None:  # every optimization failed: fall back to the cheapest fidelity
        cheapest = min(costs, key=costs.get)
        best = Proposal(dirichlet(rng, k), cheapest, -math.inf)
    return best


def recommend(space: MixtureSpace, model, rng: np.random.Generator) -> list[float]:
    """The mixture with the lowest posterior mean at the target fidelity."""
    with torch.no_grad():

        def fn(w: torch.Tensor) -> torch.Tensor:
            return -model.posterior(with_fidelity(space, w, space.target)).mean.squeeze(-1)

        cand = _dirichlet_candidates(space.k, rng, 1024)
        return cand[int(torch.argmax(fn(cand)))].tolist()
