"""One evaluation of the search: a real cotune run, its learning curve and its counted FLOPs."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cotune.mixture.space import Fidelity, MixtureSpace


@dataclass
class Evaluation:
    method: str
    index: int  # the method's n-th evaluation
    weights: list[float]
    rung: int
    steps: int
    flops: float  # every role's counted FLOPs (the search's cost)
    points: list[tuple[int, float]] = field(default_factory=list)  # (step, objective ↓)
    host_s: float = 0.0
    run_dir: str = ""

    @property
    def fidelity(self) -> Fidelity:
        return Fidelity(self.rung, self.steps)

    @property
    def value(self) -> float:
        """The objective at the run's last step."""
        return self.points[-1][1]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Evaluation:
        d = dict(d)
        d["points"] = [tuple(p) for p in d.get("points", [])]
        return cls(**d)


def objective_of(record: dict[str, Any], objective: str) -> float | None:
    if objective == "accuracy":
        acc = record.get("accuracy")
        return None if acc is None else 1.0 - float(acc)
    loss = record.get("loss")
    if loss is None:
        return None
    return math.exp(min(float(loss), 50.0)) if objective == "perplexity" else float(loss)


def curve(metrics: Path, objective: str) -> list[tuple[int, float]]:
    """(step, objective) at every evaluation point: the mean over evaluated roles where there is
    one (per-device adapters), else the server's (the global adapter)."""
    by_step: dict[int, dict[str, dict[str, Any]]] = {}
    for line in metrics.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("event") == "eval":
            by_step.setdefault(int(rec["step"]), {})[rec.get("role", "")] = rec
    out = []
    for step in sorted(by_step):
        roles = by_step[step]
        rec = roles.get("mean") or roles.get("server") or next(iter(roles.values()))
        value = objective_of(rec, objective)
        if value is not None and math.isfinite(value):
            out.append((step, value))
    return out


def evaluate(
    space: MixtureSpace, method: str, index: int, weights: list[float], fid: Fidelity, out: Path
) -> Evaluation:
    """Train and evaluate one configuration (a run directory under ``out/runs``)."""
    from cotune.errors import CotuneError
    from cotune.run import run_experiment

    name = f"{method}-{index:04d}"
    cfg = space.run_config(weights, fid, name, str(out / "runs"))
    t = time.perf_counter()
    run_dir = run_experiment(cfg, overwrite=True, quiet=True, report=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    points = curve(run_dir / "metrics.jsonl", space.base.mixture.objective)
    if not points:
        raise CotuneError(f"{run_dir}: the run logged no evaluation with a finite objective")
    return Evaluation(
        method, index, list(weights), fid.rung, fid.steps,
        float(summary["costs"]["total"]["flops"]), points, time.perf_counter() - t, str(run_dir),
    )  # fmt: skip
