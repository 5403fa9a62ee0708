"""LLaMA-like decoders (LLaMA, Qwen2, Mistral): token embeddings only, rotary position embeddings
computed per forward, RMSNorm pre-norm blocks with grouped-query attention, optional sliding windows,
final ``norm``, ``lm_head`` or a ``score`` classifier read at the last real token."""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cotune.models.base import Anatomy
from cotune.models.packing import Packing


class LlamaAnatomy(Anatomy):
    family = "llama"
    causal = True

    @property
    def blocks_path(self) -> str:
        return "model.layers"

    def embedding_paths(self) -> list[str]:
        return ["model.embed_tokens"]

    def final_norm_path(self) -> str | None:
        return "model.norm"

    def head_paths(self) -> list[str]:
        return ["score"] if self.task == "classification" else []

    def output_paths(self) -> list[str]:
        return ["model.norm", "score" if self.task == "classification" else "lm_head"]

    def window(self, i: int) -> int | None:
        """Sliding-window size of block ``i`` (``None``: full causal attention).

        Qwen2 lists a type per layer; Mistral applies ``sliding_window`` to every layer; LLaMA has none.
        """
        window = getattr(self.config, "sliding_window", None)
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types is not None and window is not None:
            return window if layer_types[i] == "sliding_attention" else None
        return window

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.model.embed_tokens(input_ids)

    def block_context(self, hidden: Tensor, attention_mask: Tensor) -> dict[str, Any]:
        positions = torch.arange(hidden.size(1), device=hidden.device)[None, :]
        # The model's own rotary module, so rope scaling variants from the config apply unchanged.
        cos_sin = self.model.model.rotary_emb(hidden, position_ids=positions)
        masks = {
            w: self._mask(attention_mask, hidden, w)
            for w in {self.window(i) for i in range(self.num_layers)}
        }
        return {"positions": positions, "rotary": cos_sin, "masks": masks}

    def run_block(self, i: int, hidden: Tensor, context: dict[str, Any]) -> Tensor:
        return self.blocks[i](
            hidden,
            attention_mask=context["masks"][self.window(i)],
            position_ids=context["positions"],
            position_embeddings=context["rotary"],
        )

    @property
    def packs(self) -> bool:
        attn = self.blocks[0].self_attn
        # The LLaMA block as written below: no per-head q/k norms (Qwen3, OLMo run padded).
        return not hasattr(attn, "q_norm") and hasattr(
            sys.modules[type(attn).__module__], "apply_rotary_pos_emb"
        )

    def run_block_packed(
        self, i: int, x: Tensor, packing: Packing, context: dict[str, Any], keep: Tensor | None
    ) -> Tensor:
        # The decoder layer on the real tokens: norms, projections and the MLP per token;
        # rotary embeddings and the (grouped-query, causal, maybe windowed) attention padded.
        # With ``keep`` (one token a row: the classification head reads each row's last), keys
        # and values come from every token, the query, output and MLP from those only.
        layer = self.blocks[i]
        attn = layer.self_attn
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        h = layer.input_layernorm(x)
        size = attn.head_dim
        q = packing.heads(attn.q_proj(h), size) if keep is None else None
        k = packing.heads(attn.k_proj(h), size)
        v = packing.heads(attn.v_proj(h), size)
        cos, sin = context["rotary"]
        mask = context["masks"][self.window(i)]
        if q is not None:
            q, k = rotate(q, k, cos, sin)
            causal = mask is None
        else:
            assert keep is not None
            x, h, cols = x.index_select(0, keep), h.index_select(0, keep), packing.columns(keep)
            q = packing.row_heads(attn.q_proj(h), size)
            # The family's own rotation rotates a pair; the unused half is given one key head
            # (rotating ``k`` twice would double this elementwise work).
            _, k = rotate(k[:, :1], k, cos, sin)  # every key at its own position
            at = cos[0, cols][:, None], sin[0, cols][:, None]
            q, _ = rotate(q, q[:, :1], *at)  # each row's query at its last token's position
            mask, causal = packing.query_rows(mask, cols), False
        att = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal,
            dropout_p=attn.attention_dropout if attn.training else 0.0,
            scale=attn.scaling,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        x = x + attn.o_proj(packing.attention_tokens(att, keep))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def embed_at(self, input_ids: Tensor, start: int) -> Tensor:
        return self.model.model.embed_tokens(input_ids)

    def decode_context(self, hidden: Tensor, start: int) -> dict[str, Any]:
        positions = torch.arange(start, start + hidden.size(1), device=hidden.device)[None, :]
        cos_sin = self.model.model.rotary_emb(hidden, position_ids=positions)
        windows = {self.window(i) for i in range(self.num_layers)}
        masks = {w: self.decode_mask(hidden, start, w) for w in windows}
        return {"positions": positions, "rotary": cos_sin, "masks": masks}

    def run_block_cached(
        self, i: int, hidden: Tensor, context: dict[str, Any], cache: Any
    ) -> Tensor:
        return self.blocks[i](
            hidden,
            attention_mask=context["masks"][self.window(i)],
            position_ids=context["positions"],
            position_embeddings=context["rotary"],
            use_cache=True,
            **self.cache_keyword(cache),
        )

    def run_head(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.model.model.norm(hidden)
        if self.task == "causal_lm":
            return self.model.lm_head(hidden)
        return self.model.score(self._last_token(hidden, attention_mask))
