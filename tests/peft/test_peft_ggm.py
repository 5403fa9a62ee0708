"""APCA-GGM: the graph solver, the importance scores, the allocated layer, and its PEFT file."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cotune.errors import AdapterError
from cotune.peft import inject_adapters, save_adapter
from cotune.peft.ggm import GgmOptions, ImportanceTracker
from cotune.peft.ggm_graph import (
    covariance,
    delta_step,
    gst,
    objective,
    omega_step_exact,
    select_nodes,
    solve,
)
from cotune.peft.ggm_setup import allocated_section

from .peft_cases import MODEL_CASES, inputs, logits, peft_cfg, perturb


@pytest.mark.parametrize("y", [-3.0, -0.4, 0.0, 0.05, 0.3, 0.9, 2.5])
@pytest.mark.parametrize("w,p", [(0.1, 0.9), (0.5, 0.5), (0.01, 0.9)])
def test_gst_is_the_global_minimizer(y, w, p):
    grid = torch.linspace(-4, 4, 400001, dtype=torch.float64)
    f = 0.5 * (grid - y) ** 2 + w * grid.abs() ** p
    best = float(grid[f.argmin()])
    assert float(gst(torch.tensor(y), w, p)) == pytest.approx(best, abs=2e-3)


def _spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, generator=g, dtype=torch.float64)
    return x.T @ x / (3 * n)


def test_without_penalty_the_exact_solver_finds_the_inverse_covariance():
    # Hand-checked case: τ = 0 leaves Δ = Ω, so the optimum is Ω⁻¹ = S.
    s = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.5]], dtype=torch.float64)
    result = solve(s, torch.tensor([0]), lam=10.0, tau=0.0, omega_step="exact", max_iter=200)
    torch.testing.assert_close(result.omega, torch.linalg.inv(s), atol=1e-6, rtol=0)


def test_exact_bcd_decreases_the_objective_and_zeroes_groups():
    s = _spd(8)
    important = torch.tensor([0, 1, 2])
    lam, tau, p = 1.0, 0.5, 0.9
    result = solve(s, important, lam=lam, tau=tau, p=p, omega_step="exact", max_iter=40)
    trace = result.objective
    assert all(b <= a + 1e-9 for a, b in zip(trace, trace[1:], strict=False))
    assert trace[-1] < trace[0]
    # A strong penalty removes whole groups Δ_{I,j} (that is what selects nodes).
    strong = solve(s, important, lam=lam, tau=50.0, p=p, omega_step="exact", max_iter=20)
    assert strong.delta[important][:, 3:].abs().max() == 0


def test_each_block_step_is_a_minimizer():
    s, important = _spd(6, seed=3), torch.tensor([1, 4])
    lam, tau, p = 2.0, 0.3, 0.9
    omega = torch.linalg.inv(s)
    delta = delta_step(omega, important, lam, tau, p)
    base = objective(s, omega, delta, important, lam, tau, p)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # no small perturbation of either block does better
        d = torch.randn(6, 6, generator=g, dtype=torch.float64) * 1e-3
        assert objective(s, omega, delta + d, important, lam, tau, p) >= base - 1e-12
    new_omega = omega_step_exact(s, delta, lam)
    best = objective(s, new_omega, delta, important, lam, tau, p)
    assert best <= base
    for _ in range(20):
        d = torch.randn(6, 6, generator=g, dtype=torch.float64) * 1e-3
        d = (d + d.T) / 2
        assert objective(s, new_omega + d, delta, important, lam, tau, p) >= best - 1e-12


def test_authors_omega_step_stays_positive_definite():
    s = covariance(torch.rand(5, 12, generator=torch.Generator().manual_seed(1)) + 1e-3)[0]
    result = solve(s, torch.tensor([0, 1]), max_iter=3)  # the defaults: λ 1000, τ 20, p 0.9
    assert torch.linalg.eigvalsh(result.omega).min() > 0
    assert all(math.isfinite(v) for v in result.objective)


def test_selection_keeps_the_important_nodes():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(30, 20, generator=g) * 1e-3
    scores[:, [4, 9, 13]] *= 1e3  # clearly the most important components
    kept, _ = select_nodes(scores, 3, 8, omega_step="exact", max_iter=5)
    assert len(kept) == 8 and {4, 9, 13} <= set(kept)
    kept_frac, _ = select_nodes(scores, 0.15, 0.4, max_iter=2)
    assert len(kept_frac) == 8 and {4, 9, 13} <= set(kept_frac)
    by_score, none = select_nodes(scores, 3, 8, selection="score")
    assert none is None and len(by_score) == 8 and {4, 9, 13} <= set(by_score)
    with pytest.raises(ValueError, match="kept_nodes = 20 keeps 20 of the 20"):
        select_nodes(scores, 3, 20)
    with pytest.raises(ValueError, match="must be at least important_nodes"):
        select_nodes(scores, 6, 4)


def test_options_are_checked():
    with pytest.raises(ValueError, match="kept_nodes must be a count"):
        GgmOptions(kept_nodes=1.5)
    with pytest.raises(ValueError, match="warmup_steps must be >= 2"):
        GgmOptions(warmup_steps=1)
    with pytest.raises(ValueError, match="omega_step must be one of"):
        GgmOptions(omega_step="newton")
    with pytest.raises(ValueError, match=r"allocation\['a'\] must be a non-empty list"):
        GgmOptions(allocation={"a": []})


def test_importance_scores_follow_adalora():
    case = MODEL_CASES["bert_cls"]
    model = case.build()
    adapters = inject_adapters(model, peft_cfg("ggm", case))
    tracker = ImportanceTracker(adapters.layers, 0.85, 0.85)
    out = model(**inputs(), labels=torch.tensor([0, 1]))
    out.loss.backward()
    tracker.update()
    tracker.update()
    m = tracker.matrix()
    assert m.shape == (2, sum(layer.r for layer in adapters.layers.values()))
    # By hand for the first node: two identical gradients → Ī = (1 − .85²) I, Ū from |I − Ī|.
    layer = next(iter(adapters.layers.values()))
    a, b = layer.lora_A.weight, layer.lora_B.weight
    ipt_a, ipt_b = (a * a.grad).abs(), (b * b.grad).abs()

    def score(ipt):
        e1 = 0.15 * ipt
        u1 = 0.15 * (ipt - e1).abs()
        e2 = 0.85 * e1 + 0.15 * ipt
        return e2 * (0.85 * u1 + 0.15 * (ipt - e2).abs())

    want = (score(ipt_a.detach())[0].mean() + score(ipt_b.detach())[:, 0].mean()) / 2
    assert float(m[1, 0]) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("case_name", ["gpt2_causal", "bert_cls"])
def test_allocated_adapter_is_exact_and_stock_peft_loads_it(
    case_name, base_pair, hf_peft, tmp_path
):
    case = MODEL_CASES[case_name]
    model, fresh = base_pair(case)
    batch = inputs()
    base_out = logits(model, batch)
    full = peft_cfg("ggm", case)
    probe = inject_adapters(case.build(), full)
    paths = list(probe.layers)
    allocation = {paths[0]: [0, 2], paths[-1]: [3]}
    section = allocated_section(full, allocation)
    adapters = inject_adapters(model, section)
    assert {p: layer.r for p, layer in adapters.layers.items()} == {paths[0]: 2, paths[-1]: 1}
    # The kept components start on W's: nothing changes until they train.
    torch.testing.assert_close(logits(model, batch), base_out, atol=1e-5, rtol=0)
    layer = adapters.layers[paths[0]]
    assert layer.scaling == pytest.approx(full.alpha / full.r)  # alpha follows the rank
    perturb(adapters)
    ours = logits(model, batch)
    assert (ours - base_out).abs().max() > 1e-3
    save_adapter(adapters, tmp_path, base_model_name_or_path="tiny", task=case.task)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(saved["rank_pattern"].values()) == [2, 4]  # rank 2k: B A − B₀A₀
    theirs = logits(hf_peft.PeftModel.from_pretrained(fresh, str(tmp_path)).eval(), batch)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_allocation_must_fit_the_layer():
    case = MODEL_CASES["bert_cls"]
    full = peft_cfg("ggm", case)
    path = next(iter(inject_adapters(case.build(), full).layers))
    section = allocated_section(full, {path: [0, 1]})
    bad = section.model_copy(update={"options": {**section.options, "allocation": {path: [0]}}})
    with pytest.raises(
        AdapterError, match="allocation lists 1 components but the layer's rank is 2"
    ):
        inject_adapters(case.build(), bad)
    far = allocated_section(full, {path: [0, 500]})
    with pytest.raises(AdapterError, match="component 500 does not exist"):
        inject_adapters(case.build(), far)
