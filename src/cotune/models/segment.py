"""Segments: runnable slices of a model, plus the activations passed between them and the task loss.

A ``Segment`` owns no weights of its own: it calls the model's own submodules (looked up through the
anatomy at every forward), so adapters injected into those submodules later are used automatically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from cotune.accel.compute import compute_of, note_checkpoint_input
from cotune.errors import ModelError
from cotune.models import packing

if TYPE_CHECKING:
    from cotune.models.base import Anatomy


@dataclass
class Activations:
    """What one segment hands to the next: hidden states ``[B,T,D]`` and the 2-D padding mask ``[B,T]``."""

    hidden: Tensor
    attention_mask: Tensor

    def detached(self, requires_grad: bool = True) -> Activations:
        """A copy cut from the autograd graph, as the receiving side of a split sees it."""
        hidden = self.hidden.detach()
        if requires_grad and hidden.is_floating_point():
            hidden.requires_grad_(True)
        return Activations(hidden, self.attention_mask)


class Segment(nn.Module):
    """Blocks ``[start, end)`` of a model, optionally preceded by the embeddings and followed by the head.

    The modules it runs are registered as children (``parts``) so that ``parameters()``,
    ``train()``/``eval()`` and ``.to()`` reach them; ``forward`` still looks every module up through
    the anatomy, so a module replaced in the model after this segment was built is honoured too.
    """

    def __init__(
        self, anatomy: Anatomy, start: int, end: int, *, embed: bool, head: bool, keep: str = "all"
    ) -> None:
        super().__init__()
        self.anatomy = anatomy
        self.start = start
        self.end = end
        self.embed = embed
        self.head = head
        self.keep = keep  # "first": only each row's first position leaves (no head here)
        paths: list[str] = anatomy.input_paths() if embed else []
        paths += [anatomy.block_path(i) for i in range(start, end)]
        if head:
            paths += anatomy.output_paths()
        self.paths = paths
        self.parts = nn.ModuleList(anatomy.module(p) for p in paths)

    def extra_repr(self) -> str:
        return f"family={self.anatomy.family}, blocks=[{self.start}, {self.end}), embed={self.embed}, head={self.head}"

    def owns(self, name: str) -> bool:
        """Whether a module or parameter path of the model (e.g. ``transformer.h.3.attn.c_attn.weight``) runs here."""
        layer = self.anatomy.layer_of(name)
        if layer is not None:
            return self.start <= layer < self.end
        edge = (self.anatomy.input_paths() if self.embed else []) + (
            self.anatomy.output_paths() if self.head else []
        )
        return any(name == p or name.startswith(p + ".") for p in edge)

    def forward(
        self, inputs: Tensor | Activations, attention_mask: Tensor | None = None
    ) -> Tensor | Activations:
        out = self._run(inputs, attention_mask, packed_head=False)
        assert not isinstance(out, tuple)
        return out

    def _run(
        self, inputs: Tensor | Activations, attention_mask: Tensor | None, packed_head: bool
    ) -> Tensor | Activations | tuple[Tensor, packing.Packing]:
        """``_forward`` under the model's compute settings (autocast, checkpointing)."""
        compute = compute_of(self.anatomy.model)
        device = inputs.hidden.device if isinstance(inputs, Activations) else inputs.device
        with compute.forward_context(device):
            return self._forward(inputs, attention_mask, compute.checkpoint_blocks(), packed_head)

    def packs_logits(self) -> bool:
        """Whether ``packed_logits`` may run now: a causal-LM head under ``padding_free`` on a
        family whose blocks pack (its head is per token, so padded positions need no logits)."""
        a = self.anatomy
        return self.head and a.task == "causal_lm" and packing.requested() and a.packs

    def packed_logits(
        self, inputs: Tensor | Activations, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, packing.Packing]:
        """The real tokens' logits ``[N, V]`` (in ``Packing`` order) and their layout: the
        padded positions' logits, a vocabulary-wide row each, are never computed."""
        if not self.packs_logits():
            raise ModelError("packed_logits needs a causal-LM head under padding_free")
        out = self._run(inputs, attention_mask, packed_head=True)
        assert isinstance(out, tuple)
        return out

    def _forward(
        self,
        inputs: Tensor | Activations,
        attention_mask: Tensor | None,
        checkpoint: bool,
        packed_head: bool = False,
    ) -> Tensor | Activations | tuple[Tensor, packing.Packing]:
        anatomy = self.anatomy
        if self.embed:
            if isinstance(inputs, Activations):
                raise ModelError(
                    "this segment starts with the embeddings: pass input_ids [B,T], not Activations"
                )
            if attention_mask is None:
                attention_mask = torch.ones_like(inputs)
            hidden = anatomy.embed(inputs, attention_mask)
        else:
            if not isinstance(inputs, Activations):
                raise ModelError(
                    f"this segment starts at block {self.start} without embeddings: pass the Activations "
                    f"of the previous segment, got {type(inputs).__name__}"
                )
            hidden, attention_mask = inputs.hidden, inputs.attention_mask
        first_only = self.keep == "first" or (self.head and anatomy.head_reads_first)
        if self.end > self.start and packing.requested() and anatomy.packs:
            layout = packing.Packing.of(attention_mask)
            keep = None  # the last block's tokens the head reads: BERT's first, a decoder's last
            if first_only:
                keep = layout.first
            elif self.head and anatomy.head_reads_last and min(layout.lengths, default=0) > 0:
                keep = layout.last
            x = self._packed_blocks(hidden, layout, attention_mask, checkpoint, keep)
            if packed_head:
                return self._packed_head(x, layout), layout
            hidden = x.unsqueeze(1) if keep is not None else layout.unpack(x)
            if keep is not None:  # one real token a row, at column 0 (the head reads it there)
                attention_mask = attention_mask[:, :1]
        elif self.end > self.start:
            # Masks and rotary tables are rebuilt here from the 2-D mask: nothing but Activations
            # crosses a split, whatever side of it this segment runs on.
            context = anatomy.block_context(hidden, attention_mask)
            for i in range(self.start, self.end):
                if checkpoint:  # keep only the block's input; recompute the rest in backward
                    note_checkpoint_input(hidden)
                    hidden = torch.utils.checkpoint.checkpoint(
                        anatomy.run_block, i, hidden, context, use_reentrant=False
                    )
                else:
                    hidden = anatomy.run_block(i, hidden, context)
            if self.keep == "first":
                hidden, attention_mask = hidden[:, :1], attention_mask[:, :1]
        if packed_head:  # a head without blocks here: the real tokens' hidden states only
            layout = packing.Packing.of(attention_mask)
            return self._packed_head(layout.pack(hidden), layout), layout
        if self.head:
            return anatomy.run_head(hidden, attention_mask)
        return Activations(hidden, attention_mask)

    def _packed_blocks(
        self,
        hidden: Tensor,
        layout: packing.Packing,
        attention_mask: Tensor,
        checkpoint: bool,
        keep: Tensor | None,
    ) -> Tensor:
        """The blocks on the real tokens only (``cotune.models.packing``): ``[B, T, D]`` in, the
        real tokens ``[N, D]`` out, or with ``keep`` (one packed token a row) the last block's
        output at those tokens only, ``[B, D]``."""
        context = self.anatomy.block_context(hidden, attention_mask)
        x = layout.pack(hidden)
        for i in range(self.start, self.end):
            out = keep if i == self.end - 1 else None
            if checkpoint:
                note_checkpoint_input(x)
                x = torch.utils.checkpoint.checkpoint(
                    self._packed_block, i, x, layout, context, out, use_reentrant=False
                )
            else:
                x = self._packed_block(i, x, layout, context, out)
        return x

    def _packed_head(self, x: Tensor, layout: packing.Packing) -> Tensor:
        # Active: an adapted head in a cohort maps its row groups to their tokens.
        with packing.active(layout):
            return self.anatomy.run_head(x, None)

    def _packed_block(
        self, i: int, x: Tensor, layout: packing.Packing, context: dict, keep: Tensor | None
    ) -> Tensor:
        # The layout is made active here, not around the loop, so that a checkpointed block's
        # recompute in backward sees it too.
        with packing.active(layout):
            return self.anatomy.run_block_packed(i, x, layout, context, keep)


def task_loss(logits: Tensor, labels: Tensor, task: str) -> Tensor:
    """Cross-entropy; for causal LM position ``t`` predicts token ``t+1`` and label ``-100`` is ignored."""
    if task == "classification":
        return F.cross_entropy(logits.float(), labels)
    if task == "causal_lm":
        # Shift the labels, not the logits: slicing [B, T, V] logits and flattening the slice
        # copies them, and their gradient, the largest tensors of a step at a real vocabulary
        # (head and loss of a 384-wide GPT-2, batch 4 x 128, forward and backward on CPU:
        # 701 -> 592 ms). The last position's target is ignored.
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)
        return _token_mean(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
    raise ModelError(f"unknown task {task!r} (allowed: classification, causal_lm)")


def _token_mean(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over the targets that are not -100, and 0 (no gradient) when there
    are none: a batch of instructions whose answers all fell past ``model.max_length`` has
    nothing to learn, which is not a divergence (a plain mean would be 0/0). Summed, then
    divided on the device: no host sync (the same bits as the mean where there are targets)."""
    count = (targets != -100).sum().clamp_min(1)
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / count


def packed_task_loss(logits: Tensor, labels: Tensor, layout: packing.Packing) -> Tensor:
    """``task_loss`` for causal LM from the real tokens' logits (``Segment.packed_logits``): each
    real token predicts the next label, as in the padded loss, whose padded rows are ignored."""
    targets = layout.pack(F.pad(labels[:, 1:], (0, 1), value=-100))
    return _token_mean(logits.float(), targets)


def segment_loss(
    forward: nn.Module | Callable[..., Tensor],
    inputs: Tensor | Activations,
    attention_mask: Tensor | None,
    labels: Tensor,
    task: str,
) -> Tensor:
    """``task_loss(forward(inputs, attention_mask), labels, task)``; a causal-LM head under
    ``padding_free`` computes logits and loss for the real tokens only (the same loss up to
    float rounding, without a vocabulary-wide row per padded position)."""
    if task == "causal_lm" and isinstance(forward, Segment) and forward.packs_logits():
        logits, layout = forward.packed_logits(inputs, attention_mask)
        return packed_task_loss(logits, labels, layout)
    return task_loss(forward(inputs, attention_mask), labels, task)


def causal_eval(
    forward: nn.Module | Callable[..., Tensor],
    inputs: Tensor | Activations,
    attention_mask: Tensor | None,
    labels: Tensor,
) -> tuple[Tensor, Tensor]:
    """A causal-LM batch's loss (as ``segment_loss``) and, per row, whether greedy decoding
    reproduces its targets: every position with a target ranks it first. Under teacher forcing
    that is exactly whether greedy generation from the row's prompt writes its response token
    for token. A row with no target is False."""
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    if isinstance(forward, Segment) and forward.packs_logits():
        logits, layout = forward.packed_logits(inputs, attention_mask)
        packed = layout.pack(targets)
        loss = _token_mean(logits.float(), packed)
        miss = (logits.argmax(-1) != packed) & (packed != -100)
        missed = layout.unpack(miss.to(torch.int8)).bool()  # padding: no miss
    else:
        logits = forward(inputs, attention_mask)
        loss = _token_mean(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        missed = (logits.argmax(-1) != targets) & (targets != -100)
    return loss, ~missed.any(1) & (targets != -100).any(1)


def attention_bias(
    attention_mask: Tensor,
    *,
    causal: bool,
    window: int | None,
    implementation: str,
    dtype: torch.dtype,
) -> Tensor | None:
    """The 4-D mask a block's attention expects, built from the 2-D padding mask.

    For SDPA ``None`` is returned when nothing is masked beyond what the module's own ``is_causal``
    flag does, so PyTorch can pick its fused kernels (HF does the same). Otherwise a boolean
    ``[B,1,T,T]`` (``[B,1,1,T]`` when bidirectional) mask for SDPA, or an additive float mask for
    eager attention.
    """
    keep = attention_mask.bool()
    T = keep.size(-1)
    window_active = causal and window is not None and window < T
    if implementation == "sdpa" and not window_active and bool(keep.all()):
        return None
    mask = keep[:, None, None, :]
    if causal:
        pos = torch.arange(T, device=keep.device)
        allowed = pos[None, :] <= pos[:, None]  # [q, kv]
        if window_active:
            # Same convention as HF's sliding_window_overlay: kv > q - window.
            allowed = allowed & (pos[None, :] > pos[:, None] - window)
        mask = mask & allowed[None, None, :, :]
    if implementation == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask, torch.finfo(dtype).min
    )
