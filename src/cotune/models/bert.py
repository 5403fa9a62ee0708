"""BERT-like encoders (BERT, MiniLM, RoBERTa): word + position + token-type embeddings with their
LayerNorm, post-LN bidirectional blocks (no final norm), and a classification head on the first token:
BERT's pooler + classifier, or RoBERTa's classification head (dense + tanh + out_proj)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from cotune.errors import ModelError
from cotune.models.base import Anatomy


class BertAnatomy(Anatomy):
    family = "bert"
    causal = False

    def __init__(self, model: nn.Module, task: str) -> None:
        if task != "classification":
            raise ModelError(
                f"BERT-like models ({model.config.model_type}) are encoders: task {task!r} is not supported, "
                "use task=classification or a decoder family (gpt2, llama, qwen2, mistral)"
            )
        # "bert" or "roberta": the attribute the encoder lives under.
        self.prefix = model.base_model_prefix
        super().__init__(model, task)

    @property
    def blocks_path(self) -> str:
        return f"{self.prefix}.encoder.layer"

    @property
    def _base(self) -> nn.Module:
        return getattr(self.model, self.prefix)

    def embedding_paths(self) -> list[str]:
        return [f"{self.prefix}.embeddings"]

    def final_norm_path(self) -> str | None:
        return None

    def head_paths(self) -> list[str]:
        # PEFT's modules_to_save for sequence classification; BERT's pretrained pooler stays frozen.
        return ["classifier"]

    def output_paths(self) -> list[str]:
        if self._base.pooler is not None:
            return [f"{self.prefix}.pooler", "dropout", "classifier"]
        return ["classifier"]

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        # The model's own embedding module computes the positions: 0..T-1 for BERT, and for RoBERTa
        # padding_idx+1 onwards on real tokens with padding_idx on pad tokens (from input_ids).
        return self._base.embeddings(input_ids=input_ids)

    def block_context(self, hidden: Tensor, attention_mask: Tensor) -> dict[str, Any]:
        return {"mask": self._mask(attention_mask, hidden)}

    def run_block(self, i: int, hidden: Tensor, context: dict[str, Any]) -> Tensor:
        return self.blocks[i](hidden, attention_mask=context["mask"])

    def run_head(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        pooler = self._base.pooler
        if pooler is not None:
            # BertForSequenceClassification: tanh pooler on [CLS], dropout, linear classifier.
            return self.model.classifier(self.model.dropout(pooler(hidden)))
        # RobertaForSequenceClassification: the head takes all hidden states and reads <s> itself.
        return self.model.classifier(hidden)
