"""How a node's model computes: mixed precision and gradient checkpointing.

The settings live on the model module itself (``set_compute``), so every ``Segment`` cut from
it, on any node and after any copy of the model, runs the same way: a ``Segment`` enters
``autocast`` around its forward and checkpoints each block when asked. Backward needs nothing:
autograd replays the forward's dtypes, and a checkpointed block recomputes its activations.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

ATTR = "_cotune_compute"
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Compute:
    autocast: str = "none"  # none | bf16 | fp16 (train.autocast)
    checkpointing: bool = False  # train.gradient_checkpointing

    @contextlib.contextmanager
    def forward_context(self, device: torch.device) -> Iterator[None]:
        """Autocast on ``device`` (where the inputs are) when mixed precision is on."""
        if self.autocast == "none":
            yield
            return
        with torch.autocast(device.type, dtype=AUTOCAST_DTYPES[self.autocast]):
            yield

    def checkpoint_blocks(self) -> bool:
        """Whether this forward should recompute blocks in backward (only when it will have one)."""
        return self.checkpointing and torch.is_grad_enabled()


DEFAULT = Compute()


def set_compute(model: nn.Module, compute: Compute) -> None:
    model.__dict__[ATTR] = compute


def compute_of(model: nn.Module) -> Compute:
    return model.__dict__.get(ATTR, DEFAULT)


@contextlib.contextmanager
def without_checkpointing(model: nn.Module) -> Iterator[None]:
    """``model``'s forwards in the block keep their activations (its other settings stay)."""
    compute = compute_of(model)
    if not compute.checkpointing:
        yield
        return
    set_compute(model, dataclasses.replace(compute, checkpointing=False))
    try:
        yield
    finally:
        set_compute(model, compute)


def compute_from(train: object) -> Compute:
    """The ``Compute`` a ``TrainSection`` asks for."""
    return Compute(
        autocast=getattr(train, "autocast", "none"),
        checkpointing=bool(getattr(train, "gradient_checkpointing", False)),
    )


# While a memory probe runs: the block inputs a checkpointed forward keeps alive (the only
# activations a checkpointed block holds between forward and backward).
_KEPT: ContextVar[list[torch.Tensor] | None] = ContextVar("checkpoint_inputs", default=None)


@contextlib.contextmanager
def kept_for_checkpoint() -> Iterator[list[torch.Tensor]]:
    kept: list[torch.Tensor] = []
    token = _KEPT.set(kept)
    try:
        yield kept
    finally:
        _KEPT.reset(token)


def note_checkpoint_input(hidden: torch.Tensor) -> None:
    kept = _KEPT.get()
    if kept is not None:
        kept.append(hidden)
