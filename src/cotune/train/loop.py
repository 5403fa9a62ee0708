"""One optimizer step and one evaluation pass, shared by every paradigm that trains a whole model.

Split paradigms compose the same pieces around their cut; the loss function is passed in so a
paradigm decides what runs where.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cotune.data import Batch, EncodedDataset
from cotune.models import segment_loss, task_loss
from cotune.models.packing import padding_free, token_dims
from cotune.models.segment import causal_eval
from cotune.sim.costs import FlopCounter
from cotune.train.state import RoleState, Trainer

LossFn = Callable[[Batch], torch.Tensor]


def full_model_loss(
    forward: nn.Module, task: str, reg_loss: Callable[[], torch.Tensor | None]
) -> LossFn:
    """Task loss of the unsplit model plus the adapter method's regularizer (if it has one)."""

    def loss_fn(batch: Batch) -> torch.Tensor:
        loss = segment_loss(forward, batch.input_ids, batch.attention_mask, batch.labels, task)
        reg = reg_loss()
        return loss + reg if reg is not None else loss

    return loss_fn


@dataclass
class StepResult:
    loss: float
    lr: float
    grad_norm: float | None
    examples: int
    flops: int = 0  # forward + backward FLOPs actually run (0 when not counted)


def train_step(
    trainer: Trainer,
    state: RoleState,
    loss_fn: LossFn,
    micro_batches: Sequence[Batch],
    *,
    counter: FlopCounter | None = None,
    key: str = "train",
) -> StepResult:
    """One optimizer step of the *active* role over ``micro_batches`` (gradient accumulation).

    With a ``counter``, each micro-batch's forward + backward is counted once per batch shape
    (cached, so steady-state training pays nothing for the count).
    """
    lr = trainer.set_lr(state.step)
    total = 0.0
    flops = 0
    n = len(micro_batches)

    def fwd_bwd(batch: Batch) -> float:
        loss = loss_fn(batch)
        trainer.backward(loss / n)
        return float(loss.detach())

    packed = bool(getattr(trainer.cfg, "padding_free", False))
    with padding_free(packed):
        for batch in micro_batches:
            if counter is None:
                total += fwd_bwd(batch)
            else:
                # Cached per batch shape (and real tokens when padding-free); the dims let the
                # counter learn and verify its FLOP law.
                dims = token_dims(batch.attention_mask, packed)
                value, f = counter.run(key, fwd_bwd, batch, dims=dims)
                total += value
                flops += f
    norm = trainer.clip_and_step(loss=total / n)
    state.step += 1
    return StepResult(
        loss=total / n,
        lr=lr,
        grad_norm=norm,
        examples=sum(int(b.input_ids.shape[0]) for b in micro_batches),
        flops=flops,
    )


@torch.no_grad()
def evaluate(
    forward: nn.Module,
    model: nn.Module,
    dataset: EncodedDataset,
    task: str,
    batch_size: int,
) -> dict[str, float]:
    """Mean loss over the dataset, plus accuracy (classification) or perplexity (causal LM);
    on instruction data also ``exact_match``: the share of prompted examples (with a response
    token within ``model.max_length``) whose response greedy decoding reproduces exactly."""
    was_training = model.training
    model.eval()
    loss_sum, weight, correct, count = 0.0, 0, 0, 0
    prompt_lens = dataset.prompt_lens if task == "causal_lm" else None
    answered, asked = 0, 0  # instructions reproduced, instructions with a response
    try:
        for start in range(0, len(dataset), batch_size):
            batch = dataset.batch(list(range(start, min(start + batch_size, len(dataset)))))
            if task == "classification":
                logits = forward(batch.input_ids, batch.attention_mask)
                n = int(batch.labels.shape[0])
                loss_sum += float(task_loss(logits, batch.labels, task)) * n
                weight += n
                correct += int((logits.argmax(-1) == batch.labels).sum())
                count += n
            else:
                # Weight by predicted tokens so the mean is per token, not per batch.
                n = int((batch.labels[:, 1:] != -100).sum())
                if not n:
                    continue
                ids, mask = batch.input_ids, batch.attention_mask
                if prompt_lens is None:
                    loss = segment_loss(forward, ids, mask, batch.labels, task)
                else:
                    loss, exact = causal_eval(forward, ids, mask, batch.labels)
                    lens = prompt_lens[start : start + int(ids.shape[0])]
                    rows = torch.tensor([k > 0 for k in lens], device=exact.device)
                    rows &= (batch.labels[:, 1:] != -100).any(1)
                    answered += int((exact & rows).sum())
                    asked += int(rows.sum())
                loss_sum += float(loss) * n
                weight += n
    finally:
        model.train(was_training)
    loss = loss_sum / max(weight, 1)
    out = {"loss": loss, "examples": float(len(dataset))}
    if task == "classification":
        out["accuracy"] = correct / max(count, 1)
    else:
        out["perplexity"] = math.exp(min(loss, 50.0))
        if asked:
            out["exact_match"] = answered / asked
    return out
