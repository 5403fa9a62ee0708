"""DoRA, BoRA, KaSA, PiSSA, OLoRA: training, save/reload, identity at init, formulas, PEFT parity."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from cotune.errors import AdapterError
from cotune.peft import AdapterLayer, inject_adapters, load_adapter, save_adapter
from cotune.peft.bora import ORDERS

from .peft_cases import METHOD_CASES, MODEL_CASES, inputs, logits, peft_cfg, perturb

ATOL = 1e-5
NEW = ["dora", "bora", "kasa", "pissa", "olora"]
# Adapter tensors each method adds to LoRA's lora_A/lora_B (they must reach aggregation and checkpoints).
EXTRA = {
    "dora": {"lora_magnitude_vector"},
    "bora": {"lora_magnitude_row", "lora_magnitude_col"},
    "kasa": {"lora_diag"},
    "mosld": {"lora_router.weight"},
}
# Methods whose saved file is a plain PEFT LoRA (they reload as "lora").
AS_LORA = ("pissa", "olora", "gelora", "d2lora", "ggm")


def _labels(case, batch):
    return torch.tensor([0, 1]) if case.task == "classification" else batch["input_ids"]


@pytest.mark.parametrize("case_name", list(MODEL_CASES))
@pytest.mark.parametrize("method", list(METHOD_CASES))
def test_trains_and_saved_adapter_reloads(method, case_name, base_pair, tmp_path):
    case = MODEL_CASES[case_name]
    model, fresh = base_pair(case)
    adapters = inject_adapters(model, peft_cfg(method, case, options={}))
    trainable, sd = adapters.named_trainable(), adapters.state_dict()
    for path in adapters.layers:
        for name in {"lora_A.weight", "lora_B.weight"} | EXTRA.get(method, set()):
            assert f"{path}.{name}" in trainable and f"{path}.{name}" in sd
    before = {k: v.detach().clone() for k, v in trainable.items()}

    batch, labels = inputs(seed=7), _labels(case, inputs(seed=7))
    opt = torch.optim.Adam(adapters.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**batch, labels=labels).loss
        reg = adapters.regularization_loss()
        loss = loss + reg if reg is not None else loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0], losses
    # Every extra parameter is really trained (gradients reach magnitudes and σ).
    for path in adapters.layers:
        for name in EXTRA.get(method, set()):
            assert not torch.equal(trainable[f"{path}.{name}"], before[f"{path}.{name}"]), name

    save_adapter(adapters, tmp_path, base_model_name_or_path=None, task=case.task)
    loaded = load_adapter(fresh, tmp_path)
    # PiSSA/OLoRA export as plain LoRA on the original base; the others reload as themselves.
    assert loaded.method == ("lora" if method in AS_LORA else method)
    torch.testing.assert_close(logits(fresh, inputs()), logits(model, inputs()), atol=ATOL, rtol=0)


def _truncated_copy(model, adapters):
    """The model with each adapted weight's r smallest singular components removed (KaSA's base)."""
    out = copy.deepcopy(model)
    for path, layer in adapters.layers.items():
        w = out.get_submodule(path).weight  # either layout: the SVD of Wᵀ drops the same part
        u, s, vh = torch.linalg.svd(w.detach(), full_matrices=False)
        k = min(w.shape) - layer.r
        w.data.copy_((u[:, :k] * s[:k]) @ vh[:k])
    return out


@pytest.mark.parametrize("case_name", list(MODEL_CASES))
@pytest.mark.parametrize("method", NEW)
def test_identity_at_init(method, case_name):
    case = MODEL_CASES[case_name]
    model = case.build()
    original = copy.deepcopy(model)
    adapters = inject_adapters(model, peft_cfg(method, case, options={}))
    # KaSA's output equals the truncated base's; the others equal the untouched model's.
    ref = _truncated_copy(original, adapters) if method == "kasa" else original
    batch = inputs()
    torch.testing.assert_close(logits(model, batch), logits(ref, batch), atol=2e-6, rtol=0)
    changed = any(
        not torch.equal(layer.base_layer.weight, original.get_submodule(p).weight)
        for p, layer in adapters.layers.items()
    )
    assert changed == (method in ("kasa", "pissa", "olora"))  # residual / truncated base in memory


@pytest.mark.parametrize("method", NEW)
def test_bad_input_is_a_clear_error(method):
    case = MODEL_CASES["llama_causal"]
    with pytest.raises(AdapterError, match=r"peft.r = 64 is not below min\(in, out\)"):
        inject_adapters(case.build(), peft_cfg(method, case, r=64, rank_pattern={}, options={}))
    with pytest.raises(
        AdapterError, match=rf"unknown option\(s\) \['bogus'\] for method '{method}'"
    ):
        inject_adapters(case.build(), peft_cfg(method, case, options={"bogus": 1}))


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("bora", {"order": "diagonal"}, "order must be one of"),
        ("kasa", {"beta": -1.0}, "beta and gamma must be >= 0"),
        ("pissa", {"niter": -2}, "niter must be null or an integer"),
        ("dora", {"init_lora_weights": "pissa"}, "init_lora_weights must be"),
    ],
)
def test_bad_option_values(method, options, message):
    case = MODEL_CASES["bert_cls"]
    with pytest.raises(AdapterError, match=message):
        inject_adapters(case.build(), peft_cfg(method, case, options=options))


# ---- formulas checked against a dense re-computation --------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
def test_bora_formula_merge_and_export(order):
    case = MODEL_CASES["gpt2_causal"]  # Conv1D
    model = case.build()
    adapters = inject_adapters(
        model, peft_cfg("bora", case, options={"order": order, "init_lora_weights": False})
    )
    perturb(adapters, scale=0.2)  # magnitudes far from the norms, so the order matters
    path, layer = next(iter(adapters.layers.items()))
    w = layer.base_weight_oi().detach()
    v = w + layer.lora_delta_weight().detach()
    m_r, m_c = layer.lora_magnitude_row.detach(), layer.lora_magnitude_col.detach()
    if order == "col_first":
        h = m_c * v / v.norm(dim=0)
        expected = m_r[:, None] * h / h.norm(dim=1, keepdim=True)
    else:
        h = m_r[:, None] * v / v.norm(dim=1, keepdim=True)
        expected = m_c * h / h.norm(dim=0)
    torch.testing.assert_close(w + layer.delta_weight().detach(), expected, atol=1e-6, rtol=0)
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            layer(x), x @ expected.T + layer.base_layer.bias, atol=1e-5, rtol=0
        )
    batch = inputs()
    ours = logits(model, batch)
    plain = adapters.merge_and_unload()  # export as merged weights
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    torch.testing.assert_close(logits(plain, batch), ours, atol=ATOL, rtol=0)


def test_bora_orders_differ_and_norm_detach_is_an_option(tmp_path):
    case = MODEL_CASES["bert_cls"]
    outs, grads = {}, {}
    for order in ORDERS:
        for detach in (True, False):
            model = case.build()
            adapters = inject_adapters(
                model,
                peft_cfg("bora", case, options={"order": order, "detach_norms": detach}),
            )
            perturb(adapters, scale=0.2)
            layer = next(iter(adapters.layers.values()))
            out = model(**inputs(), labels=torch.tensor([0, 1]))
            out.loss.backward()
            outs[order, detach] = out.logits.detach()
            grads[order, detach] = layer.lora_magnitude_col.grad.clone()
    assert not torch.allclose(outs["col_first", True], outs["row_first", True], atol=1e-4)
    torch.testing.assert_close(outs["col_first", True], outs["col_first", False])  # same forward
    assert not torch.allclose(grads["col_first", True], grads["col_first", False])  # other backward
    save_adapter(adapters, tmp_path, base_model_name_or_path=None, task=case.task)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "COTUNE_BORA"
    assert config["bora_config"] == {"order": "row_first", "detach_norms": False}
    assert load_adapter(case.build(), tmp_path).cfg.options["order"] == "row_first"


def test_kasa_regularizer_and_pissa_export_shapes(tmp_path):
    case = MODEL_CASES["llama_causal"]
    adapters = inject_adapters(
        case.build(), peft_cfg("kasa", case, options={"beta": 0.5, "gamma": 0.25})
    )
    perturb(adapters)
    total = torch.tensor(0.0)
    for layer in adapters.layers.values():
        a, b, d = layer.lora_A.weight, layer.lora_B.weight, layer.lora_diag
        eye = torch.eye(layer.r)
        total = total + 0.5 * (d**2).sum()
        total = total + 0.25 * (torch.linalg.norm(b.T @ b - eye) + torch.linalg.norm(a @ a.T - eye))
    torch.testing.assert_close(adapters.regularization_loss(), total)

    adapters = inject_adapters(case.build(), peft_cfg("pissa", case))
    save_adapter(adapters, tmp_path, base_model_name_or_path=None, task=case.task)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # Doubled rank; alpha·√2 under rsLoRA keeps alpha/√r.
    assert (config["r"], config["init_lora_weights"], config["rank_pattern"]["v_proj"]) == (
        8,
        True,
        4,
    )
    assert config["lora_alpha"] == pytest.approx(8 * 2**0.5)
    assert config["alpha_pattern"]["down_proj"] == pytest.approx(4 * 2**0.5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("method", NEW)
def test_delta_and_delta_weight_agree_with_forward(method, kind):
    """`forward = base + delta(x)` and `delta(x) = x ΔWᵀ` hold for every method (split paradigms rely on it)."""
    from transformers.pytorch_utils import Conv1D

    from cotune.peft import LayerSpec, get_method

    torch.manual_seed(0)
    base = torch.nn.Linear(12, 20) if kind == "linear" else Conv1D(20, 12)
    torch.nn.init.normal_(base.weight, std=0.1)
    spec = get_method(method)
    layer = spec.layer_cls(base, LayerSpec("x", r=3, alpha=6.0, options=spec.parse_options({})))
    with torch.no_grad():
        for t in layer.adapter_tensors().values():
            t.add_(torch.randn(t.shape) * 0.1)
        x = torch.randn(4, 12)
        torch.testing.assert_close(layer(x), base(x) + layer.delta(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.delta(x), x @ layer.delta_weight().T, atol=1e-6, rtol=0)
