"""The anatomy of a model family: where its embeddings, blocks, final norm and head live, and how to
run a span of blocks standalone. One small subclass per family (gpt2.py, llama.py, bert.py)."""

from __future__ import annotations

import inspect
import re
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from cotune.errors import ModelError
from cotune.models.packing import Packing
from cotune.models.segment import Segment, attention_bias

TASKS = ("classification", "causal_lm")


class Anatomy(ABC):
    """Family-specific knowledge about a loaded HF model, used to cut it into ``Segment``s."""

    family: ClassVar[str]
    # Whether attention in the blocks is causal (decoders) or bidirectional (encoders).
    causal: ClassVar[bool]
    # Whether the task head reads only each row's first token (BERT's pooler, RoBERTa's head):
    # a padding-free last block then computes only those rows (``cotune.models.packing``).
    head_reads_first: ClassVar[bool] = False

    @property
    def head_reads_last(self) -> bool:
        """Whether the task head reads only each row's last real token (a decoder's sequence
        classification): a padding-free last block then computes only those rows."""
        return self.causal and self.task == "classification"

    def __init__(self, model: nn.Module, task: str) -> None:
        if task not in TASKS:
            raise ModelError(f"unknown task {task!r} (allowed: {', '.join(TASKS)})")
        self.model = model
        self.task = task
        self.config = model.config
        self._block_re = re.compile(rf"(?:^|\.){re.escape(self.blocks_path)}\.(\d+)(?:\.|$)")

    # ---------------------------------------------------------------- where things are (per family)

    @property
    @abstractmethod
    def blocks_path(self) -> str:
        """Dotted path of the ``nn.ModuleList`` of blocks, e.g. ``transformer.h``."""

    @abstractmethod
    def embedding_paths(self) -> list[str]:
        """Modules with weights that the embedding step uses (word, position, norm of the embeddings)."""

    @abstractmethod
    def final_norm_path(self) -> str | None:
        """The norm after the last block, or ``None`` (post-LN encoders have none)."""

    @abstractmethod
    def head_paths(self) -> list[str]:
        """The task head PEFT would train in full (``modules_to_save``); empty for causal LM, whose
        ``lm_head`` is tied to the input embeddings or frozen."""

    def input_paths(self) -> list[str]:
        """Every module the embedding step runs (``embedding_paths`` plus weightless ones like dropout)."""
        return self.embedding_paths()

    @abstractmethod
    def output_paths(self) -> list[str]:
        """Every module the head step runs: final norm, pooler, classifier or ``lm_head``."""

    # ---------------------------------------------------------------- how to run them (per family)

    @abstractmethod
    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids ``[B,T]`` to the hidden states fed to block 0 ``[B,T,D]``."""

    @abstractmethod
    def block_context(self, hidden: Tensor, attention_mask: Tensor) -> dict[str, Any]:
        """What every block of a segment shares: 4-D masks, rotary tables; built once per forward."""

    @abstractmethod
    def run_block(self, i: int, hidden: Tensor, context: dict[str, Any]) -> Tensor:
        """Run block ``i`` on ``hidden`` with the shared ``context``."""

    @property
    def packs(self) -> bool:
        """Whether blocks run padding-free (``run_block_packed``); a family that can says so."""
        return False

    def run_block_packed(
        self, i: int, x: Tensor, packing: Packing, context: dict[str, Any], keep: Tensor | None
    ) -> Tensor:
        """Block ``i`` on the real tokens ``x`` ``[N, D]`` of a batch laid out by ``packing``
        (``context``: ``block_context`` of the padded batch, whose masks the attention uses);
        with ``keep`` (one packed token per row: ``packing.first`` or ``packing.last``) it
        computes queries, the attention output and the MLP for those tokens only and returns
        ``[B, D]`` (keys and values still come from every token)."""
        raise ModelError(f"{self.family} blocks do not run padding-free")

    @abstractmethod
    def run_head(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """Final norm + task head on the last block's output: logits ``[B,C]`` or ``[B,T,V]``."""

    # ------------------------------------------------- incremental decoding (decoders; cotune.infer)

    def embed_at(self, input_ids: Tensor, start: int) -> Tensor:
        """Embeddings of ``input_ids`` ``[1,q]`` at positions ``start..start+q-1`` (eval mode)."""
        raise ModelError(f"{self.family} models do not decode incrementally (decoders only)")

    def decode_context(self, hidden: Tensor, start: int) -> dict[str, Any]:
        """What every block shares when ``q`` new positions from ``start`` attend to a cache of
        ``start`` positions and to each other causally."""
        raise ModelError(f"{self.family} models do not decode incrementally (decoders only)")

    def run_block_cached(
        self, i: int, hidden: Tensor, context: dict[str, Any], cache: Any
    ) -> Tensor:
        """Block ``i`` on the new positions, reading and extending its keys/values in ``cache``."""
        raise ModelError(f"{self.family} models do not decode incrementally (decoders only)")

    def cache_keyword(self, cache: Any) -> dict[str, Any]:
        """``cache`` as the keyword argument this model's blocks take it by: transformers 5.x
        renamed ``past_key_values`` to ``cache`` (both are in the range cotune supports), and a
        block given the other name takes it into ``**kwargs`` and caches nothing."""
        name = getattr(self, "_cache_name", None)
        if name is None:
            params = inspect.signature(self.blocks[0].forward).parameters
            name = "cache" if "cache" in params else "past_key_values"
            if name not in params:
                raise ModelError(
                    f"{type(self.blocks[0]).__name__}.forward takes its key/value cache neither as "
                    "'cache' nor as 'past_key_values': this transformers release is not supported"
                )
            self._cache_name = name
        return {name: cache}

    def decode_mask(self, hidden: Tensor, start: int, window: int | None = None) -> Tensor | None:
        """Boolean ``[1,1,q,start+q]``: new position ``i`` sees cached and new keys up to ``start+i``
        (within ``window`` when sliding). None when one new position sees every key (the usual
        decode step), so attention takes its unmasked fast path."""
        q = hidden.size(1)
        if q == 1 and (window is None or start < window):
            return None
        qpos = torch.arange(start, start + q, device=hidden.device)[:, None]
        kpos = torch.arange(start + q, device=hidden.device)[None, :]
        allowed = kpos <= qpos
        if window is not None:
            allowed = allowed & (kpos > qpos - window)
        return allowed[None, None]

    # ---------------------------------------------------------------- shared

    def module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.module(self.blocks_path)  # type: ignore[return-value]

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def embeddings(self) -> list[nn.Module]:
        return [self.module(p) for p in self.embedding_paths()]

    @property
    def final_norm(self) -> nn.Module | None:
        path = self.final_norm_path()
        return None if path is None else self.module(path)

    @property
    def head(self) -> nn.Module:
        """The module producing the logits (``lm_head``, ``score`` or ``classifier``)."""
        return self.module(self.output_paths()[-1])

    def block(self, i: int) -> nn.Module:
        self._check_index(i)
        return self.blocks[i]

    def block_path(self, i: int) -> str:
        self._check_index(i)
        return f"{self.blocks_path}.{i}"

    def layer_of(self, path: str) -> int | None:
        """Block index a module/parameter path lives in (a ``base_model.model.`` prefix is fine);
        ``None`` for the embeddings, the final norm and the head."""
        m = self._block_re.search(path)
        return int(m.group(1)) if m else None

    def segment(
        self,
        start: int,
        end: int,
        *,
        embed: bool | None = None,
        head: bool | None = None,
        keep: str = "all",
    ) -> Segment:
        """Blocks ``[start, end)``; ``embed`` defaults to ``start == 0``, ``head`` to ``end == num_layers``.

        ``keep="first"`` (a segment without the head, whose consumer reads only each row's first
        token: a classification head run apart) returns only those positions, ``[B, 1, D]``.

        ``start == end`` is allowed only with ``embed`` (an embedding-only segment) or ``head`` (a
        head-only segment: final norm + head on the last block's output, as in U-shaped splits).
        """
        n = self.num_layers
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= n):
            raise ModelError(
                f"segment bounds ({start!r}, {end!r}) are out of range: need integers with "
                f"0 <= start <= end <= {n} (this model has {n} blocks)"
            )
        embed = start == 0 if embed is None else embed
        head = end == n if head is None else head
        if embed and start != 0:
            raise ModelError(
                f"segment({start}, {end}, embed=True): the embeddings feed block 0, so start must be 0"
            )
        if head and end != n:
            raise ModelError(
                f"segment({start}, {end}, head=True): the head follows the last block, so end must be {n}"
            )
        if start == end and not (embed or head):
            raise ModelError(
                f"segment({start}, {end}) is empty: start == end needs embed=True (start 0) or head=True (end {n})"
            )
        if keep not in ("all", "first") or (keep == "first" and (head or start == end)):
            raise ModelError(
                f"segment({start}, {end}, keep={keep!r}): keep is 'all', or 'first' for a "
                "segment with blocks and without the head"
            )
        return Segment(self, start, end, embed=embed, head=head, keep=keep)

    def full(self) -> Segment:
        return self.segment(0, self.num_layers)

    def _check_index(self, i: int) -> None:
        if not (isinstance(i, int) and 0 <= i < self.num_layers):
            raise ModelError(f"block index {i!r} is out of range: 0 <= i < {self.num_layers}")

    def _mask(
        self, attention_mask: Tensor, hidden: Tensor, window: int | None = None
    ) -> Tensor | None:
        return attention_bias(
            attention_mask,
            causal=self.causal,
            window=window,
            implementation=self.config._attn_implementation,
            dtype=hidden.dtype,
        )

    def _last_token(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """``hidden[b, last non-pad position]``: decoders classify from the last real token.

        HF finds it from ``input_ids != pad_token_id``; a head-only segment has no ids, so the
        attention mask is used (same result unless a real token equals the pad id).
        """
        T = attention_mask.size(-1)
        positions = (attention_mask.long() * _arange(T, attention_mask)).argmax(-1)
        return hidden[_arange(hidden.size(0), hidden), positions]


def _arange(n: int, like: Tensor) -> Tensor:
    return torch.arange(n, device=like.device)
