"""MoSLD and MoDULA: formulas, identity at init, training stages, own saved format, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from cotune.errors import AdapterError
from cotune.peft import LayerSpec, get_method, inject_adapters, load_adapter, save_adapter

from .peft_cases import MODEL_CASES, inputs, logits, peft_cfg, perturb

ATOL = 1e-5


def _layer(method: str, **options):
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 20)
    spec = get_method(method)
    layer = spec.layer_cls(
        base, LayerSpec("x", r=3, alpha=6.0, options=spec.parse_options(options))
    )
    with torch.no_grad():
        for t in layer.adapter_tensors().values():
            t.add_(torch.randn(t.shape) * 0.3)
    return layer.eval(), base


@pytest.mark.parametrize("case_name", ["bert_cls", "gpt2_causal"])
@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("mosld", {}),
        ("modula", {"stage": "router"}),
        ("modula", {"variant": "flan", "stage": "router"}),
    ],
)
def test_identity_at_init(method, options, case_name):
    case = MODEL_CASES[case_name]
    model = case.build()
    original = copy.deepcopy(model)
    inject_adapters(model, peft_cfg(method, case, options=options))
    torch.testing.assert_close(
        logits(model, inputs()), logits(original, inputs()), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("top_k", [0, 2])
def test_mosld_formula(top_k):
    layer, base = _layer("mosld", num_experts=4, top_k=top_k)
    x = torch.randn(5, 12)
    z = x @ layer.lora_A.weight.T * layer.scaling  # one shared A
    g = torch.softmax(x @ layer.lora_router.weight.T, -1)
    if top_k:
        keep = torch.zeros_like(g).scatter(-1, g.topk(top_k, -1).indices, 1.0)
        g = g * keep
    expected = sum(g[:, i : i + 1] * (z @ layer.lora_B.weight[i].T) for i in range(4))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x) + expected, atol=1e-6, rtol=0)
    with pytest.raises(AdapterError, match="input-dependent"):
        layer.delta_weight()


def test_mosld_dropout_modes_act_on_the_shared_branch():
    x = torch.randn(4, 12)
    for mode in ("input", "weight"):
        layer, _ = _layer("mosld", shared_dropout=0.5, dropout_mode=mode)
        with torch.no_grad():
            ev = layer(x)
            layer.train()
            tr = layer(x)
        assert not torch.allclose(ev, tr)
    layer, _ = _layer("mosld", shared_dropout=0.0)
    layer.train()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.eval()(x))


def _expert(e, x, s):
    return (x @ e.lora_A.weight.T * s) @ e.lora_B.weight.T


@pytest.mark.parametrize("variant", ["res", "flan"])
def test_modula_stage_forwards(variant):
    layer, base = _layer("modula", num_experts=3, variant=variant, top_k=0, stage="universal")
    x, s = torch.randn(5, 12), layer.scaling
    uni = (x @ layer.lora_A.weight.T * s) @ layer.lora_B.weight.T
    doms = [_expert(e, x, s) for e in layer.lora_domain]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x) + uni, atol=1e-6, rtol=0)
        layer.set_stage("domain", domain=2)
        want = doms[2] + (uni if variant == "res" else 0)
        torch.testing.assert_close(layer(x), base(x) + want, atol=1e-6, rtol=0)
        layer.set_stage("router")
        g = torch.softmax(x @ layer.lora_router.weight.T, -1)
        experts = doms if variant == "res" else [uni, *doms]
        mix = sum(g[:, i : i + 1] * experts[i] for i in range(len(experts)))
        want = mix + (uni if variant == "res" else 0)
        torch.testing.assert_close(layer(x), base(x) + want, atol=1e-6, rtol=0)
    assert layer.lora_router.weight.shape[0] == (3 if variant == "res" else 4)


def test_modula_stages_choose_what_trains_and_save_reload(tmp_path, base_pair):
    case = MODEL_CASES["llama_causal"]
    model, fresh = base_pair(case)
    adapters = inject_adapters(
        model, peft_cfg("modula", case, options={"num_experts": 2, "top_k": 0})
    )

    def trained_kinds() -> set[str]:
        return {k.split(".lora_", 1)[1].split(".")[0] for k in adapters.named_trainable()}

    assert trained_kinds() == {"A", "B"}
    adapters.set_stage("domain", domain=1)
    assert {k for k in adapters.named_trainable()} and all(
        ".lora_domain.1." in k for k in adapters.named_trainable()
    )
    adapters.set_stage("router")
    assert all(".lora_router." in k for k in adapters.named_trainable())
    # One router-stage step moves only the router (experts perturbed so it has a gradient).
    perturb(adapters)
    before = {k: v.clone() for k, v in adapters.state_dict().items()}
    opt = torch.optim.SGD(adapters.parameters(), lr=0.1)
    batch = inputs(seed=7)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    opt.step()
    moved = {k for k, v in adapters.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(".lora_router." in k for k in moved)

    save_adapter(adapters, tmp_path, base_model_name_or_path=None, task=case.task)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "COTUNE_MODULA" and config["modula_config"]["stage"] == "router"
    loaded = load_adapter(fresh, tmp_path)
    assert loaded.method == "modula" and all(
        lay.stage == "router" for lay in loaded.layers.values()
    )
    torch.testing.assert_close(logits(fresh, inputs()), logits(model, inputs()), atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["mosld", "modula"])
def test_state_dict_round_trip_and_averaging(method):
    """What federated averaging does: state dicts out, mean, back in; outputs follow exactly."""
    case = MODEL_CASES["bert_cls"]
    models = [case.build() for _ in range(3)]
    sets = [inject_adapters(m, peft_cfg(method, case, options={})) for m in models]
    for i, s in enumerate(sets[:2]):
        perturb(s, seed=10 + i)
    sds = [s.state_dict() for s in sets[:2]]
    assert set(sets[0].named_trainable()) <= set(sds[0])
    mean = {k: (sds[0][k] + sds[1][k]) / 2 for k in sds[0]}
    sets[2].load_state_dict(mean)
    sets[0].load_state_dict(mean)
    torch.testing.assert_close(
        logits(models[2], inputs()), logits(models[0], inputs()), atol=0, rtol=0
    )


def test_bad_input_is_a_clear_error():
    case = MODEL_CASES["bert_cls"]
    bad = [
        ("mosld", {"num_experts": 0}, "num_experts must be an integer >= 1"),
        ("modula", {"num_experts": 0}, "num_experts must be an integer >= 1"),
        ("mosld", {"top_k": -1}, "top_k must be >= 0"),
        ("mosld", {"dropout_mode": "column"}, "dropout_mode must be"),
        ("modula", {"variant": "mix"}, "variant must be 'res' or 'flan'"),
        ("modula", {"stage": "joint"}, "stage must be one of"),
        ("modula", {"domain": 2}, r"domain must be in \[0, num_experts\)"),
    ]
    for method, options, message in bad:
        with pytest.raises(AdapterError, match=message):
            inject_adapters(case.build(), peft_cfg(method, case, options=options))
    adapters = inject_adapters(case.build(), peft_cfg("modula", case, options={}))
    with pytest.raises(AdapterError, match="stage must be one of"):
        adapters.set_stage("everything")
    with pytest.raises(AdapterError, match="domain must be in"):
        adapters.set_stage("domain", domain=5)
    with pytest.raises(AdapterError, match="cannot be merged"):
        adapters.merge()
    mosld = inject_adapters(case.build(), peft_cfg("mosld", case, options={}))
    with pytest.raises(AdapterError, match="unknown option"):
        mosld.set_stage("router", domain=1)
    with pytest.raises(AdapterError, match="has no training stages"):
        inject_adapters(case.build(), peft_cfg("lora", case)).set_stage("router")


@pytest.mark.parametrize(
    ("method", "options"),
    [("mosld", {}), ("gelora", {"source": "federated", "sample_examples": 24})],
)
def test_runs_under_fedavg(tiny_config, method, options):
    """Through the fedavg paradigm: aggregated, checkpointed and saved in the method's format."""
    from cotune.run import latest_checkpoint, run_experiment

    cfg = tiny_config(
        name=f"{method}-fedavg",
        peft={"method": method, "options": options},
        paradigm={"name": "fedavg", "options": {"local_steps": 1}},
        train={"steps": 2},
        eval={"every": 2, "max_examples": 16},
    )
    run_dir = run_experiment(cfg, quiet=True, report=False)
    states = torch.load(latest_checkpoint(run_dir), weights_only=False)["states"]
    for state in states.values():
        assert all(torch.isfinite(t).all() for t in state["params"].values())
    config = json.loads(next((run_dir / "adapter").rglob("adapter_config.json")).read_text())
    assert config["peft_type"] == ("COTUNE_MOSLD" if method == "mosld" else "LORA")
