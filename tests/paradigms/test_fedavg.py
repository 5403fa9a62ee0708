import json
import math

import pytest
import torch

from cotune.errors import ConfigError
from cotune.run import run_experiment
from tests.paradigms.test_central_local import (
    final_params,
    records,
    resumed_without_final_checkpoint,
)


def fed(tiny_config, name, devices=2, **options):
    return tiny_config(
        name=name,
        paradigm={"name": "fedavg", "options": options},
        devices={"count": devices},
    )


def test_one_device_one_local_step_equals_central(tiny_config):
    c = run_experiment(tiny_config(name="c", devices={"count": 1}), quiet=True, report=False)
    f = run_experiment(fed(tiny_config, "f", devices=1, local_steps=1), quiet=True, report=False)
    c_loss = [r["loss"] for r in records(c, "train", "server")]
    f_loss = [r["loss"] for r in records(f, "train", "mean")]
    assert len(c_loss) == len(f_loss) == 6
    assert f_loss == pytest.approx(c_loss, abs=1e-6)
    pc, pf = final_params(c)["server"], final_params(f)["server"]
    for k in pc:
        torch.testing.assert_close(pf[k], pc[k], atol=1e-6, rtol=0)


def test_global_is_the_sample_weighted_mean_of_device_updates(tiny_config):
    # Each fedavg device starts from the same init as a local device with the same seed and
    # shard, so one local step of `local` gives exactly the updates fedavg averages.
    one = {"train": {"steps": 1}, "eval": {"every": 1}}
    lo = run_experiment(
        tiny_config(name="l", paradigm={"name": "local"}, partition={"scheme": "quantity"}, **one),
        quiet=True,
        report=False,
    )
    f = run_experiment(
        tiny_config(
            name="f",
            paradigm={"name": "fedavg", "options": {"local_steps": 1}},
            partition={"scheme": "quantity"},
            **one,
        ),
        quiet=True,
        report=False,
    )
    sizes = json.loads((f / "summary.json").read_text())["partition"]["sizes"]
    assert sizes[0] != sizes[1]
    dev = final_params(lo)
    glob = final_params(f)["server"]
    w0, w1 = sizes[0] / sum(sizes), sizes[1] / sum(sizes)
    for k in glob:
        want = w0 * dev["device-0"][k] + w1 * dev["device-1"][k]
        torch.testing.assert_close(glob[k], want, atol=1e-6, rtol=1e-5)


def test_dropped_devices_do_not_stall_or_corrupt_rounds(tiny_config):
    cfg = tiny_config(
        name="drop",
        paradigm={"name": "fedavg", "options": {"local_steps": 1}},
        devices={"count": 4, "availability": {"kind": "random", "drop_p": 0.5}},
        train={"steps": 6},
    )
    run_dir = run_experiment(cfg, quiet=True, report=False)
    rounds = records(run_dir, "round")
    assert len(rounds) == 6
    assert sum(r["dropped"] for r in rounds) > 0
    assert all(r["reported"] + r["dropped"] == r["participants"] for r in rounds)
    # A dropped device downloaded the model but never uploaded: fewer bytes up than down.
    assert any(r["bytes_up"] < r["bytes_down"] for r in rounds if r["dropped"])
    for v in final_params(run_dir)["server"].values():
        assert torch.isfinite(v).all()


def test_deadline_leaves_the_straggler_out(tiny_config):
    cfg = tiny_config(
        name="dl",
        # Adapter messages are ~11 KB: the laptop's round trip takes ~0.05 s, phone-low's ~0.15 s.
        paradigm={"name": "fedavg", "options": {"local_steps": 1, "deadline_s": 0.1}},
        devices={"count": 2, "profiles": ["laptop-cpu", "phone-low"]},
        train={"steps": 2},
    )
    run_dir = run_experiment(cfg, quiet=True, report=False)
    rounds = records(run_dir, "round")
    assert [r["reported"] for r in rounds] == [1, 1]
    assert [r["dropped"] for r in rounds] == [1, 1]


@pytest.mark.parametrize(
    "options",
    [
        {"aggregator": "fedadam", "aggregator_options": {"eta": 0.01}},
        {"aggregator": "fedavgm", "aggregator_options": {"momentum": 0.9}},
        {"aggregator": "median"},
        {"prox_mu": 0.1, "optimizer_state": "reset", "fraction": 0.5},
    ],
)
def test_server_optimizers_and_fedprox_train(tiny_config, options):
    run_dir = run_experiment(
        fed(tiny_config, "o", devices=3, local_steps=2, **options), quiet=True, report=False
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert 0.0 <= summary["final"]["accuracy"] <= 1.0
    assert summary["sim_time_s"] > 0 and summary["costs"]["devices"]["flops"] > 0


def test_costs_and_sim_time_are_reported(tiny_config):
    run_dir = run_experiment(
        fed(tiny_config, "cost", devices=2, local_steps=3), quiet=True, report=False
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    roles = summary["costs"]["roles"]
    assert roles["device-0"]["profile"] == "phone-mid" and roles["server"]["profile"] == "a100"
    assert roles["device-0"]["memory_bytes"] > 0 and roles["device-0"]["memory_fits"]
    # Bytes in the cost table come from the same encoded messages the engine counted.
    assert summary["bytes"]["up"] == sum(
        r["bytes_up"] for k, r in roles.items() if k.startswith("device")
    )
    assert (run_dir / "costs.csv").read_text().startswith("role,profile,flops")
    evals = records(run_dir, "eval")
    assert all(r["sim_time_s"] > 0 for r in evals)


def test_unknown_option_names_the_field(tiny_config):
    with pytest.raises(ConfigError, match=r"paradigm.options.local_stepz: unknown option"):
        run_experiment(fed(tiny_config, "bad", local_stepz=3), quiet=True, report=False)
    with pytest.raises(ConfigError, match="aggregator"):
        run_experiment(fed(tiny_config, "bad2", aggregator="fedmagic"), quiet=True, report=False)


def test_resume_mid_run_equals_uninterrupted(tiny_config):
    cfg = tiny_config(
        name="res",
        paradigm={
            "name": "fedavg",
            "options": {"local_steps": 2, "fraction": 0.5, "aggregator": "fedadam"},
        },
        devices={"count": 3},
        train={"steps": 8},
        output={"checkpoint_every": 4, "keep_checkpoints": 100},
    )
    full = run_experiment(cfg, quiet=True, report=False)
    want = final_params(full)["server"]
    want_summary = json.loads((full / "summary.json").read_text())
    resumed = resumed_without_final_checkpoint(cfg, full)
    got = final_params(resumed)["server"]
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=0, rtol=0)
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["sim_time_s"] == pytest.approx(want_summary["sim_time_s"], rel=1e-12)
    assert [r["round"] for r in records(resumed, "round")] == [1, 2, 3, 4]


def test_simulated_time_and_bytes_are_deterministic(tiny_config):
    a = run_experiment(
        fed(tiny_config, "da", devices=3, local_steps=2, fraction=0.7), quiet=True, report=False
    )
    b = run_experiment(
        fed(tiny_config, "db", devices=3, local_steps=2, fraction=0.7), quiet=True, report=False
    )
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["sim_time_s"] == sb["sim_time_s"] and sa["bytes"] == sb["bytes"]
    assert sa["costs"]["roles"] == sb["costs"]["roles"]


def test_dispatch_shaper_batches_reports(tiny_config):
    def rounds_of(name, **availability):
        cfg = tiny_config(
            name=name,
            paradigm={"name": "fedavg", "options": {"local_steps": 1, "quorum": 2}},
            devices={
                "count": 4,
                "profiles": ["laptop-cpu", "phone-mid", "phone-low", "jetson"],
                "availability": availability,
            },
            train={"steps": 2},
        )
        return records(run_experiment(cfg, quiet=True, report=False), "round")

    plain = rounds_of("plain")
    batched = rounds_of("batched", dispatch_batch=3)
    # With a quorum of 2 a plain round closes at the second report; released three at a time,
    # the two fastest reports wait for the third, so every round closes later.
    assert [r["reported"] for r in plain] == [2, 2]
    assert [r["reported"] for r in batched] == [3, 3]
    dropping = rounds_of("dropping", dispatch_batch=1, dispatch_drop_p=0.5)
    assert sum(r["dropped"] for r in dropping) > 0


def test_periodic_availability_and_stragglers(tiny_config):
    cfg = tiny_config(
        name="per",
        paradigm={"name": "fedavg", "options": {"local_steps": 1}},
        devices={
            "count": 4,
            "availability": {
                "kind": "periodic",
                "period_s": 0.4,
                "on_fraction": 0.5,
                "stagger": True,
                "straggler_fraction": 0.5,
                "straggler_slowdown": [3.0, 3.0],
            },
        },
        train={"steps": 6},
    )
    rounds = records(run_experiment(cfg, quiet=True, report=False), "round")
    # Only devices online at a round's start are sampled, so rounds have fewer than 4.
    assert any(r["participants"] < 4 for r in rounds)
    assert all(r["reported"] + r["dropped"] == r["participants"] for r in rounds)


def test_local_epochs(tiny_config):
    cfg = fed(tiny_config, "ep", devices=2, local_epochs=0.5, rounds=2)
    run_dir = run_experiment(cfg, quiet=True, report=False)
    sizes = json.loads((run_dir / "summary.json").read_text())["partition"]["sizes"]
    steps_per_round = max(math.ceil(0.5 * math.ceil(s / 8)) for s in sizes)
    assert [r["round"] for r in records(run_dir, "round")] == [1, 2]
    assert max(r["step"] for r in records(run_dir, "train")) == 2 * steps_per_round
    with pytest.raises(ConfigError, match="local_epochs needs rounds"):
        run_experiment(fed(tiny_config, "ep2", local_epochs=1.0), quiet=True, report=False)
