"""One paradigm, any engine: the Grid paradigms give the same run on ``local`` and ``isolated``
(losses, adapter weights, FLOPs, bytes and simulated time, bit for bit on CPU); isolated roles
share no Python object; failures, quorum and deadline come back as ``gather`` outcomes."""

import ast
import json
from pathlib import Path

import pytest
import torch

from cotune.paradigms import GRID_PARADIGMS, PARADIGMS
from cotune.run import latest_checkpoint, run_experiment
from tests.paradigms.test_central_local import kill_after

FED = {"name": "fedavg", "options": {"local_steps": 2}}
CASES = {
    "central": {"paradigm": {"name": "central"}},
    "local": {"paradigm": {"name": "local"}},
    "fedavg": {"paradigm": FED},
    "fedavg-drops-quorum-shaper": {
        "paradigm": {"name": "fedavg", "options": {"local_steps": 2, "quorum": 2, "fraction": 1.0}},
        "devices": {"count": 3, "availability": {"kind": "random", "drop_p": 0.3, "dispatch_batch": 2}},
    },
    "fedavg-deadline-fedadam-prox": {
        "paradigm": {"name": "fedavg", "options": {
            "local_steps": 2, "deadline_s": 0.1, "aggregator": "fedadam", "prox_mu": 0.1,
            "optimizer_state": "reset"}},
        "devices": {"count": 3, "mix": {"phone-low": 0.5, "laptop-cpu": 0.5}},
    },
    "fedavg-periodic-epochs": {
        "paradigm": {"name": "fedavg", "options": {"local_epochs": 0.5, "rounds": 3, "clients_per_round": 2}},
        "devices": {"count": 3, "availability": {"kind": "periodic", "period_s": 20.0, "on_fraction": 0.6, "stagger": True}},
        "partition": {"scheme": "quantity"},
    },
    "hierfed": {"paradigm": {"name": "hierfed", "options": {"local_steps": 1, "num_groups": 2}}},
    "hierfed-balanced-drops": {
        "paradigm": {"name": "hierfed", "options": {"local_steps": 1, "num_groups": 2, "tau": 2}},
        "devices": {"count": 4, "mix": {"phone-low": 0.5, "jetson": 0.5},
                    "availability": {"kind": "random", "drop_p": 0.2}},
        "partition": {"scheme": "dirichlet", "alpha": 0.3},
    },
    "fedbiot": {
        "paradigm": {"name": "fedbiot", "options": {
            "adapter_layers": 1, "local_steps": 2, "initial_align_steps": 2, "align_steps": 1,
            "public_examples": 16}},
        "model": {"random_config": {"num_hidden_layers": 3}},
        "peft": {"target_modules": ["query", "value"]},
    },
    "fedbiot-drops-full": {
        "paradigm": {"name": "fedbiot", "options": {
            "adapter_layers": 1, "adapter_mode": "full", "local_steps": 2, "align_steps": 0,
            "initial_align_steps": 1, "public_examples": 16, "clients_per_round": 2}},
        "devices": {"count": 3, "availability": {"kind": "random", "drop_p": 0.3}},
    },
}  # fmt: skip


def run(tiny_config, name, engine, **sections):
    cfg = tiny_config(name=f"{name}-{engine}", engine={"kind": engine}, **sections)
    return run_experiment(cfg, quiet=True, report=False)


def outcome(run_dir):
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in recs:  # host times differ run to run: they are measurements, not results
        for k in [k for k in r if "host" in k]:
            r.pop(k)
    summary = json.loads((run_dir / "summary.json").read_text())
    payload = torch.load(latest_checkpoint(run_dir), weights_only=False)
    params = {role: s["params"] for role, s in payload["states"].items()}
    return recs, summary, params


@pytest.mark.parametrize("case", sorted(CASES))
def test_local_and_isolated_engines_give_the_same_run(tiny_config, case):
    a = outcome(run(tiny_config, case, "local", **CASES[case]))
    b = outcome(run(tiny_config, case, "isolated", **CASES[case]))
    assert a[0] == b[0]  # every record: losses, lr, round outcomes, bytes, simulated time
    sa, sb = a[1], b[1]
    assert sa["sim_time_s"] == sb["sim_time_s"] and sa["bytes"] == sb["bytes"]
    assert sa["messages"] == sb["messages"] and sa["final"] == sb["final"]
    assert sa["costs"]["roles"] == sb["costs"]["roles"]  # FLOPs, bytes, time, energy per role
    assert a[2].keys() == b[2].keys()
    for role in a[2]:
        for k, v in a[2][role].items():
            assert torch.equal(v, b[2][role][k]), (role, k)


def test_the_cases_exercise_failures_quorum_and_deadline(tiny_config):
    """The matrix above is only convincing if its runs drop, cut and wait: check they do."""
    rounds = {}
    for case in (
        "fedavg-drops-quorum-shaper",
        "fedavg-deadline-fedadam-prox",
        "hierfed-balanced-drops",
    ):
        recs = outcome(run(tiny_config, case, "isolated", **CASES[case]))[0]
        rounds[case] = [r for r in recs if r["event"] == "round"]
    assert sum(r["dropped"] for r in rounds["fedavg-drops-quorum-shaper"]) > 0
    assert any(r["reported"] < r["participants"] for r in rounds["fedavg-deadline-fedadam-prox"])
    # An edge's own requests to its members are simulated too (drops inside group rounds).
    assert sum(r["dropped"] for r in rounds["hierfed-balanced-drops"]) > 0


def test_isolated_roles_share_no_python_object(tiny_config, monkeypatch):
    from cotune.paradigms import federated

    seen = []
    real = federated.FedDevice.__init__

    def spy(self, ctx):
        real(self, ctx)
        seen.append(self)

    monkeypatch.setattr(federated.FedDevice, "__init__", spy)
    run(tiny_config, "iso", "isolated", paradigm=FED)
    a, b = seen
    assert a.ctx.model.loaded.model is not b.ctx.model.loaded.model
    assert a.ctx.model.trainer is not b.ctx.model.trainer and a.ctx.cfg is not b.ctx.cfg

    def storages(role):
        return {p.untyped_storage().data_ptr() for p in role.ctx.model.loaded.model.parameters()}

    assert not storages(a) & storages(b)
    assert a.dataset is not b.dataset and not set(map(id, a.dataset.ids)) & set(
        map(id, b.dataset.ids)
    )


def test_local_engine_shares_one_model(tiny_config, monkeypatch):
    from cotune.paradigms import federated

    seen = []
    real = federated.FedDevice.__init__
    monkeypatch.setattr(
        federated.FedDevice, "__init__", lambda s, c: (real(s, c), seen.append(s))[0]
    )
    run(tiny_config, "shared", "local", paradigm=FED)
    assert seen[0].ctx.model.loaded.model is seen[1].ctx.model.loaded.model


@pytest.mark.parametrize("engine", ["local", "isolated"])
def test_resume_equals_the_uninterrupted_run_on_each_engine(tiny_config, engine):
    sections = {"paradigm": FED, "output": {"checkpoint_every": 2, "keep_checkpoints": 100}}
    whole = outcome(run(tiny_config, "whole", engine, **sections))
    cfg = tiny_config(name=f"part-{engine}", engine={"kind": engine}, **sections)
    run_dir = run_experiment(cfg, quiet=True, report=False)
    kill_after(run_dir, 2)
    (run_dir / "summary.json").unlink()
    run_experiment(cfg, quiet=True, report=False, resume=True)
    part = outcome(run_dir)
    assert part[1]["sim_time_s"] == whole[1]["sim_time_s"]
    for k, v in whole[2]["server"].items():
        assert torch.equal(v, part[2]["server"][k])


def test_unported_paradigms_refuse_the_isolated_engine(tiny_config):
    from cotune.errors import ConfigError

    for name in sorted(set(PARADIGMS) - set(GRID_PARADIGMS)):
        with pytest.raises(
            ConfigError, match=r"engine.kind 'isolated' runs central, local, fedavg"
        ):
            tiny_config(engine={"kind": "isolated"}, paradigm={"name": name})


# ---------------------------------------------------------------- the contract, statically

SRC = Path(__file__).resolve().parents[2] / "src" / "cotune" / "paradigms"
GRID_MODULES = [*(f"{p}.py" for p in GRID_PARADIGMS), "federated.py"]


@pytest.mark.parametrize("module", GRID_MODULES)
def test_grid_paradigms_never_touch_the_simulator_or_the_engine(module):
    """A Grid paradigm imports nothing from cotune.sim and never reaches for the clock, the
    simulator or the raw engine: all it has is the grid, messages and its own node."""
    tree = ast.parse((SRC / module).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert not (node.module or "").startswith("cotune.sim"), (
                f"{module} imports {node.module}"
            )
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("cotune.sim") for a in node.names)
        if isinstance(node, ast.Attribute):
            assert node.attr not in ("sim", "engine", "clock"), (
                f"{module}:{node.lineno} .{node.attr}"
            )


@pytest.mark.parametrize("module", GRID_MODULES)
def test_grid_paradigm_roles_only_hold_their_context(module):
    """Role classes there (those with ``on_<kind>`` handlers) are built from a NodeContext and
    never take the Experiment; driver-side helpers (fedbiot's aligner) may."""
    tree = ast.parse((SRC / module).read_text())
    classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    roles = [
        c for c in classes
        if any(isinstance(f, ast.FunctionDef) and f.name.startswith("on_") for f in c.body)
    ]  # fmt: skip
    for cls in roles:
        for fn in [n for n in cls.body if isinstance(n, ast.FunctionDef)]:
            names = [a.arg for a in fn.args.args]
            assert "exp" not in names, f"{module}: {cls.name}.{fn.name} takes the Experiment"
            for n in ast.walk(fn):
                assert not (isinstance(n, ast.Name) and n.id == "exp"), f"{cls.name}.{fn.name}"
