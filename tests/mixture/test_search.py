"""The mixture search: the GP finds a known optimum, runs are real and charged, a killed search
resumes without spending anything twice."""

from __future__ import annotations

import json
import math

import pytest

from cotune.config import config_from_dict
from cotune.mixture.runs import Evaluation
from cotune.mixture.search import run_search, trajectory
from cotune.mixture.space import Fidelity, MixtureSpace
from tests.conftest import tiny_config_dict

pytest.importorskip("botorch")

NAMES = ["computers", "politics", "science"]
OPTIMUM = [0.6, 0.1, 0.3]


def space_for(tmp_path, **mixture) -> MixtureSpace:
    d = tiny_config_dict(tmp_path, train={"steps": 40})
    d["mixture"] = {"ladder": [{"random_config": {"num_hidden_layers": 1}}], "steps": [10, 20],
                    **mixture}  # fmt: skip
    return MixtureSpace.from_config(config_from_dict(d), NAMES)


def synthetic(space: MixtureSpace, calls: list | None = None):
    """A known objective: distance to OPTIMUM, lower at larger scale and more steps; cost ∝ steps,
    ×4 at the target rung."""

    def run(method, index, weights, fid):
        if calls is not None:
            calls.append((method, index))
        dist = sum((a - b) ** 2 for a, b in zip(weights, OPTIMUM, strict=True))
        points = [
            (s, 2.0 * dist + 1.0 / s + 0.2 * (1 - fid.rung)) for s in space.steps if s <= fid.steps
        ]
        return Evaluation(method, index, list(weights), fid.rung, fid.steps,
                          fid.steps * (4.0 if fid.rung else 1.0), points)  # fmt: skip

    return run


def best(space, history):
    return min(b for _, b in trajectory(space, history))


def test_mfbo_recovers_a_known_optimum(tmp_path):
    space = space_for(tmp_path, methods=["mfbo", "random"], initial=4, steps=[20])
    results = run_search(space, tmp_path / "s", budget_flops=800, seed=0, runner=synthetic(space))
    floor = 1.0 / 40  # the objective at the optimum, target fidelity
    found = best(space, results["mfbo"]) - floor
    assert found < 0.02  # within 0.1 of the optimum in each weight, roughly
    assert found <= best(space, results["random"]) - floor + 1e-9
    fids = {ev.fidelity for ev in results["mfbo"]}
    assert Fidelity(0, 20) in fids and space.target in fids  # cheap fidelities and the target


def test_budget_and_hyperband_brackets(tmp_path):
    space = space_for(tmp_path, methods=["hyperband"], eta=3)
    results = run_search(space, tmp_path / "s", budget_flops=900, seed=0, runner=synthetic(space))
    hist = results["hyperband"]
    spent = sum(ev.flops for ev in hist)
    assert spent >= 900 and spent - hist[-1].flops < 900  # stops once the budget is spent
    assert {ev.rung for ev in hist} == {1}  # the target model, steps as the resource
    first = [ev.steps for ev in hist[:13]]  # bracket s=2: 9 at 10 steps, 3 at 20, 1 at 40
    assert first == [10] * 9 + [20] * 3 + [40]
    promoted = hist[9:12]
    top3 = sorted(hist[:9], key=lambda ev: ev.value)[:3]
    assert sorted(map(tuple, (e.weights for e in promoted))) == sorted(
        map(tuple, (e.weights for e in top3))
    )


def test_a_killed_search_resumes_without_running_anything_twice(tmp_path):
    space = space_for(tmp_path, methods=["mfbo"], initial=3, steps=[20])
    whole = run_search(space, tmp_path / "a", budget_flops=300, seed=0, runner=synthetic(space))

    class Killed(Exception):
        pass

    calls: list = []
    inner = synthetic(space, calls)

    def dies(method, index, weights, fid):
        if index == 4:
            raise Killed
        return inner(method, index, weights, fid)

    with pytest.raises(Killed):
        run_search(space, tmp_path / "b", budget_flops=300, seed=0, runner=dies)
    assert len((tmp_path / "b" / "evaluations.jsonl").read_text().splitlines()) == 4
    calls.clear()
    again = run_search(space, tmp_path / "b", budget_flops=300, seed=0, runner=inner)
    assert min(i for _, i in calls) == 4  # the first four came from the journal
    assert [e.to_json() for e in again["mfbo"]] == [e.to_json() for e in whole["mfbo"]]


def test_a_broken_journal_line_is_named(tmp_path):
    from cotune.errors import RunDirError

    space = space_for(tmp_path, methods=["random"])
    out = tmp_path / "s"
    out.mkdir()
    (out / "evaluations.jsonl").write_text('{"method": "random"}\n')
    with pytest.raises(RunDirError, match=r"evaluations.jsonl:1: not an evaluation record"):
        run_search(space, out, budget_flops=10, seed=0, runner=synthetic(space))


def test_space_checks(tmp_path):
    from cotune.errors import ConfigError

    with pytest.raises(ConfigError, match="mixture.steps: fidelities must be below train.steps"):
        space_for(tmp_path, steps=[10, 40])
    with pytest.raises(ConfigError, match=r"mixture.domains: unknown domain\(s\) \['art'\]"):
        space_for(tmp_path, domains=["art", "science"])
    space = space_for(tmp_path)
    cfg = space.run_config([0.5, 0.25, 0.25], Fidelity(0, 10), "x", str(tmp_path))
    assert cfg.train.steps == 10 and cfg.train.schedule_steps == 40
    assert cfg.model.random_config["num_hidden_layers"] == 1 and cfg.mixture is None
    assert cfg.data.mixture == {"computers": 0.5, "politics": 0.25, "science": 0.25}
    assert math.isclose(sum(space.features([0.5, 0.25, 0.25], space.target)[:3]), 1.0)


def test_cotune_mixture_end_to_end_with_real_runs(tmp_path, capsys):
    """Every evaluation is a real run whose counted FLOPs are what the search was charged."""
    from cotune.cli import main

    d = tiny_config_dict(tmp_path, train={"steps": 8, "warmup_steps": 0}, name="mix",
                         eval={"max_examples": 16, "mixture": {"science": 1.0}})  # fmt: skip
    d["mixture"] = {"ladder": [{"random_config": {"num_hidden_layers": 1}}], "steps": [4],
                    "initial": 2, "target_every": 1}  # fmt: skip
    path = tmp_path / "mix.yaml"
    import yaml

    path.write_text(yaml.safe_dump(d))
    out = tmp_path / "search"
    assert main(["mixture", str(path), "--budget-flops", "3e9", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "best (" in text and "mixture.yaml" in text
    evals = [json.loads(x) for x in (out / "evaluations.jsonl").read_text().splitlines()]
    assert {e["method"] for e in evals} == {"mfbo", "random", "hyperband"}
    for e in evals:
        summary = json.loads(
            (tmp_path / e["run_dir"].split(str(tmp_path) + "/")[-1] / "summary.json").read_text()
        )
        assert e["flops"] == summary["costs"]["total"]["flops"] > 0
    best = json.loads((out / "best.json").read_text())["best"]
    assert set(best["mixture"]) == set(NAMES) and best["objective_name"] == "loss"
    page = (out / "report.html").read_text()
    assert 'src="trajectory.png"' in page and "science" in page
    for name in ("trajectory.csv", "trajectory.png", "mixture.yaml"):
        assert (out / name).stat().st_size > 0
    assert "data:\n  mixture:" in (out / "mixture.yaml").read_text()


def test_knowledge_gradient_proposes_a_mixture_and_a_fidelity(tmp_path):
    """BoTorch's multi-fidelity KG (one-shot, fantasies at the target) per unit cost."""
    import numpy as np

    from cotune.mixture.bo import fit_gp, propose_kg
    from cotune.mixture.search import cost_model, training_data

    d = tiny_config_dict(tmp_path, train={"steps": 40})
    d["mixture"] = {"steps": [20], "acquisition": "kg"}
    space = MixtureSpace.from_config(config_from_dict(d), NAMES)
    run = synthetic(space)
    rng = np.random.default_rng(0)
    history = [run("mfbo", i, list(rng.dirichlet(np.ones(3))), f)
               for i, f in enumerate(space.fidelities() * 3)]  # fmt: skip
    x, y, _ = training_data(space, history)
    model, costs = fit_gp(x, y), cost_model(space, history)
    p = propose_kg(space, model, costs, 1.0, rng, fantasies=4, restarts=1, raw_samples=8)
    assert p.fidelity in space.fidelities() and math.isfinite(p.score)
    assert min(p.weights) >= 0 and math.isclose(sum(p.weights), 1.0, abs_tol=1e-6)
