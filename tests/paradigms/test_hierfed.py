import json

import numpy as np
import pytest
import torch

from cotune.build import build_experiment
from cotune.config import PartitionSection
from cotune.data import partition
from cotune.errors import ConfigError
from cotune.paradigms.hierfed_plan import (
    group_devices,
    group_divergence,
    label_histograms,
    plan_groups,
)
from cotune.run import run_experiment
from tests.paradigms.test_central_local import (
    final_params,
    records,
    resumed_without_final_checkpoint,
)


def hier(tiny_config, name, devices=2, **options):
    return tiny_config(
        name=name,
        paradigm={"name": "hierfed", "options": options},
        devices={"count": devices},
    )


def test_one_group_tau_one_full_depth_equals_fedavg(tiny_config):
    f = run_experiment(
        tiny_config(name="f", paradigm={"name": "fedavg", "options": {"local_steps": 2}}),
        quiet=True,
        report=False,
    )
    h = run_experiment(
        hier(tiny_config, "h", num_groups=1, local_steps=2, controller="fixed"),
        quiet=True,
        report=False,
    )
    pf, ph = final_params(f)["server"], final_params(h)["server"]
    for k in pf:
        torch.testing.assert_close(ph[k], pf[k], atol=1e-6, rtol=0)
    f_loss = [r["loss"] for r in records(f, "train", "mean")]
    h_loss = [r["loss"] for r in records(h, "train", "mean")]
    assert h_loss == pytest.approx(f_loss, abs=1e-6)


def test_balanced_grouping_is_closer_to_the_global_mix_than_random():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=600).tolist()
    cfg = PartitionSection(scheme="dirichlet", alpha=0.3, min_size=5)
    parts = partition(labels, 20, cfg, seed=3)
    hists = label_histograms(parts, labels)
    balanced = group_devices(hists, 4, "balanced", seed=0)
    assert sorted(i for g in balanced for i in g) == list(range(20))
    assert all(balanced)
    bal = np.mean(group_divergence(balanced, hists))
    rand = [
        np.mean(group_divergence(group_devices(hists, 4, "random", s), hists)) for s in range(5)
    ]
    assert bal < min(rand)
    assert bal < 0.5 * np.mean(rand)


def test_depth_trains_only_the_top_blocks_and_costs_fewer_flops(tiny_config):
    one = {"train": {"steps": 2}, "eval": {"every": 2}}
    full = run_experiment(
        tiny_config(
            name="full",
            paradigm={
                "name": "hierfed",
                "options": {"num_groups": 1, "controller": "fixed", "local_steps": 1},
            },
            **one,
        ),
        quiet=True,
        report=False,
    )
    top_cfg = tiny_config(
        name="top",
        paradigm={
            "name": "hierfed",
            "options": {"num_groups": 1, "controller": "fixed", "local_steps": 1, "depth": 1},
        },
        **one,
    )
    top = run_experiment(top_cfg, quiet=True, report=False)
    p_top, p_full = final_params(top)["server"], final_params(full)["server"]
    lower = [k for k in p_top if ".layer.0." in k]
    upper = [k for k in p_top if ".layer.1." in k or k.startswith("classifier")]
    assert lower and upper
    exp, _ = build_experiment(top_cfg, top, quiet=True)  # the same seeded initial adapter
    init = exp.initial_params()
    for k in lower:  # bit for bit the initial values; full depth did train them
        assert torch.equal(p_top[k], init[k])
    assert any(not torch.equal(p_full[k], init[k]) for k in lower)
    assert any(not torch.equal(p_top[k], p_full[k]) for k in upper)
    s_top = json.loads((top / "summary.json").read_text())
    s_full = json.loads((full / "summary.json").read_text())
    assert 0 < s_top["costs"]["devices"]["flops"] < s_full["costs"]["devices"]["flops"]
    assert s_top["costs"]["devices"]["bytes_up"] < s_full["costs"]["devices"]["bytes_up"]
    assert s_top["costs"]["device_peak_memory_bytes"] < s_full["costs"]["device_peak_memory_bytes"]
    assert [g["depth"] for g in s_top["extra"]["groups"]] == [1]


def test_balanced_controller_rule():
    speed = {0: 1.0, 1: 4.0, 2: 1.0}  # group 1 is four times slower

    def round_s(members, d):
        return speed[members[0]] * (1.0 + 2.0 * d / 4)

    groups = [[0], [1], [2]]
    plans = plan_groups(groups, round_s, controller="balanced", tau=4, depth=4, min_depth=1)
    # Budget = mean full-depth round = (3 + 12 + 3) / 3 = 6: the slow group drops to depth 1
    # (6 s), the fast ones keep depth 4 and fit two group rounds (2 x 3 s).
    assert [(p.tau, p.depth) for p in plans] == [(2, 4), (1, 1), (2, 4)]
    fixed = plan_groups(groups, round_s, controller="fixed", tau=3, depth=2, min_depth=1)
    assert [(p.tau, p.depth) for p in fixed] == [(3, 2)] * 3


def test_heterogeneous_fleet_runs_with_edge_roles(tiny_config):
    cfg = tiny_config(
        name="ctl",
        paradigm={
            "name": "hierfed",
            "options": {"num_groups": 2, "grouping": "random", "local_steps": 1},
        },
        devices={"count": 4, "profiles": ["phone-low", "jetson", "phone-low", "jetson"]},
        train={"steps": 2},
    )
    run_dir = run_experiment(cfg, quiet=True, report=False)
    groups = json.loads((run_dir / "summary.json").read_text())["extra"]["groups"]
    assert len(groups) == 2
    assert all(r["reported"] > 0 for r in records(run_dir, "group"))
    summary = json.loads((run_dir / "summary.json").read_text())
    roles = summary["costs"]["roles"]
    assert roles["edge-0"]["profile"] == "jetson"
    # Edge ↔ cloud traffic is reported apart from the device links, and adds up exactly.
    edges = [r for r in roles if r.startswith("edge-")]
    to_cloud = (
        sum(roles[e]["bytes_up"] for e in edges)
        - sum(roles[d]["bytes_down"] for d in roles if d.startswith("device-"))
        + roles["server"]["bytes_up"]
    )
    assert summary["bytes"]["backhaul"] == to_cloud > 0


@pytest.mark.parametrize(
    "groups, examples, match",
    [
        ({"1000000000": 5}, 10, r"meta 'groups' must map ids of the run's 3 labels"),
        ({"0": -3}, 10, r"meta 'groups' must map"),
        ([1, 2], 10, r"meta 'groups' must map"),
        (None, "many", r"meta 'examples' is 'many', expected a finite number"),
        (None, 0, r"meta 'examples' must be positive"),
    ],
)
def test_a_devices_bad_description_is_refused_naming_it(tiny_config, monkeypatch, groups,
                                                        examples, match):  # fmt: skip
    """What a device describes of its data plans the groups: a class id far beyond the run's
    labels would have the cloud allocate a histogram that wide; refused with a clear error."""
    from cotune.errors import ProtocolError
    from cotune.paradigms import hierfed_roles

    real = hierfed_roles.HierDevice.on_describe

    def on_describe(self, msg):
        out = real(self, msg)
        if self.role_id == "device-1":
            out.meta.update(groups=groups, examples=examples)
        return out

    monkeypatch.setattr(hierfed_roles.HierDevice, "on_describe", on_describe)
    cfg = tiny_config(name="bad-describe", train={"steps": 2},
                      paradigm={"name": "hierfed", "options": {"num_groups": 1, "local_steps": 1}})  # fmt: skip
    with pytest.raises(ProtocolError, match=r"'description' from 'device-1'.*" + match):
        run_experiment(cfg, quiet=True, report=False)


@pytest.mark.parametrize(
    ("options", "devices", "match"),
    [
        ({"depth": 3}, 2, r"paradigm.options.depth: 3 exceeds the model's 2 blocks"),
        ({"num_groups": 3}, 2, r"paradigm.options.num_groups: 3 groups for 2 devices"),
        ({"edge_profile": "toaster"}, 2, r"paradigm.options.edge_profile"),
        ({"tua": 2}, 2, r"paradigm.options.tua: unknown option"),
    ],
)
def test_bad_options_name_the_option(tiny_config, options, devices, match):
    with pytest.raises(ConfigError, match=match):
        run_experiment(
            hier(tiny_config, "bad", devices=devices, **options), quiet=True, report=False
        )


def test_resume_mid_run_equals_uninterrupted(tiny_config):
    cfg = tiny_config(
        name="res",
        paradigm={
            "name": "hierfed",
            "options": {"local_steps": 1, "controller": "fixed", "depth": 1},
        },
        devices={"count": 2},
        train={"steps": 4},
        output={"checkpoint_every": 2, "keep_checkpoints": 100},
    )
    full = run_experiment(cfg, quiet=True, report=False)
    want = final_params(full)["server"]
    resumed = resumed_without_final_checkpoint(cfg, full)
    got = final_params(resumed)["server"]
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=0, rtol=0)
    assert [r["round"] for r in records(resumed, "round")] == [1, 2, 3, 4]
