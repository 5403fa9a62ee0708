"""DoRA, KaSA, PiSSA, OLoRA against stock PEFT: same seed → same init and gradients; PEFT files load."""

from __future__ import annotations

import pytest
import torch

from cotune.peft import inject_adapters, load_adapter

from .peft_cases import MODEL_CASES, inputs, logits, peft_cfg, train_steps

ATOL = 1e-5


def _peft_config(hf_peft, case, **variant):
    """A LoraConfig adapting the same layers as `peft_cfg(method, case)` (r=4, alpha=8)."""
    extra = {
        k: v for k, v in case.peft.items() if k in ("use_rslora", "rank_pattern", "alpha_pattern")
    }
    if case.peft.get("layers"):
        extra["layers_to_transform"] = case.peft["layers"]
    targets = case.peft["target_modules"]
    if any("\\" in t for t in targets):  # a regex: PEFT takes one full-match string
        targets = "|".join(targets)
    return hf_peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets,
        task_type=case.peft_task_type, **extra, **variant,
    )  # fmt: skip


def _twins(hf_peft, method, case_name, options, **variant):
    """(cotune adapters, PEFT model) built from identical bases under the same seed."""
    case = MODEL_CASES[case_name]
    ours, theirs = case.build(), case.build()
    torch.manual_seed(5)
    adapters = inject_adapters(ours, peft_cfg(method, case, options=options))
    torch.manual_seed(5)
    peft_model = hf_peft.get_peft_model(theirs, _peft_config(hf_peft, case, **variant))
    return case, adapters, peft_model


VARIANTS = {
    "dora": ({}, {"use_dora": True}),
    "kasa": ({"beta": 0.01, "gamma": 0.1}, {"kasa_config": {"beta": 0.01, "gamma": 0.1}}),
    "pissa": ({}, {"init_lora_weights": "pissa"}),
    "pissa_niter": ({"niter": 2}, {"init_lora_weights": "pissa_niter_2"}),
    "olora": ({}, {"init_lora_weights": "olora"}),
}
# PEFT's KaSA refuses Conv1D and its OLoRA mishandles a non-square Conv1D: Linear models only there.
PARITY = [
    ("dora", "gpt2_causal"), ("dora", "llama_causal"), ("kasa", "bert_cls"), ("kasa", "llama_causal"),
    ("pissa", "gpt2_cls"), ("pissa", "llama_causal"), ("pissa_niter", "bert_cls"), ("olora", "llama_causal"),
]  # fmt: skip


@pytest.mark.parametrize(("variant", "case_name"), PARITY)
def test_same_seed_same_init_outputs_and_gradients(variant, case_name, hf_peft):
    options, peft_fields = VARIANTS[variant]
    method = variant.removesuffix("_niter")
    case, adapters, peft_model = _twins(hf_peft, method, case_name, options, **peft_fields)
    theirs_root = peft_model.base_model.model
    g = torch.Generator().manual_seed(3)
    for path, layer in adapters.layers.items():
        theirs = theirs_root.get_submodule(path)
        torch.testing.assert_close(
            layer.lora_A.weight, theirs.lora_A["default"].weight, atol=1e-6, rtol=0
        )
        torch.testing.assert_close(
            layer.lora_B.weight, theirs.lora_B["default"].weight, atol=1e-6, rtol=0
        )
        # KaSA truncation / PiSSA residual: the same base weight on both sides.
        torch.testing.assert_close(
            layer.base_layer.weight, theirs.get_base_layer().weight, atol=1e-6, rtol=0
        )
        if method == "dora":
            mag = theirs.lora_magnitude_vector["default"].weight
            torch.testing.assert_close(layer.lora_magnitude_vector, mag, atol=1e-6, rtol=0)
        if method == "kasa":
            torch.testing.assert_close(layer.lora_diag, theirs.lora_diag["default"])
        with torch.no_grad():  # the same non-zero B on both sides, so the update is not trivial
            b = torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1
            layer.lora_B.weight.copy_(b)
            theirs.lora_B["default"].weight.copy_(b)

    batch = inputs()
    labels = torch.tensor([0, 1]) if case.task == "classification" else batch["input_ids"]
    models = {"ours": adapters.model, "theirs": peft_model}
    losses = {}
    for side, model in models.items():
        out = model(**batch, labels=labels)
        reg = adapters.regularization_loss() if side == "ours" else None
        if method == "kasa" and side == "theirs":
            reg = peft_model.base_model._get_kasa_loss()
        loss = out.loss + reg if reg is not None else out.loss
        loss.backward()
        losses[side] = (out.logits.detach(), loss.detach())
    torch.testing.assert_close(losses["ours"][0], losses["theirs"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(losses["ours"][1], losses["theirs"][1], atol=ATOL, rtol=0)
    # Gradients agree, so the DoRA norm is detached as in PEFT and the KaSA regularizer is the same.
    for path, layer in adapters.layers.items():
        theirs = theirs_root.get_submodule(path)
        for ours_p, theirs_p in [
            (layer.lora_A.weight, theirs.lora_A["default"].weight),
            (layer.lora_B.weight, theirs.lora_B["default"].weight),
        ] + (
            [(layer.lora_magnitude_vector, theirs.lora_magnitude_vector["default"].weight)]
            if method == "dora" else []
        ) + ([(layer.lora_diag, theirs.lora_diag["default"])] if method == "kasa" else []):  # fmt: skip
            torch.testing.assert_close(ours_p.grad, theirs_p.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("variant", "case_name"),
    [("dora", "bert_cls"), ("dora", "gpt2_causal"), ("kasa", "llama_causal"),
     ("pissa", "gpt2_causal"), ("olora", "bert_cls")],
)  # fmt: skip
def test_peft_trained_variant_loads_in_cotune(variant, case_name, base_pair, hf_peft, tmp_path):
    """PEFT-written DoRA/KaSA files, and PiSSA/OLoRA saved without conversion (PEFT redoes the init)."""
    case = MODEL_CASES[case_name]
    model, fresh = base_pair(case)
    _, peft_fields = VARIANTS[variant]
    peft_model = hf_peft.get_peft_model(model, _peft_config(hf_peft, case, **peft_fields))
    train_steps(peft_model, [p for p in peft_model.parameters() if p.requires_grad], case.task)
    peft_model.save_pretrained(str(tmp_path))
    theirs = logits(peft_model, inputs())

    adapters = load_adapter(fresh, tmp_path)
    assert adapters.method == variant
    if variant == "kasa":
        assert adapters.cfg.options == {"init_lora_weights": True, "beta": 0.01, "gamma": 0.1}
    torch.testing.assert_close(logits(fresh, inputs()), theirs, atol=ATOL, rtol=0)
