"""GPT-2: learned absolute positions, pre-LN blocks, final ``ln_f``, ``lm_head`` tied to ``wte`` or a
``score`` classifier read at the last real token."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cotune.models.base import Anatomy
from cotune.models.packing import Packing


class GPT2Anatomy(Anatomy):
    family = "gpt2"
    causal = True

    @property
    def blocks_path(self) -> str:
        return "transformer.h"

    def embedding_paths(self) -> list[str]:
        return ["transformer.wte", "transformer.wpe"]

    def input_paths(self) -> list[str]:
        # The embedding dropout is registered with a segment so that segment.train()/eval() reach it.
        return [*self.embedding_paths(), "transformer.drop"]

    def final_norm_path(self) -> str | None:
        return "transformer.ln_f"

    def head_paths(self) -> list[str]:
        return ["score"] if self.task == "classification" else []

    def output_paths(self) -> list[str]:
        return ["transformer.ln_f", "score" if self.task == "classification" else "lm_head"]

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        tr = self.model.transformer
        # Right padding: positions are 0..T-1 for every row, as in HF's own forward.
        positions = torch.arange(input_ids.size(1), device=input_ids.device)[None, :]
        hidden = tr.wte(input_ids) + tr.wpe(positions)
        return tr.drop(hidden)

    def block_context(self, hidden: Tensor, attention_mask: Tensor) -> dict[str, Any]:
        return {"mask": self._mask(attention_mask, hidden)}

    def run_block(self, i: int, hidden: Tensor, context: dict[str, Any]) -> Tensor:
        return self.blocks[i](hidden, attention_mask=context["mask"])

    @property
    def packs(self) -> bool:
        c = self.config
        # Self-attention only; the reordered, upcast attention is an eager-only variant.
        return not c.add_cross_attention and not c.reorder_and_upcast_attn

    def run_block_packed(
        self, i: int, x: Tensor, packing: Packing, context: dict[str, Any], keep: Tensor | None
    ) -> Tensor:
        # GPT2Block.forward on the real tokens: norms, c_attn, c_proj and the MLP per token,
        # the causal attention padded under the mask (None: no padding, SDPA's causal path).
        # With ``keep`` (one token a row: the classification head reads each row's last), the
        # fused c_attn still runs on every token (its keys and values), the rest on those only.
        layer = self.blocks[i]
        attn = layer.attn
        q, k, v = attn.c_attn(layer.ln_1(x)).split(attn.split_size, dim=-1)
        size = attn.head_dim
        mask = context["mask"]
        if keep is None:
            queries, causal = packing.heads(q, size), mask is None
        else:
            x = x.index_select(0, keep)
            queries = packing.row_heads(q.index_select(0, keep), size)
            mask, causal = packing.query_rows(mask, packing.columns(keep)), False
        att = F.scaled_dot_product_attention(
            queries,
            packing.heads(k, size),
            packing.heads(v, size),
            attn_mask=mask,
            is_causal=causal,
            dropout_p=attn.attn_dropout.p if attn.training else 0.0,
            scale=attn.scaling,
        )
        x = x + attn.resid_dropout(attn.c_proj(packing.attention_tokens(att, keep)))
        return x + layer.mlp(layer.ln_2(x))

    def embed_at(self, input_ids: Tensor, start: int) -> Tensor:
        tr = self.model.transformer
        positions = torch.arange(start, start + input_ids.size(1), device=input_ids.device)[None, :]
        return tr.drop(tr.wte(input_ids) + tr.wpe(positions))

    def decode_context(self, hidden: Tensor, start: int) -> dict[str, Any]:
        return {"mask": self.decode_mask(hidden, start)}

    def run_block_cached(
        self, i: int, hidden: Tensor, context: dict[str, Any], cache: Any
    ) -> Tensor:
        return self.blocks[i](
            hidden, attention_mask=context["mask"], use_cache=True, **self.cache_keyword(cache)
        )

    def run_head(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.model.transformer.ln_f(hidden)
        if self.task == "causal_lm":
            return self.model.lm_head(hidden)
        # Pick the last real token before scoring: the same logits as HF's score-then-pick, less work.
        return self.model.score(self._last_token(hidden, attention_mask))
