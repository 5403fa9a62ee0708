"""A divergence in a split run names the role it happened in, on devices alone or in a cohort
(their update runs in a local event, not a message handler) and on the server."""

import pytest

from cotune.errors import DivergenceError
from cotune.run import run_experiment

DIVERGE = {"lr": 1e30, "max_grad_norm": None, "warmup_steps": 0, "schedule": "constant"}


@pytest.mark.parametrize("name,options", [
    ("splitfed", {"cohort": False}),
    ("splitfed", {"cohort": True}),
    ("splitfed", {"server_batch": "pooled"}),
    ("splitfrozen", {}),
])  # fmt: skip
def test_a_split_divergence_names_its_role(tiny_config, name, options):
    cfg = tiny_config(train={"steps": 4, **DIVERGE}, paradigm={"name": name, "options": options})
    with pytest.raises(DivergenceError, match=r"in role '(server|device-\d)'"):
        run_experiment(cfg, quiet=True, report=False)
