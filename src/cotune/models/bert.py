"""BERT-like encoders (BERT, MiniLM, RoBERTa): word + position + token-type embeddings with their
LayerNorm, post-LN bidirectional blocks (no final norm), and a classification head on the first token:
BERT's pooler + classifier, or RoBERTa's classification head (dense + tanh + out_proj)."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from cotune.errors import ModelError
from cotune.models.base import Anatomy
from cotune.models.packing import Packing


class BertAnatomy(Anatomy):
    family = "bert"
    causal = False
    # BERT's pooler reads [CLS], RoBERTa's classification head <s>: both the first token.
    head_reads_first = True

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

    @property
    def packs(self) -> bool:
        c = self.config
        # An encoder block: self-attention, then the MLP unchunked (what run_block_packed runs).
        return not c.is_decoder and not c.add_cross_attention and not c.chunk_size_feed_forward

    def run_block_packed(
        self, i: int, x: Tensor, packing: Packing, context: dict[str, Any], keep: Tensor | None
    ) -> Tensor:
        # BertLayer.forward without its layout: the projections, output dense + norm and MLP
        # run on the real tokens; the attention runs padded under the key mask (SDPA, the
        # same softmax(q·kᵀ·scale)·v as HF's eager and SDPA paths).
        layer = self.blocks[i]
        sa = layer.attention.self
        size = sa.attention_head_size
        if keep is not None:  # bidirectional: the kept query sees every key under the key mask
            x_out = x.index_select(0, keep)
            q = packing.row_heads(sa.query(x_out), size)
        else:
            x_out = x
            q = packing.heads(sa.query(x), size)
        k, v = packing.heads(sa.key(x), size), packing.heads(sa.value(x), size)
        att = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=context["mask"],
            dropout_p=sa.dropout.p if sa.training else 0.0,
            scale=sa.scaling,
        )
        a = layer.attention.output(packing.attention_tokens(att, keep), x_out)
        return layer.output(layer.intermediate(a), a)

    def run_head(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        pooler = self._base.pooler
        if pooler is not None:
            # BertForSequenceClassification: tanh pooler on [CLS], dropout, linear classifier.
            return self.model.classifier(self.model.dropout(pooler(hidden)))
        # RobertaForSequenceClassification: the head takes all hidden states and reads <s> itself.
        return self.model.classifier(hidden)
