"""TwoNN intrinsic dimension and GeLoRA's per-layer ranks (estimator, budget, federated stats, run hook)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cotune.errors import AdapterError
from cotune.peft import inject_adapters, load_adapter, save_adapter
from cotune.peft.gelora import (
    GeloraOptions,
    gelora_rank_pattern,
    layer_stats,
    ranks_from_dimensions,
    target_paths,
)
from cotune.peft.twonn import TwoNNStats, log_ratios, twonn_dimension

from .peft_cases import MODEL_CASES, inputs, logits, peft_cfg, perturb


def _subspace(d: int, n: int = 800, big_d: int = 48, seed: int = 0) -> torch.Tensor:
    """n Gaussian points on a random d-dim linear subspace of R^big_d (intrinsic dimension d)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(big_d, d, generator=g))[0]
    return torch.randn(n, d, generator=g) @ q.T + 3.0


@pytest.mark.parametrize("estimator", ["mle", "fit"])
@pytest.mark.parametrize(("d", "tol"), [(2, 0.1), (5, 0.12), (8, 0.2)])
def test_twonn_recovers_known_dimension(d, tol, estimator):
    est = twonn_dimension(_subspace(d), estimator)
    assert est == pytest.approx(d, rel=tol)


def test_twonn_federated_stats_combine_and_edge_cases():
    x = _subspace(4, n=1200)
    shards = [x[i::4] for i in range(4)]
    stats = [TwoNNStats.of(s) for s in shards]
    pooled = TwoNNStats.combine(stats)
    assert pooled.count == sum(s.count for s in stats) == 1200
    assert pooled.sum_log_mu == pytest.approx(sum(s.sum_log_mu for s in stats))
    # Neighbours found within each shard: still an estimate of the same dimension.
    assert pooled.dimension() == pytest.approx(4, rel=0.12)
    dup = torch.cat([x[:50], x[:5]])  # duplicated points are dropped, not infinite ratios
    assert log_ratios(dup).numel() == 45 and torch.isfinite(log_ratios(dup)).all()
    with pytest.raises(AdapterError, match="N >= 3"):
        TwoNNStats.of(x[:2])
    with pytest.raises(AdapterError, match="no usable points"):
        TwoNNStats(0.0, 0).dimension()
    with pytest.raises(AdapterError, match="estimator"):
        twonn_dimension(x, "levina")


def _costs(model, pattern):
    mods = dict(model.named_modules())
    total = 0
    for key, r in pattern.items():
        path = next(p for p in mods if re.fullmatch(key, p))
        w = mods[path].weight
        total += r * (w.shape[0] + w.shape[1])
    return total


def test_ranks_follow_dimensions_and_fit_the_budget():
    case = MODEL_CASES["llama_causal"]
    model = case.build()
    cfg = peft_cfg("gelora", case, rank_pattern={}, alpha_pattern={}, options={})
    paths = target_paths(model, cfg)
    plain = _costs(model, {re.escape(p): cfg.r for p in paths})
    dims = [3.0, 12.0, 2.0]  # block 0 sees 3 -> 12, block 1 sees 12 -> 2
    pattern = ranks_from_dimensions(dims, model, cfg, GeloraOptions())
    assert set(pattern) == {re.escape(p) for p in paths}
    assert _costs(model, pattern) <= plain  # default budget: plain LoRA with peft.r
    q0, q1 = (pattern[re.escape(f"model.layers.{i}.self_attn.q_proj")] for i in (0, 1))
    assert q0 == q1  # rule max: both blocks touch the dimension-12 boundary
    delta = ranks_from_dimensions(dims, model, cfg, GeloraOptions(rule="delta"))
    assert (
        delta[re.escape("model.layers.0.self_attn.q_proj")]
        > delta[re.escape("model.layers.1.self_attn.q_proj")]
    )
    small = ranks_from_dimensions(
        dims, model, cfg, GeloraOptions(budget=2, budget_unit="mean_rank")
    )
    assert _costs(model, small) <= 2 * sum(_costs(model, {re.escape(p): 1}) for p in paths)
    huge = ranks_from_dimensions(dims, model, cfg, GeloraOptions(budget=10**9))
    mods = dict(model.named_modules())
    caps = {re.escape(p): min(mods[p].weight.shape) - 1 for p in paths}
    assert huge == caps  # capped at min(in, out) − 1 (v_proj is 64→32)
    with pytest.raises(AdapterError, match="below rank 1 everywhere"):
        ranks_from_dimensions(dims, model, cfg, GeloraOptions(budget=10))


def test_gelora_rank_pattern_injects_saves_and_loads(tmp_path, hf_peft):
    case = MODEL_CASES["llama_causal"]
    model, fresh, peft_fresh = case.build(), case.build(), case.build()
    cfg = peft_cfg(
        "gelora",
        case,
        rank_pattern={},
        alpha_pattern={},
        options={"budget": 3, "budget_unit": "mean_rank"},
    )
    batches = [inputs(seed=s) | {"input_ids": torch.randint(2, 100, (8, 7))} for s in range(3)]
    for b in batches:
        b["attention_mask"] = torch.ones_like(b["input_ids"])
    pattern = gelora_rank_pattern(model, None, batches, cfg)
    adapters = inject_adapters(model, cfg.model_copy(update={"rank_pattern": pattern}))
    assert {re.escape(p): layer.r for p, layer in adapters.layers.items()} == pattern
    perturb(adapters)
    save_adapter(adapters, tmp_path, base_model_name_or_path=None, task=case.task)
    loaded = load_adapter(fresh, tmp_path)
    assert loaded.method == "lora"
    assert {p: lay.r for p, lay in loaded.layers.items()} == {
        p: lay.r for p, lay in adapters.layers.items()
    }
    torch.testing.assert_close(logits(fresh, inputs()), logits(model, inputs()), atol=1e-5, rtol=0)
    peft_model = hf_peft.PeftModel.from_pretrained(peft_fresh, str(tmp_path)).eval()
    torch.testing.assert_close(
        logits(peft_model, inputs()), logits(model, inputs()), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"source": "cloud"}, "source must be one of"),
        ({"source": "federated", "estimator": "fit"}, "estimator 'fit' needs every ratio"),
        ({"sample_examples": 2}, "sample_examples must be >= 3"),
        ({"budget": -1}, "budget must be > 0"),
        ({"pooling": "max"}, "pooling must be one of"),
    ],
)
def test_gelora_bad_options(options, message):
    case = MODEL_CASES["bert_cls"]
    with pytest.raises(AdapterError, match=message):
        inject_adapters(case.build(), peft_cfg("gelora", case, options=options))


def test_run_hook_server_and_federated(tiny_config):
    from cotune.build import build_experiment

    opts = {"sample_examples": 24, "budget": 3, "budget_unit": "mean_rank"}
    cfg = tiny_config(peft={"method": "gelora", "options": opts})
    exp, _ = build_experiment(cfg, Path("unused"), quiet=True)
    # The rank computation is the server's work, charged before anything else happens.
    assert exp.sim.flops.by_key["gelora:server"] > 0
    assert exp.sim.clock.free_at("server") > 0 and exp.sim.clock.free_at("device-0") == 0
    ranks = {re.escape(p): lay.r for p, lay in exp.adapters.layers.items()}
    assert exp.adapters.cfg.rank_pattern == ranks and cfg.peft.rank_pattern == {}
    again, _ = build_experiment(
        cfg, Path("unused"), quiet=True
    )  # deterministic (resume relies on it)
    assert again.adapters.cfg.rank_pattern == ranks

    fed = tiny_config(peft={"method": "gelora", "options": {**opts, "source": "federated"}})
    exp, _ = build_experiment(fed, Path("unused"), quiet=True)
    assert set(exp.adapters.cfg.rank_pattern) == set(ranks)
    # Federated: each device's forward over its own sample is on that device's bill.
    assert "gelora:server" not in exp.sim.flops.by_key
    for dev in ("device-0", "device-1"):
        assert exp.sim.flops.by_key[f"gelora:{dev}"] > 0 and exp.sim.clock.free_at(dev) > 0
    # What each device sends: two numbers per hidden-state boundary, no raw data.
    shard = exp.train_set.subset(exp.parts[0][:12])
    stats = layer_stats(exp.loaded.model, [shard.batch(list(range(12)))])
    assert len(stats) == exp.loaded.anatomy.num_layers + 1
    assert all(set(s.to_dict()) == {"sum_log_mu", "count"} for s in stats)


def test_hidden_points_poolings():
    from cotune.peft.gelora import hidden_points

    case = MODEL_CASES["gpt2_causal"]
    model = case.build()
    ids = torch.randint(2, 100, (6, 7))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0  # right padding: 4 + 5·7 = 39 real tokens
    batch = {"input_ids": ids, "attention_mask": mask}
    for pooling, n in (("mean", 6), ("last", 6), ("tokens", 39)):
        clouds = hidden_points(model, [batch], pooling)
        assert len(clouds) == 3 and all(c.shape == (n, 64) for c in clouds)
    assert hidden_points(model, [batch], "tokens", max_points=10)[0].shape[0] == 10  # stride 4
    with pytest.raises(AdapterError, match="no batches"):
        hidden_points(model, [])
