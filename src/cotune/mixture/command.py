"""`cotune mixture CONFIG --budget-flops F`: the search, and the files a person reads after it.

Writes to OUT (default ``<output.dir>/<name>-mixture``): ``evaluations.jsonl`` (every run, the
journal a resumed search replays), ``trajectory.csv`` and ``trajectory.png`` (best target-fidelity
objective against FLOPs spent, per method), ``best.json`` and ``mixture.yaml`` (the best mixture
found, as the config lines that apply it), ``report.html`` (all of it on one page), and the runs
themselves under ``runs/``.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotune.config import RunConfig
from cotune.errors import ConfigError
from cotune.mixture.runs import Evaluation
from cotune.mixture.search import run_search, trajectory
from cotune.mixture.space import MixtureSpace


@dataclass
class MixtureResult:
    out: Path
    best: dict[str, Any]
    per_method: dict[str, dict[str, Any]]


def check_extra() -> None:
    try:
        import botorch  # noqa: F401
        import gpytorch  # noqa: F401
    except ImportError:
        raise ConfigError(
            "mixture.methods: mfbo needs BoTorch; install it with pip install 'cotune[mixture]' "
            "(or leave mfbo out of mixture.methods)"
        ) from None


def domain_names(cfg: RunConfig) -> list[str] | None:
    from cotune.data import load_task_data

    return load_task_data(cfg.data, cfg.model.task, cfg.seed).group_names


def best_of(space: MixtureSpace, history: list[Evaluation]) -> dict[str, Any] | None:
    target = [(v, ev) for ev in history for v in space.target_values(ev)]
    if not target:
        return None
    value, ev = min(target, key=lambda t: t[0])
    return {
        "objective": value,
        "mixture": dict(zip(space.domains, ev.weights, strict=True)),
        "run_dir": ev.run_dir,
        "evaluation": f"{ev.method} #{ev.index}",
    }


def write_outputs(
    space: MixtureSpace, results: dict[str, list[Evaluation]], out: Path
) -> MixtureResult:
    per_method: dict[str, dict[str, Any]] = {}
    rows = []
    for method, history in results.items():
        traj = list(trajectory(space, history))
        for i, (spent, best) in enumerate(traj):
            rows.append([method, i, history[i].rung, history[i].steps, history[i].flops, spent,
                         "" if math.isinf(best) else best])  # fmt: skip
        per_method[method] = {
            "evaluations": len(history),
            "flops_spent": traj[-1][0] if traj else 0.0,
            "best": best_of(space, history),
        }
    with (out / "trajectory.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["method", "evaluation", "rung", "steps", "flops", "flops_spent", "best_target"])
        w.writerows(rows)
    found = [(m, r["best"]) for m, r in per_method.items() if r["best"] is not None]
    if not found:
        raise ConfigError(
            "mixture: no method evaluated the target fidelity within the budget; raise "
            "--budget-flops (one target run costs about "
            f"{_target_cost(space, results):.3g} FLOPs)"
        )
    method, best = min(found, key=lambda t: t[1]["objective"])
    best = {**best, "method": method, "objective_name": space.base.mixture.objective}
    (out / "best.json").write_text(
        json.dumps({"best": best, "methods": per_method}, indent=2) + "\n", encoding="utf-8"
    )
    lines = [
        "# The best mixture `cotune mixture` found; add to a run config (or, for a warm-up on",
        "# general data with these domains, put the weights under peft.warmup.mixture).",
        "data:",
        "  mixture:",
    ]
    lines += [f"    {json.dumps(n)}: {w:.4f}" for n, w in best["mixture"].items()]
    (out / "mixture.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot(results, space, out / "trajectory.png")
    write_html(space, best, per_method, out / "report.html")
    return MixtureResult(out, best, per_method)


def write_html(
    space: MixtureSpace, best: dict[str, Any], per_method: dict[str, dict[str, Any]], path: Path
) -> None:
    """One page: the trajectory plot, each method's result, and the best mixture."""
    from html import escape

    objective = escape(space.base.mixture.objective)
    rows = []
    for method, r in per_method.items():
        b = r["best"]
        value = f"{b['objective']:.4f}" if b else "no target-fidelity run"
        rows.append(
            f"<tr><td>{escape(method)}</td><td>{r['evaluations']}</td>"
            f"<td>{r['flops_spent']:.3g}</td><td>{value}</td></tr>"
        )
    mix = "".join(
        f"<tr><td>{escape(n)}</td><td>{w:.4f}</td></tr>" for n, w in best["mixture"].items()
    )
    target = space.target
    path.write_text(
        f"""<!doctype html><html><head><meta charset="utf-8"><title>Mixture search</title>
<style>body{{font-family:sans-serif;max-width:880px;margin:2em auto}}table{{border-collapse:
collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}</style></head><body>
<h1>Mixture search: {escape(space.base.name)}</h1>
<p>Domains: {escape(", ".join(space.domains))}. Target fidelity: rung {target.rung} (the run's
model), {target.steps} steps; objective: {objective} on the evaluation mix (lower is better).
Every evaluation was a real cotune run; cost = its counted FLOPs.</p>
<img src="trajectory.png" alt="best target-fidelity {objective} against FLOPs spent">
<h2>Methods</h2><table><tr><th>method</th><th>runs</th><th>FLOPs spent</th>
<th>best {objective}</th></tr>{"".join(rows)}</table>
<h2>Best mixture ({escape(best["method"])}, {best["objective"]:.4f})</h2>
<table><tr><th>domain</th><th>weight</th></tr>{mix}</table>
<p>Apply it with <code>mixture.yaml</code>; every run is listed in
<code>evaluations.jsonl</code> and <code>trajectory.csv</code>.</p></body></html>
""",
        encoding="utf-8",
    )


def _target_cost(space: MixtureSpace, results: dict[str, list[Evaluation]]) -> float:
    per_step = [ev.flops / ev.steps for h in results.values() for ev in h]
    return max(per_step, default=0.0) * space.target.steps


def plot(results: dict[str, list[Evaluation]], space: MixtureSpace, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=110)
    ax = fig.add_subplot()
    for method, history in results.items():
        pts = [(s, b) for s, b in trajectory(space, history) if math.isfinite(b)]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.step(xs, ys, where="post", label=method, marker="o", markersize=3)
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs spent")
    ax.set_ylabel(f"best {space.base.mixture.objective} at the target (lower is better)")
    ax.set_title("Mixture search: best target-fidelity result vs cost")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")


def mixture_search(
    cfg: RunConfig, *, budget_flops: float | None, out: Path | None, seed: int | None = None
) -> MixtureResult:
    """Search ``cfg``'s domain mixture (its ``mixture`` section) and write the outputs."""
    if cfg.mixture is None:  # every setting at its default
        from cotune.config import MixtureSection

        cfg = cfg.model_copy(update={"mixture": MixtureSection()})
    budget = budget_flops if budget_flops is not None else cfg.mixture.budget_flops
    if budget is None:
        raise ConfigError("mixture.budget_flops: give a FLOP budget (or --budget-flops)")
    if "mfbo" in cfg.mixture.methods:
        check_extra()
    space = MixtureSpace.from_config(cfg, domain_names(cfg))
    target = out or Path(cfg.output.dir) / f"{cfg.name}-mixture"
    results = run_search(space, target, budget, cfg.seed if seed is None else seed)
    return write_outputs(space, results, target)


def format_result(res: MixtureResult) -> str:
    lines = [f"mixture search: {res.out}"]
    for method, r in res.per_method.items():
        b = r["best"]
        best = f"{b['objective']:.4f}" if b else "no target-fidelity run"
        lines.append(
            f"  {method:<10} {r['evaluations']:>3} runs, {r['flops_spent']:.3g} FLOPs, best {best}"
        )
    mix = ", ".join(f"{n} {w:.2f}" for n, w in res.best["mixture"].items())
    lines.append(f"best ({res.best['method']}): {res.best['objective']:.4f} with {mix}")
    lines.append(f"apply it: {res.out / 'mixture.yaml'}; report: {res.out / 'report.html'}")
    return "\n".join(lines)
