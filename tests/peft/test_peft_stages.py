"""Staged MoDULA/MoSLD runs (`peft.stages`): one run chains the stages through any paradigm."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cotune.aggregation import Aggregator
from cotune.config import config_from_dict
from cotune.errors import ConfigError, ProtocolError
from tests.paradigms.test_central_local import kill_after

from ..conftest import tiny_config_dict

DOMAINS = {"partition": {"scheme": "shards", "classes_per_device": 1}, "devices": {"count": 3}}


def staged(tmp_path, stages, paradigm="central", options=None, **sections):
    d = tiny_config_dict(
        tmp_path,
        name=f"staged-{paradigm}-{'-'.join(map(str, stages.values()))}",
        peft={"method": "modula", "options": {"num_experts": 3, **(options or {})}},
        paradigm={"name": paradigm, "options": {"local_steps": 1} if paradigm == "fedavg" else {}},
        **{"eval": {"every": 2, "max_examples": 16}, **DOMAINS, **sections},
    )
    d["peft"]["stages"] = stages
    d["train"].pop("steps")  # the stages decide
    return config_from_dict(d)


def run(cfg):
    from cotune.run import run_experiment

    run_dir = run_experiment(cfg, quiet=True, report=False)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, records, load_file(run_dir / "adapter" / "adapter_model.safetensors")


def kinds_moved(tensors, like):
    """Which parts of a MoDULA adapter left their zero init (B matrices and the router)."""
    moved = {k for k, v in tensors.items() if like in k and v.abs().sum() > 0}
    return moved


def test_universal_only_stages_equal_a_plain_universal_run(tmp_path):
    cfg = staged(tmp_path, {"universal": 4, "domain": 0, "router": 0})
    assert cfg.train.steps == 4
    _, recs, staged_w = run(cfg)
    plain = config_from_dict(
        {**cfg.to_dict(), "name": "plain", "peft": {**cfg.to_dict()["peft"], "stages": None}}
    )
    _, plain_recs, plain_w = run(plain)
    losses = [(r["step"], r["loss"]) for r in recs if r["event"] == "train"]
    assert losses == [(r["step"], r["loss"]) for r in plain_recs if r["event"] == "train"]
    assert {r["stage"] for r in recs} == {"universal"}
    assert staged_w.keys() == plain_w.keys()
    assert all(torch.equal(staged_w[k], plain_w[k]) for k in plain_w)


def test_three_stages_in_one_central_run(tmp_path):
    run_dir, recs, w = run(staged(tmp_path, {"universal": 2, "domain": 2, "router": 2}))
    train = [(r["step"], r["stage"]) for r in recs if r["event"] == "train"]
    assert train == [(1, "universal"), (2, "universal"), (3, "domain"), (4, "domain")] + [
        (5, "router"),
        (6, "router"),
    ]  # steps counted across stages
    assert [r["stage"] for r in recs if r["event"] == "eval"] == ["universal", "domain", "router"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and [s["stage"] for s in summary["extra"]["stages"]] == [
        "universal",
        "domain",
        "router",
    ]
    devices = summary["extra"]["domains"]["devices"]
    assert sorted(devices.values()) == [0, 1, 2]  # one domain per device: one expert each
    # Every part trained in its stage: universal B, each domain expert's B, the router.
    uni = {k for k in kinds_moved(w, "lora_B") if "lora_domain" not in k}
    assert uni and all(kinds_moved(w, f"lora_domain.{d}.lora_B") for d in range(3))
    assert kinds_moved(w, "lora_router")
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["modula_config"]["stage"] == "router"  # reloads in its inference form


def test_stages_train_only_their_parts(tmp_path):
    """Domain stage alone: the universal expert and the router stay at their init."""
    _, _, w = run(staged(tmp_path, {"universal": 0, "domain": 2, "router": 0}))
    assert not {k for k in kinds_moved(w, "lora_B") if "lora_domain" not in k}
    assert not kinds_moved(w, "lora_router")
    assert all(kinds_moved(w, f"lora_domain.{d}.lora_B") for d in range(3))


@pytest.mark.parametrize("padding_free", [False, True])
def test_fedavg_domain_stage_averages_each_expert_over_its_domain(
    tmp_path, monkeypatch, padding_free
):
    calls = []
    real = Aggregator.aggregate_partial

    def spy(self, glob, updates, weights=None):
        out = real(self, glob, updates, weights)
        calls.append((dict(glob), [dict(u) for u in updates], list(weights), out))
        return out

    monkeypatch.setattr(Aggregator, "aggregate_partial", spy)
    cfg = staged(tmp_path, {"domain": 2}, "fedavg", devices={"count": 4},
                 train={"padding_free": padding_free})  # fmt: skip
    run_dir, recs, _ = run(cfg)
    devices = json.loads((run_dir / "summary.json").read_text())["extra"]["domains"]["devices"]
    assert len(calls) == 2 and len(set(devices.values())) == 3  # 4 devices, 3 domains
    glob, updates, weights, out = calls[0]
    for u in updates:  # each device uploads its own expert only (plus the shared head)
        assert len({k.split("lora_domain.")[1][0] for k in u if "lora_domain." in k}) == 1
    for key in [k for k in glob if "lora_domain." in k and "lora_B" in k]:
        holders = [(u[key], w) for u, w in zip(updates, weights, strict=True) if key in u]
        assert holders  # every domain has a device
        mean = sum(v.double() * w for v, w in holders) / sum(w for _, w in holders)
        torch.testing.assert_close(out[key].double(), mean, atol=1e-7, rtol=0)
        assert out[key].abs().sum() > 0  # not diluted back towards 0 by the other domains


def test_aggregate_partial():
    glob = {"a": torch.zeros(2), "b": torch.zeros(2), "c": torch.ones(2)}
    ups = [{"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([3.0, 3.0])}, {"a": torch.ones(2) * 3}]
    out = Aggregator().aggregate_partial(glob, ups, [1.0, 3.0])
    torch.testing.assert_close(out["a"], torch.full((2,), 2.5))  # (1·1 + 3·3) / 4
    torch.testing.assert_close(out["b"], torch.full((2,), 3.0))  # its only holder
    torch.testing.assert_close(out["c"], torch.ones(2))  # nobody trained it: global value
    full = [{**u, "b": torch.ones(2), "c": torch.ones(2)} for u in ups]
    agg = Aggregator(eta=0.5)
    expect = Aggregator(eta=0.5).aggregate(glob, full, [1.0, 3.0])
    got = agg.aggregate_partial(glob, full, [1.0, 3.0])
    assert all(torch.equal(got[k], expect[k]) for k in glob)
    with pytest.raises(ProtocolError, match="not in the global state"):
        agg.aggregate_partial(glob, [{"z": torch.ones(1)}])


def test_mosld_stages(tmp_path):
    d = tiny_config_dict(tmp_path, name="mosld-stages", peft={"method": "mosld"})
    d["peft"]["stages"] = {"experts": 2, "router": 1}
    d["train"].pop("steps")
    _, recs, w = run(config_from_dict(d))
    assert [r["stage"] for r in recs if r["event"] == "train"] == ["experts"] * 2 + ["router"]
    assert kinds_moved(w, "lora_router") and kinds_moved(w, "lora_B")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"peft": {"stages": {}}}, r"peft.stages: .*at least one stage"),
        ({"peft": {"stages": {"universal": 2}}, "train": {"steps": 3}}, "sum to 2"),
    ],
)
def test_bad_stage_config(tmp_path, change, message):
    d = tiny_config_dict(tmp_path)
    for k, v in change.items():
        d[k] = {**d[k], **v}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(d)


@pytest.mark.parametrize(
    ("stages", "sections", "message"),
    [
        ({"universal": 1, "experts": 1}, {}, r"peft.stages.experts: not a stage of 'modula'"),
        ({"domain": 1}, {"peft": {"options": {"num_experts": 2}}}, r"num_experts >= 3"),
        ({"domain": 1}, {"paradigm": {"name": "splitfed"}}, "domain stage .* not 'splitfed'"),
        ({"router": 1}, {"paradigm": {"name": "local"}}, "one adapter per device"),
        ({"router": 1}, {"peft": {"method": "lora", "options": {}}}, "has no training stages"),
    ],
)
def test_bad_stages_fail_before_the_run_dir(tmp_path, stages, sections, message):
    from cotune.run import run_experiment

    cfg = staged(tmp_path, stages)
    d = cfg.to_dict()
    for k, v in sections.items():
        d[k] = {**d[k], **v}
    with pytest.raises(ConfigError, match=message):
        run_experiment(config_from_dict(d), quiet=True, report=False)
    assert not (tmp_path / "runs").exists()


def _causal(cfg, **data):
    d = cfg.to_dict()
    d["model"] = {**d["model"], "name_or_path": "random:gpt2", "task": "causal_lm"}
    d["data"] = {**d["data"], "max_examples": 60, **data}
    d["peft"]["target_modules"] = ["c_attn"]
    return d


def test_domain_stage_needs_domains(tmp_path):
    from cotune.build import build_experiment

    # austen's language-modelling view holds bare passages: no novel per example.
    d = _causal(staged(tmp_path, {"domain": 1}), dataset="austen", labels=[])
    d["partition"] = {"scheme": "iid"}
    with pytest.raises(ConfigError, match="these examples carry none"):
        build_experiment(config_from_dict(d), tmp_path / "x", quiet=True)


def test_causal_lm_domain_stage_routes_each_device_to_its_category(tmp_path):
    """Causal LM on fortunes: the category is each example's domain, the shards partition gives
    every device one category, and each device trains its own category's expert."""
    d = _causal(staged(tmp_path, {"universal": 1, "domain": 2}, "fedavg", devices={"count": 3}))
    d["partition"] = {"scheme": "shards", "classes_per_device": 1}
    run_dir, recs, _ = run(config_from_dict(d))
    summary = json.loads((run_dir / "summary.json").read_text())
    plan = summary["extra"]["domains"]
    categories = ["computers", "politics", "science"]  # tiny_config's fortunes labels
    assert sorted(plan["experts"].values()) == categories
    assert sorted(plan["devices"].values()) == [0, 1, 2]  # one device per category
    assert summary["partition"]["label_names"] == categories
    assert {r.get("stage") for r in recs if r["event"] == "train"} == {"universal", "domain"}
    assert all("perplexity" in r for r in recs if r["event"] == "eval")


@pytest.mark.parametrize("paradigm", ["central", "fedavg"])
def test_staged_run_resumes_mid_stage_bit_for_bit(tmp_path, paradigm, monkeypatch):
    """Killed in the domain stage: the resumed run restores the earlier stages' tensors from the
    checkpoint, finishes the stage from its role states and runs the router stage, ending with
    exactly the uninterrupted run's adapter, metrics and simulated time."""
    from cotune.run import run_experiment

    cfg = staged(tmp_path, {"universal": 2, "domain": 2, "router": 2}, paradigm,
                 eval={"every": 1, "max_examples": 16}, output={"checkpoint_every": 1, "keep_checkpoints": 100})  # fmt: skip
    run_dir, recs, want = run(cfg)
    before = json.loads((run_dir / "summary.json").read_text())
    kill_after(run_dir, 3)  # step 3 = the domain stage's first step
    (run_dir / "summary.json").unlink()
    import cotune.stages

    ran, real = [], cotune.stages.stage_experiment

    def spy(exp, stage, steps, offset, domains, resume=None):
        ran.append((stage, None if resume is None else resume["step"]))
        return real(exp, stage, steps, offset, domains, resume)

    monkeypatch.setattr(cotune.stages, "stage_experiment", spy)
    resumed = run_experiment(cfg, resume=True, quiet=True, report=False)
    assert ran == [("domain", 1), ("router", None)]  # the universal stage is not run again
    got = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    after = json.loads((resumed / "summary.json").read_text())
    assert after["sim_time_s"] == pytest.approx(before["sim_time_s"])
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    again = [json.loads(x) for x in lines]

    def key(r):  # host timings differ from run to run; everything else must not
        return {k: v for k, v in r.items() if not k.endswith("host_s") and k != "host_time_s"}

    assert [key(r) for r in again] == [key(r) for r in recs]
