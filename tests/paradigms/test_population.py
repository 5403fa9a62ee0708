"""A large population: roles exist once used, a reset device keeps only its RNG and sampler
between rounds, and neither changes a single number of the run."""

import json

import pytest
import torch

from cotune.paradigms import federated
from cotune.run import run_experiment
from cotune.runtime.engine_grid import EngineGrid
from tests.paradigms.test_central_local import (
    final_params,
    records,
    resumed_without_final_checkpoint,
)


def population(tiny_config, name, **options):
    return tiny_config(
        name=name,
        data={"max_examples": 1200},
        devices={"count": 600},
        paradigm={"name": "fedavg", "options": {"clients_per_round": 3, "local_steps": 1,
                                                "optimizer_state": "reset", **options}},
        train={"steps": 4, "batch_size": 2},
        eval={"every": 2},
        output={"checkpoint_every": 2, "keep_checkpoints": 10},
    )  # fmt: skip


def eager_start(self, role_id, factory):
    """What ``EngineGrid.start`` did before roles were built on first use."""
    self._pending[role_id] = factory
    self._role(role_id)


def losses(run):
    return [r["loss"] for r in records(run, "train", "mean")]


def test_lazy_roles_and_released_states_change_nothing(tiny_config, monkeypatch):
    built = []
    init = federated.FedDevice.__init__

    def counting(self, ctx):
        built.append(ctx.node_id)
        init(self, ctx)

    monkeypatch.setattr(federated.FedDevice, "__init__", counting)
    lazy = run_experiment(population(tiny_config, "lazy"), quiet=True, report=False)
    assert len(set(built)) == len(built) <= 4 * 3  # 4 rounds x 3 devices, of 600
    summary = json.loads((lazy / "summary.json").read_text())
    assert summary["costs"]["idle_devices"] == 600 - len(built)
    # The mid-run checkpoint (after round 2) holds the server and the devices used so far.
    ckpt = sorted((lazy / "checkpoints").iterdir())[0]
    held = torch.load(ckpt / "state.pt", weights_only=False)["states"]
    devices = set(held) - {"server"}
    assert "server" in held and devices <= set(built) and 0 < len(devices) <= 2 * 3
    # A reset device's adapter is let go after each round: only its RNG and sampler stay.
    assert all(held[d]["params"] == {} and held[d]["sampler"] is not None for d in devices)

    built.clear()
    monkeypatch.setattr(EngineGrid, "start", eager_start)
    monkeypatch.setattr(federated.FedDevice, "release_between_rounds", False)
    eager = run_experiment(population(tiny_config, "eager"), quiet=True, report=False)
    assert len(built) == 600
    assert losses(eager) == losses(lazy)
    a, b = final_params(lazy)["server"], final_params(eager)["server"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


@pytest.mark.parametrize("options", [{}, {"prox_mu": 0.1}, {"cohort": True}])
def test_resume_with_released_states_equals_uninterrupted(tiny_config, options):
    cfg = population(tiny_config, "res", **options)
    full = run_experiment(cfg, quiet=True, report=False)
    want = final_params(full)["server"]
    resumed = resumed_without_final_checkpoint(cfg, full)
    got = final_params(resumed)["server"]
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=0, rtol=0)
