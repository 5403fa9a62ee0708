import json

import pytest
import torch

from cotune.errors import ConfigError
from cotune.run import run_experiment
from tests.paradigms.test_central_local import final_params, kill_after, records


def dl(tiny_config, name, **options):
    return tiny_config(
        name=name,
        paradigm={"name": "dlora", "options": options},
        train={"steps": 4},
        eval={"every": 4},
    )


def test_all_modules_active_equals_local_training(tiny_config):
    # Cloud/device split of every LoRA branch, forward and backward through messages, is the
    # same computation as training the whole model locally.
    lo = run_experiment(
        tiny_config(name="lo", paradigm={"name": "local"}, train={"steps": 4}, eval={"every": 4}),
        quiet=True,
        report=False,
    )
    d = run_experiment(dl(tiny_config, "d", active_fraction=1.0), quiet=True, report=False)
    lo_loss = [r["loss"] for r in records(lo, "train", "mean")]
    d_loss = [r["loss"] for r in records(d, "train", "mean")]
    assert d_loss == pytest.approx(lo_loss, abs=1e-5)
    pl, pd = final_params(lo), final_params(d)
    for role in ("device-0", "device-1"):
        for k in pl[role]:
            torch.testing.assert_close(pd[role][k], pl[role][k], atol=1e-5, rtol=1e-4)


def test_kill_cuts_device_traffic_and_flops(tiny_config):
    full = run_experiment(dl(tiny_config, "full", active_fraction=1.0), quiet=True, report=False)
    kr = run_experiment(
        dl(tiny_config, "kr", active_fraction=0.25, kill_every=1, revive_every=100),
        quiet=True,
        report=False,
    )
    fractions = [r["active_fraction"] for r in records(kr, "train", "mean")]
    assert fractions == [1.0, 0.25, 0.25, 0.25]  # 4 modules; killed to 1 after the first step
    sf, sk = (json.loads((d / "summary.json").read_text()) for d in (full, kr))
    assert sk["bytes"]["total"] < 0.6 * sf["bytes"]["total"]
    assert sk["costs"]["devices"]["flops"] < sf["costs"]["devices"]["flops"]
    assert len(sk["extra"]["active_modules"]["device-0"]) == 1
    p0 = final_params(kr)["device-0"]
    assert all(torch.isfinite(v).all() for v in p0.values())


def test_revive_brings_modules_back(tiny_config):
    run_dir = run_experiment(
        dl(tiny_config, "rv", active_fraction=0.25, kill_every=2, revive_every=3, revive_count=2),
        quiet=True,
        report=False,
    )
    fractions = [r["active_fraction"] for r in records(run_dir, "train", "mean")]
    # Killed to 1 of 4 after step 2, two revived after step 3 (the fraction a step trained with).
    assert fractions == [1.0, 1.0, 0.25, 0.75]


def test_bad_input_names_the_option(tiny_config):
    with pytest.raises(ConfigError, match=r"paradigm.options.active_fraction"):
        run_experiment(dl(tiny_config, "b1", active_fraction=0.0), quiet=True, report=False)
    with pytest.raises(ConfigError, match=r"peft.method: dlora"):
        run_experiment(
            tiny_config(name="b2", paradigm={"name": "dlora"}, peft={"method": "dora"}),
            quiet=True,
            report=False,
        )


@pytest.fixture
def engines(monkeypatch):
    """Every LocalEngine a run builds, so a test can read its transfer log."""
    from cotune.runtime.local import LocalEngine

    made = []
    original = LocalEngine.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(LocalEngine, "__init__", init)
    return made


@pytest.mark.parametrize("score", ["ema_grad_weight", "delta"])
def test_killed_modules_cost_no_bytes_and_revived_ones_come_back(tiny_config, engines, score):
    cfg = dl(
        tiny_config,
        f"k-{score}",
        active_fraction=0.25,
        kill_every=1,
        revive_every=3,
        revive_count=1,
        revive="stale",
        score=score,
    )
    run_experiment(cfg, quiet=True, report=False)
    transfers = engines[-1].transfers
    layers_by_step: dict[int, set[str]] = {}
    step = 0
    for t in transfers:
        if t.kind == "forward" and t.sender == "device-0":
            step += 1
        if t.kind == "lora_fwd" and t.receiver == "device-0":
            layers_by_step.setdefault(step, set()).add(t.meta["layer"])
    # Step 1 runs all 4 modules; then 1 stays active; the revive after step 3 brings one back.
    assert len(layers_by_step[1]) == 4
    assert len(layers_by_step[2]) == len(layers_by_step[3]) == 1
    assert len(layers_by_step[4]) == 2
    killed_first = sorted(layers_by_step[1] - layers_by_step[2])[0]
    assert killed_first in layers_by_step[4]  # "stale": the longest-killed module returns


def test_embedding_in_the_cloud_is_the_same_computation_but_ships_tokens(tiny_config):
    dev = run_experiment(dl(tiny_config, "ed", embed="device"), quiet=True, report=False)
    cloud = run_experiment(dl(tiny_config, "ec", embed="cloud"), quiet=True, report=False)
    ld = [r["loss"] for r in records(dev, "train", "mean")]
    lc = [r["loss"] for r in records(cloud, "train", "mean")]
    assert lc == pytest.approx(ld, abs=1e-6)
    sd, sc = (json.loads((d / "summary.json").read_text()) for d in (dev, cloud))
    # Token ids (int64) are smaller than hidden states, and the device no longer holds the
    # embedding table: the privacy default costs bytes and memory.
    assert sc["bytes"]["up"] < sd["bytes"]["up"]
    assert sc["costs"]["device_peak_memory_bytes"] < sd["costs"]["device_peak_memory_bytes"]


def test_resume_mid_run_equals_uninterrupted(tiny_config, monkeypatch):
    """Kill-and-Revive's state (active and killed modules, scores, the revive RNG) is in the
    checkpoint: a run killed mid-way ends exactly as the uninterrupted one."""
    cfg = tiny_config(
        name="dres",
        paradigm={"name": "dlora", "options": {"active_fraction": 0.25, "kill_every": 1,
                                                "revive_every": 3, "revive_count": 1}},
        train={"steps": 8},
        eval={"every": 2, "max_examples": 16},
        output={"checkpoint_every": 2, "keep_checkpoints": 100},
    )  # fmt: skip
    full = run_experiment(cfg, quiet=True, report=False)
    want = final_params(full)
    before = json.loads((full / "summary.json").read_text())
    fractions = [r["active_fraction"] for r in records(full, "train", "mean")]
    assert 0.25 in fractions and len(set(fractions)) > 1  # modules were killed and revived
    kill_after(full, 4)
    (full / "summary.json").unlink()
    from cotune.paradigms import dlora

    steps, real = [], dlora.DLoRADevice._step
    monkeypatch.setattr(dlora.DLoRADevice, "_step", lambda self: steps.append(1) or real(self))
    resumed = run_experiment(cfg, resume=True, quiet=True, report=False)
    assert len(steps) == 2 * 4  # two devices, steps 5..8 only
    got = final_params(resumed)
    for role in ("device-0", "device-1"):
        for k in want[role]:
            assert torch.equal(got[role][k], want[role][k]), (role, k)
    after = json.loads((resumed / "summary.json").read_text())
    assert after["extra"]["active_modules"] == before["extra"]["active_modules"]
    assert after["sim_time_s"] == pytest.approx(before["sim_time_s"])
    assert after["bytes"] == before["bytes"]
    assert [r["active_fraction"] for r in records(resumed, "train", "mean")] == fractions


def test_gradient_checkpointing_leaves_the_cloud_its_activations(tiny_config, caplog):
    """The cloud's blocks call the devices' LoRA branches: recomputing a block in the backward
    would ask the device again (and crashed: the recompute ran unpatched layers). With
    train.gradient_checkpointing on, the cloud keeps its activations (logged) and the run is
    the one without it."""

    def cfg(name, **train):
        return tiny_config(
            name=name,
            paradigm={"name": "dlora", "options": {"active_fraction": 0.5, "kill_every": 2}},
            train={"steps": 4, **train},
            eval={"every": 4},
        )

    plain = run_experiment(cfg("plain"), quiet=True, report=False)
    with caplog.at_level("INFO", logger="cotune.paradigms.dlora_cloud"):
        ckpt = run_experiment(cfg("ckpt", gradient_checkpointing=True), quiet=True, report=False)
    assert "without gradient checkpointing" in caplog.text
    assert [r["loss"] for r in records(ckpt, "train", "mean")] == [
        r["loss"] for r in records(plain, "train", "mean")
    ]
    pp, pc = final_params(plain), final_params(ckpt)
    for role in pp:
        for k in pp[role]:
            assert torch.equal(pc[role][k], pp[role][k]), (role, k)


@pytest.mark.parametrize("method", ["pissa", "olora", "kasa"])
def test_every_branch_method_with_all_modules_active_equals_local_training(tiny_config, method):
    """A method whose layer is base + an A/B branch runs in dlora as LoRA does: PiSSA and OLoRA
    rewrite the base (the cloud's and the device's alike), KaSA adds its regularizer on the
    device. With every module active, the same computation as training the model locally."""
    peft = {"method": method}
    lo = run_experiment(
        tiny_config(name=f"lo-{method}", paradigm={"name": "local"}, peft=peft,
                    train={"steps": 4}, eval={"every": 4}),
        quiet=True, report=False,
    )  # fmt: skip
    d = run_experiment(
        tiny_config(name=f"d-{method}", paradigm={"name": "dlora", "options": {
            "active_fraction": 1.0}}, peft=peft, train={"steps": 4}, eval={"every": 4}),
        quiet=True, report=False,
    )  # fmt: skip
    lo_loss = [r["loss"] for r in records(lo, "train", "mean")]
    assert [r["loss"] for r in records(d, "train", "mean")] == pytest.approx(lo_loss, abs=1e-5)
    pl, pd = final_params(lo), final_params(d)
    for role in ("device-0", "device-1"):
        assert pl[role].keys() == pd[role].keys()
        for k in pl[role]:
            torch.testing.assert_close(pd[role][k], pl[role][k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["dora", "bora", "mosld"])
def test_methods_that_are_not_a_branch_are_refused_naming_the_ones_that_are(tiny_config, method):
    with pytest.raises(ConfigError, match=f"peft.method: .*'{method}' cannot.*supported: .*pissa"):
        tiny_config(name="x", paradigm={"name": "dlora"}, peft={"method": method})
