"""Shared cases for the peft tests: tiny HF models × adapter methods.

A new method adds one entry to METHOD_CASES (config overrides that give it non-trivial weights);
every parametrized test then runs it on every model case.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cotune.config import PeftSection
from cotune.peft import AdapterSet

VOCAB = 100


def _tiny(kind: str) -> nn.Module:
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    if kind == "bert":
        cfg = BertConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64, num_labels=3,
        )  # fmt: skip
        return BertForSequenceClassification(cfg)
    if kind.startswith("gpt2"):
        cfg = GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, num_labels=3,
            pad_token_id=0, bos_token_id=1, eos_token_id=1,
        )  # fmt: skip
        return GPT2LMHeadModel(cfg) if kind == "gpt2" else GPT2ForSequenceClassification(cfg)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


@dataclass(frozen=True)
class ModelCase:
    name: str
    kind: str
    task: str  # cotune task name
    peft: dict[str, Any] = field(default_factory=dict)  # PeftSection fields for this model

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return _tiny(self.kind).eval()

    @property
    def peft_task_type(self) -> str:
        return "SEQ_CLS" if self.task == "classification" else "CAUSAL_LM"


MODEL_CASES = {
    c.name: c
    for c in [
        ModelCase(
            "bert_cls", "bert", "classification", {"target_modules": ["query", "value", "dense"]}
        ),
        # Conv1D (fan_in_fan_out) + layer filter, saved as names + layers_to_transform.
        ModelCase(
            "gpt2_causal",
            "gpt2",
            "causal_lm",
            {"target_modules": ["c_attn", "c_proj"], "layers": [1]},
        ),
        # Regex target + "score" head.
        ModelCase(
            "gpt2_cls",
            "gpt2_cls",
            "classification",
            {"target_modules": [r"transformer\.h\.\d+\.attn\.c_attn"]},
        ),
        ModelCase(
            "llama_causal",
            "llama",
            "causal_lm",
            {
                "target_modules": ["q_proj", "v_proj", "down_proj"],
                "use_rslora": True,
                "rank_pattern": {"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                "alpha_pattern": {"down_proj": 4.0},
            },
        ),  # fmt: skip
    ]
}

# Per method: PeftSection overrides that make a freshly injected adapter non-zero.
METHOD_CASES: dict[str, dict[str, Any]] = {
    "lora": {"options": {"init_lora_weights": False}},
    "dora": {"options": {"init_lora_weights": False}},
    "bora": {"options": {"init_lora_weights": False}},
    "kasa": {"options": {"init_lora_weights": False}},
    "pissa": {},  # A and B start on W's principal part: never zero
    "olora": {},
    "ggm": {},  # before its allocation: every component trainable, on W's principal part
    "gelora": {"options": {"init_lora_weights": False}},  # plain LoRA once the ranks are chosen
    "d2lora": {"options": {"init_lora_weights": False}},  # plain LoRA after its warm-up
    "mosld": {},  # experts B_i start at zero; tests perturb them
    "modula": {},  # stage "universal" by default
}

# (method, model case) -> regex of the error stock PEFT raises loading cotune's file (it must be loud).
PEFT_REFUSES: dict[tuple[str, str], str] = {
    **{("bora", c): "COTUNE_BORA" for c in MODEL_CASES},  # cotune-own format: unknown peft_type
    # PEFT's KaSA supports nn.Linear only (no fan_in_fan_out); cotune also adapts GPT-2 Conv1D.
    # MoE methods have no PEFT equivalent: cotune-own formats that stock PEFT must refuse.
    **{("mosld", c): "COTUNE_MOSLD" for c in MODEL_CASES},
    **{("modula", c): "COTUNE_MODULA" for c in MODEL_CASES},
    ("kasa", "gpt2_causal"): "fan_in_fan_out",
    ("kasa", "gpt2_cls"): "fan_in_fan_out",
}


def peft_cfg(method: str, case: ModelCase, **overrides: Any) -> PeftSection:
    if "method_" in overrides:  # lets a test ask for a method that is not registered
        method = overrides.pop("method_")
    extra = METHOD_CASES.get(method, {})
    fields = {"method": method, "r": 4, "alpha": 8.0, **case.peft, **extra, **overrides}
    return PeftSection(**fields)


def inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (2, 7), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@torch.no_grad()
def perturb(adapters: AdapterSet, seed: int = 2, scale: float = 0.05) -> None:
    """Random adapter and head weights, so outputs clearly differ from the base model."""
    g = torch.Generator().manual_seed(seed)
    for t in adapters.named_tensors().values():
        if t.is_floating_point():
            t.add_(torch.randn(t.shape, generator=g) * scale)


def train_steps(model: nn.Module, params: list[nn.Parameter], task: str, steps: int = 3) -> None:
    """A few Adam steps on a random batch (used to make PEFT-trained adapters non-trivial)."""
    opt = torch.optim.Adam(params, lr=1e-2)
    batch = inputs(seed=7)
    model.train()
    for _ in range(steps):
        out = model(
            **batch, labels=torch.tensor([0, 1]) if task == "classification" else batch["input_ids"]
        )
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
