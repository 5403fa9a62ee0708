"""One paradigm, any engine: the Grid paradigms give the same run on ``local`` and ``isolated``
(losses, adapter weights, FLOPs, bytes and simulated time, bit for bit on CPU); isolated roles
share no Python object; failures, quorum and deadline come back as ``gather`` outcomes."""

import ast
import json
import os
from pathlib import Path

import pytest
import torch

from cotune.run import latest_checkpoint, run_experiment
from cotune.rundir import checkpoints
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
    # Blocks on the real tokens only: the role's own train_step turns it on in its own process.
    "fedavg-padding-free": {"paradigm": FED, "train": {"padding_free": True}},
    # A causal-LM head and loss on the real tokens only (quotes of unequal lengths), learning
    # the answers of instructions only (fortunes' instruct view: quote -> its category).
    "fedavg-causal-padding-free-instruct": {
        "paradigm": FED,
        "model": {"name_or_path": "random:gpt2", "task": "causal_lm", "max_length": 64,
                  "random_config": {"n_layer": 2}},
        "data": {"dataset": "fortunes", "view": "instruct", "labels": [], "max_examples": 60},
        "peft": {"target_modules": ["c_attn"]},
        "train": {"padding_free": True},
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
    "splitfrozen": {
        "paradigm": {"name": "splitfrozen", "options": {"cuts": [1, 0]}},
        "peft": {"target_modules": ["query", "value"]},
    },
    "splitfrozen-auto-nopipe-int8-accum": {  # one server update per two uploads
        "paradigm": {"name": "splitfrozen", "options": {"pipeline": False, "max_cut": 1}},
        "devices": {"count": 3, "mix": {"phone-low": 0.5, "laptop-cpu": 0.5}},
        "engine": {"activation_codec": "int8"},
        "train": {"grad_accum": 2},
    },
    # splitfed's device cohort batches colocated devices (float results ~1e-6 apart: a batch
    # of another shape); isolated roles cannot batch, so these compare with the cohort off.
    "splitfed": {"paradigm": {"name": "splitfed", "options": {"cut": 1, "aggregate_every": 2, "cohort": False}}},
    # Both sides' blocks on the real tokens (each role's own flag, in its own process).
    "splitfed-padding-free-accum": {  # each gradient round trip brings a micro-batch up
        "paradigm": {"name": "splitfed", "options": {"cut": 1, "cohort": False}},
        "train": {"padding_free": True, "grad_accum": 2},
    },
    "splitfed-pooled-global-clip": {
        "paradigm": {"name": "splitfed", "options": {"cut": 1, "server_batch": "pooled", "cohort": False}},
        "devices": {"count": 3},
    },
    "splitfed-pooled-accum": {  # pooled passes per micro-batch, one server update
        "paradigm": {"name": "splitfed", "options": {"cut": 1, "server_batch": "pooled", "cohort": False}},
        "devices": {"count": 3},
        "train": {"grad_accum": 2},
    },
    "splitfed-per-device-ushaped": {
        "paradigm": {"name": "splitfed", "options": {
            "cut": 1, "u_shaped": True, "server_side": "per_device", "aggregate_every": 3}},
        "model": {"random_config": {"num_hidden_layers": 3}},
    },
    "splitfed-ushaped-accum": {  # the device's top turn inside each micro-batch's round trip
        "paradigm": {"name": "splitfed", "options": {
            "cut": 1, "u_shaped": True, "cohort": False, "aggregate_every": 2}},
        "train": {"grad_accum": 2},
    },
    "splitfed-ushaped-pooled": {  # one middle pass, every device's top turned at once
        "paradigm": {"name": "splitfed", "options": {
            "cut": 1, "u_shaped": True, "server_batch": "pooled", "aggregate_every": 2}},
        "train": {"grad_accum": 2},
    },
    "split-p2p": {"paradigm": {"name": "split", "options": {"cut": 1, "turn_steps": 2, "relay": "p2p"}}},
    "split-server-relay": {"paradigm": {"name": "split", "options": {"cut": 1, "relay": "server"}}},
    "dlora-kill-revive": {
        "paradigm": {"name": "dlora", "options": {
            "active_fraction": 0.5, "kill_every": 2, "revive_every": 3, "revive": "random"}},
    },
    # Issue 17's mechanisms, DoRA among them: the method matrix on both engines.
    # GGM: devices score their own data; split roles inject the allocation into their segments.
    "splitfed-ggm-federated": {
        "paradigm": {"name": "splitfed", "options": {"cut": 1, "aggregate_every": 2, "cohort": False}},
        "peft": {"method": "ggm", "options": {
            "source": "federated", "important_nodes": 2, "kept_nodes": 5, "warmup_steps": 2}},
    },
    "fedavg-secagg-localdp-dora": {
        "paradigm": {"name": "fedavg", "options": {"local_steps": 2, "secure_aggregation": {
            "range": 0.5}}},
        "devices": {"count": 3},
        "peft": {"method": "dora"},
        "train": {"dp": {"mode": "local", "clip": 0.1, "noise_multiplier": 0.3}},
    },
    "fedavg-ranks-stack-dora": {
        "paradigm": {"name": "fedavg", "options": {"local_steps": 2, "rank_aggregation": "stack"}},
        "devices": {"count": 3, "ranks": {"device-0": 1, "device-1": 2}},
        "peft": {"method": "dora"},
    },
    "fedbuff-dora": {
        "paradigm": {"name": "fedbuff", "options": {"local_steps": 2, "buffer_size": 2}},
        "devices": {"count": 3, "mix": {"phone-low": 0.5, "jetson": 0.5}},
        "peft": {"method": "dora"},
    },
    "fedasync": {
        "paradigm": {"name": "fedasync", "options": {"local_steps": 2, "staleness": "hinge"}},
        "devices": {"count": 3, "mix": {"phone-low": 0.5, "jetson": 0.5}},
    },
    "clustered-ifca": {
        "paradigm": {"name": "clustered", "options": {"local_steps": 2, "every": 1}},
        "devices": {"count": 4},
    },
    "hat-drafter": {
        "paradigm": {"name": "hat_drafter", "options": {"local_steps": 2}},
        "model": {"name_or_path": "random:gpt2", "task": "causal_lm", "max_length": 32,
                  "random_config": {"n_layer": 3}},
        "data": {"dataset": "austen", "view": "text", "labels": [], "max_examples": 80},
        "peft": {"target_modules": ["c_attn"]},
    },
    # Sampled: the speculative rule's draws and the rollbacks of rejected drafts on each side.
    "hat-serve": {
        "paradigm": {"name": "hat_serve", "options": {
            "gamma": 2, "temperature": 0.9, "prefill_chunk": 4, "prompt_tokens": 6,
            "max_new_tokens": 6}},
        "model": {"name_or_path": "random:gpt2", "task": "causal_lm", "max_length": 32,
                  "random_config": {"n_layer": 3}},
        "data": {"dataset": "austen", "view": "text", "labels": [], "max_examples": 80},
        "peft": {"target_modules": ["c_attn"]},
        "train": {"steps": 4},
    },
    # KaSA: a rewritten base on every node, the regularizer on the devices' active modules.
    "dlora-embed-cloud-delta-kasa": {
        "paradigm": {"name": "dlora", "options": {
            "active_fraction": 0.25, "kill_every": 1, "score": "delta", "embed": "cloud",
            "revive": "stale", "revive_every": 2}},
        "peft": {"method": "kasa"},
    },
}  # fmt: skip


def run(tiny_config, name, kind, **sections):
    sections = {**sections, "engine": {**sections.get("engine", {}), "kind": kind}}
    cfg = tiny_config(name=f"{name}-{kind}", **sections)
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


_REFERENCE: dict[tuple[str, str], tuple] = {}
# `make test` runs pytest twice (the Ray tests alone, after the rest) and names a fresh directory
# here for both: the second run reads the references the first one made instead of running them
# again. Unset (a plain `pytest`), every session makes its own.
SHARED_REFERENCES = os.environ.get("COTUNE_TEST_REFERENCES")


def reference(tiny_config, case, kind):
    """``outcome`` of ``CASES[case]`` on ``kind`` (local / isolated), run once per session: the
    gRPC and Ray matrices compare against the same runs this module's matrix checks. Callers
    only read it."""
    key = (case, kind)
    if key not in _REFERENCE:
        shared = Path(SHARED_REFERENCES) / f"{case}-{kind}.pt" if SHARED_REFERENCES else None
        if shared is not None and shared.is_file():
            _REFERENCE[key] = torch.load(shared, weights_only=False)
        else:
            _REFERENCE[key] = outcome(run(tiny_config, case, kind, **CASES[case]))
            if shared is not None:  # written whole, then renamed: a reader never sees half
                tmp = shared.with_suffix(f".{os.getpid()}.tmp")
                torch.save(_REFERENCE[key], tmp)
                tmp.replace(shared)
    return _REFERENCE[key]


@pytest.mark.parametrize("case", sorted(CASES))
def test_local_and_isolated_engines_give_the_same_run(tiny_config, case):
    a = reference(tiny_config, case, "local")
    b = reference(tiny_config, case, "isolated")
    assert a[0] == b[0]  # every record: losses, lr, round outcomes, bytes, simulated time
    sa, sb = a[1], b[1]
    assert sa["sim_time_s"] == sb["sim_time_s"] and sa["bytes"] == sb["bytes"]
    assert sa["messages"] == sb["messages"] and sa["final"] == sb["final"]
    assert sa["costs"]["roles"] == sb["costs"]["roles"]  # FLOPs, bytes, time, energy per role
    assert a[2].keys() == b[2].keys()
    for role in a[2]:
        for k, v in a[2][role].items():
            assert torch.equal(v, b[2][role][k]), (role, k)


def test_splitfed_cohort_on_local_matches_isolated_to_float_precision(tiny_config):
    """The cohort is the local engine's business: same run as isolated up to float rounding."""
    case = {"paradigm": {"name": "splitfed", "options": {"cut": 1, "server_batch": "pooled"}},
            "devices": {"count": 3}, "train": {"steps": 8}}  # fmt: skip
    a = outcome(run(tiny_config, "cohort", "local", **case))
    b = outcome(run(tiny_config, "cohort", "isolated", **case))
    la = [r["loss"] for r in a[0] if r["event"] == "train"]
    lb = [r["loss"] for r in b[0] if r["event"] == "train"]
    assert la == pytest.approx(lb, abs=1e-5)
    assert a[1]["sim_time_s"] == b[1]["sim_time_s"] and a[1]["bytes"] == b[1]["bytes"]
    for k, v in a[2]["server"].items():
        torch.testing.assert_close(v, b[2]["server"][k], atol=1e-5, rtol=0)


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


@pytest.mark.parametrize("paradigm", ["splitfed", "splitfrozen"])
def test_isolated_split_devices_load_only_their_segment(tiny_config, monkeypatch, paradigm):
    """An isolated split device reads only the embeddings and its blocks (load_segment): every
    weight above its cut stays on the meta device, never materialised."""
    from cotune.paradigms import splitfrozen, splitting

    cls = splitting.SplitDevice if paradigm == "splitfed" else splitfrozen.FrozenDevice
    seen = []
    real = cls.__init__
    monkeypatch.setattr(cls, "__init__", lambda s, c: (real(s, c), seen.append(s))[0])
    options = {"cut": 1} if paradigm == "splitfed" else {"cuts": [1, 1]}
    run(tiny_config, f"seg-{paradigm}", "isolated", paradigm={"name": paradigm, "options": options})
    assert len(seen) == 2
    for dev in seen:
        model = dev.ctx.model.loaded.model
        anatomy = dev.ctx.model.loaded.anatomy
        params = dict(model.named_parameters())
        below = [k for k in params if anatomy.layer_of(k) == 0]
        above = [k for k in params if (anatomy.layer_of(k) or -1) >= 1]
        assert below and not any(params[k].is_meta for k in below)
        assert above and all(params[k].is_meta for k in above)


def test_local_engine_shares_one_model(tiny_config, monkeypatch):
    from cotune.paradigms import federated

    seen = []
    real = federated.FedDevice.__init__
    monkeypatch.setattr(
        federated.FedDevice, "__init__", lambda s, c: (real(s, c), seen.append(s))[0]
    )
    run(tiny_config, "shared", "local", paradigm=FED)
    assert seen[0].ctx.model.loaded.model is seen[1].ctx.model.loaded.model


RESUMABLE = [
    "central",
    "local",
    "fedavg",
    "hierfed",
    "fedbiot",
    "splitfed-pooled-global-clip",
    "split-p2p",
    "splitfrozen",
    "dlora-kill-revive",
    "hat-drafter",
    "hat-serve",
]  # one case per paradigm
# What the network engines (gRPC, Ray) must reproduce: every paradigm, and padding-free steps
# (turned on by each role's own train_step, in its own process). Next to hat-drafter: on Ray
# both run at the reference's thread count, so they share hosts (a new count restarts them).
_AT = RESUMABLE.index("hat-drafter") + 1
DEPLOYED = [
    *RESUMABLE[:_AT],
    "fedavg-padding-free",
    "splitfed-padding-free-accum",
    "splitfed-ushaped-accum",  # a server's request to a device inside its own handling
    "splitfed-ushaped-pooled",
    *RESUMABLE[_AT:],
]


@pytest.mark.parametrize(
    "case",
    [
        *RESUMABLE,
        "splitfed-padding-free-accum",
        "splitfed-pooled-accum",
        "splitfrozen-auto-nopipe-int8-accum",
        "splitfed-ushaped-accum",
    ],
)  # and gradient accumulation across a cut
def test_resume_on_isolated_equals_the_uninterrupted_run(tiny_config, case):
    """Every paradigm resumes on the isolated engine exactly (local: the paradigms' own tests)."""
    sections = {**CASES[case], "output": {"checkpoint_every": 2, "keep_checkpoints": 100}}
    whole = outcome(run(tiny_config, f"whole-{case}", "isolated", **sections))
    engine = {**sections.get("engine", {}), "kind": "isolated"}  # the case's codec stays
    cfg = tiny_config(name=f"part-{case}", **{**sections, "engine": engine})
    run_dir = run_experiment(cfg, quiet=True, report=False)
    first = checkpoints(run_dir)[0].parent.name  # the earliest mid-run checkpoint
    kill_after(run_dir, int(first.removeprefix("step-")))
    (run_dir / "summary.json").unlink()
    run_experiment(cfg, quiet=True, report=False, resume=True)
    part = outcome(run_dir)
    assert part[1]["sim_time_s"] == whole[1]["sim_time_s"]
    assert part[1]["final"] == whole[1]["final"]
    for role in whole[2]:
        for k, v in whole[2][role].items():
            assert torch.equal(v, part[2][role][k]), (role, k)


def test_staged_modula_run_is_the_same_on_both_engines(tiny_config):
    """peft.stages: each stage's grid builds its nodes from the model as the stage left it."""
    staged = {
        "peft": {"method": "modula", "options": {"num_experts": 3},
                 "stages": {"universal": 2, "domain": 2, "router": 2}},
        "partition": {"scheme": "shards", "classes_per_device": 1},
        "devices": {"count": 3},
        "paradigm": {"name": "fedavg", "options": {"local_steps": 1}},
    }  # fmt: skip
    a = outcome(run(tiny_config, "staged", "local", **staged))
    b = outcome(run(tiny_config, "staged", "isolated", **staged))
    assert a[0] == b[0] and a[1]["costs"]["roles"] == b[1]["costs"]["roles"]
    for k, v in a[2]["server"].items():
        assert torch.equal(v, b[2]["server"][k]), k


# ---------------------------------------------------------------- the contract, statically

SRC = Path(__file__).resolve().parents[2] / "src" / "cotune" / "paradigms"
# Every paradigm module (the options package, the config schema, is not a Grid module).
GRID_MODULES = sorted(p.name for p in SRC.glob("*.py") if p.name != "__init__.py")


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
        if isinstance(node, ast.Attribute) and node.attr in ("sim", "engine", "clock"):
            owner = node.value  # cfg.engine is the config section, not the engine
            name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
            assert name == "cfg", f"{module}:{node.lineno} .{node.attr}"


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
