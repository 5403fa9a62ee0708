"""The search loop of each method under a FLOP budget, journaled so a killed search resumes.

Every finished evaluation is one line of ``evaluations.jsonl``; a method's n-th evaluation is
replayed from there instead of run again, so a resumed search spends nothing twice and ends
where an uninterrupted one would (the proposals are seeded and depend only on earlier results).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from cotune.mixture.runs import Evaluation, evaluate
from cotune.mixture.space import Fidelity, MixtureSpace, dirichlet

log = logging.getLogger(__name__)
JOURNAL = "evaluations.jsonl"
Runner = Callable[[str, int, list[float], Fidelity], Evaluation]


class Journal:
    def __init__(self, out: Path) -> None:
        self.path = out / JOURNAL
        self.done: dict[tuple[str, int], Evaluation] = {}
        if self.path.is_file():
            for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    ev = Evaluation.from_json(json.loads(line))
                except (json.JSONDecodeError, TypeError, KeyError) as err:
                    from cotune.errors import RunDirError

                    raise RunDirError(
                        f"{self.path}:{n}: not an evaluation record ({err}); delete that line "
                        "to run it again"
                    ) from None
                self.done[(ev.method, ev.index)] = ev

    def record(self, ev: Evaluation) -> None:
        self.done[(ev.method, ev.index)] = ev
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(ev.to_json()) + "\n")


class Budget:
    """Runs configurations for one method until its FLOPs are spent (the last may overshoot)."""

    def __init__(self, method: str, flops: float, run: Runner, journal: Journal) -> None:
        self.method, self.flops, self.run, self.journal = method, flops, run, journal
        self.spent = 0.0
        self.history: list[Evaluation] = []

    @property
    def left(self) -> bool:
        return self.spent < self.flops

    def __call__(self, weights: list[float], fid: Fidelity) -> Evaluation:
        index = len(self.history)
        ev = self.journal.done.get((self.method, index))
        if ev is None:
            ev = self.run(self.method, index, weights, fid)
            self.journal.record(ev)
        self.spent += ev.flops
        self.history.append(ev)
        return ev


def _rng(seed: int, method: str) -> np.random.Generator:
    return np.random.default_rng([seed, sum(map(ord, method))])


def random_search(space: MixtureSpace, budget: Budget, seed: int) -> None:
    rng = _rng(seed, "random")
    while budget.left:
        budget(dirichlet(rng, space.k), space.target)


def hyperband(space: MixtureSpace, budget: Budget, seed: int, eta: int) -> None:
    """Hyperband over the step fidelities at the target model: brackets of successive halving,
    each promoted configuration re-run at the longer budget (on the same LR schedule a longer
    run repeats the shorter one exactly; cotune charges the whole run)."""
    rng = _rng(seed, "hyperband")
    steps = space.steps
    rung = space.target.rung
    s_max = len(steps) - 1
    while budget.left:
        for s in range(s_max, -1, -1):
            n = math.ceil((s_max + 1) / (s + 1) * eta**s)
            configs = [dirichlet(rng, space.k) for _ in range(n)]
            for i in range(s + 1):
                level = steps[s_max - s + i]
                results = []
                for w in configs:
                    if not budget.left:
                        return
                    results.append((budget(w, Fidelity(rung, level)).value, w))
                results.sort(key=lambda t: t[0])
                configs = [w for _, w in results[: max(1, len(results) // eta)]]


def cost_model(space: MixtureSpace, history: list[Evaluation]) -> dict[Fidelity, float]:
    """FLOPs of a run at each fidelity: measured FLOPs per step of its rung × steps (a rung not
    run yet: the largest measured per-step cost)."""
    per_step: dict[int, list[float]] = {}
    for ev in history:
        per_step.setdefault(ev.rung, []).append(ev.flops / ev.steps)
    known = {r: float(np.mean(v)) for r, v in per_step.items()}
    top = max(known.values()) if known else 1.0
    return {f: known.get(f.rung, top) * f.steps for f in space.fidelities()}


def training_data(space: MixtureSpace, history: list[Evaluation]):
    xs, ys = [], []
    observed: dict[Fidelity, list[tuple[list[float], float]]] = {}
    for ev in history:
        for step, value in ev.points:  # every evaluation point is a data point
            fid = Fidelity(ev.rung, step)
            xs.append(space.features(ev.weights, fid))
            ys.append([value])
            if step in space.steps:
                observed.setdefault(fid, []).append((ev.weights, value))
    return torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64), observed


def mfbo(space: MixtureSpace, budget: Budget, seed: int) -> None:
    """Multi-fidelity multi-scale BO: an initial design over every rung at the fewest steps, then
    GP proposals (cost-aware EI or KG); every ``target_every``-th proposal runs the GP's best
    guess at the target fidelity, so the search has target-fidelity results to report."""
    from cotune.mixture.bo import fit_gp, propose_ei, propose_kg, recommend

    m = space.base.mixture
    rng = _rng(seed, "mfbo")
    for i in range(m.initial):
        if not budget.left:
            return
        budget(dirichlet(rng, space.k), Fidelity(i % len(space.rungs), space.steps[0]))
    t = 0
    while budget.left:
        x, y, observed = training_data(space, budget.history)
        model = fit_gp(x, y)
        t += 1
        if t % m.target_every == 0:
            budget(recommend(space, model, rng), space.target)
            continue
        costs = cost_model(space, budget.history)
        alpha = m.cost_exponent * m.cost_decay**t
        if m.acquisition == "kg":
            p = propose_kg(space, model, costs, alpha, rng)
        else:
            p = propose_ei(space, model, observed, costs, alpha, rng)
        budget(p.weights, p.fidelity)


def run_search(
    space: MixtureSpace, out: Path, budget_flops: float, seed: int, runner: Runner | None = None
) -> dict[str, list[Evaluation]]:
    """Every configured method under its own ``budget_flops``; returns each one's evaluations."""
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal(out)

    def default_runner(method: str, index: int, w: list[float], fid: Fidelity) -> Evaluation:
        ev = evaluate(space, method, index, w, fid, out)
        log.info("%s #%d %s: %.4g (%.3g FLOPs)", method, index, fid, ev.value, ev.flops)
        return ev

    results = {}
    for method in space.base.mixture.methods:
        budget = Budget(method, budget_flops, runner or default_runner, journal)
        if method == "random":
            random_search(space, budget, seed)
        elif method == "hyperband":
            hyperband(space, budget, seed, space.base.mixture.eta)
        else:
            mfbo(space, budget, seed)
        results[method] = budget.history
    return results


def trajectory(space: MixtureSpace, history: list[Evaluation]) -> Iterator[tuple[float, float]]:
    """(FLOPs spent, best target-fidelity objective so far) after each evaluation."""
    spent, best = 0.0, math.inf
    for ev in history:
        spent += ev.flops
        best = min([best, *space.target_values(ev)])
        yield spent, best
