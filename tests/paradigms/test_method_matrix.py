"""Every registered PEFT method through every paradigm: trains, aggregates, saves."""

import json

import pytest
import torch

from cotune.peft import available_methods
from cotune.run import latest_checkpoint, run_experiment

PARADIGM_OPTIONS = {
    "central": {},
    "local": {},
    "fedavg": {"local_steps": 1},
    "splitfed": {"cut": 1, "aggregate_every": 1},
}
# Methods that need more than a rank to start (a warm-up corpus, domain labels, ...) run in
# their own tests; everything else is held to the same checks here.
SPECIAL = {"d2lora", "gelora", "modula", "mosld"}
METHODS = [m for m in available_methods() if m not in SPECIAL]
# Options a method needs on the 2-layer test model (GGM: 16 candidate components, not 360).
METHOD_OPTIONS = {"ggm": {"important_nodes": 3, "kept_nodes": 6, "warmup_steps": 3}}


@pytest.mark.parametrize("paradigm", sorted(PARADIGM_OPTIONS))
@pytest.mark.parametrize("method", METHODS)
def test_method_runs_in_paradigm(tiny_config, method, paradigm):
    cfg = tiny_config(
        name=f"{method}-{paradigm}",
        peft={"method": method, "options": METHOD_OPTIONS.get(method, {})},
        paradigm={"name": paradigm, "options": PARADIGM_OPTIONS[paradigm]},
        train={"steps": 2},
        eval={"every": 2, "max_examples": 16},
    )
    run_dir = run_experiment(cfg, quiet=True, report=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["loss"] == pytest.approx(summary["final"]["loss"])  # not NaN
    states = torch.load(latest_checkpoint(run_dir), weights_only=False)["states"]
    for state in states.values():
        for name, t in state["params"].items():
            assert torch.isfinite(t).all(), name
    assert any((run_dir / "adapter").rglob("adapter_config.json"))
