"""Several roles' optimizer steps as one AdamW call.

Colocated devices that finish a step together (a split step's device updates, a cohort's local
steps) would otherwise pay one optimizer call each: activate the role, step the shared
``Parameter`` objects, deactivate. Here the roles' own tensors go into one AdamW call. AdamW's
arithmetic is per element, so each role's update is bit for bit the one its own step would make
(``tests/train/test_step_many.py``); the divergence guards run per role, in order.

Roles of *different* trainers join one call too when their optimizer settings and learning rate
at their step agree (every device of a run builds its own trainer with the same settings).

A joint step updates the role tensors, never the shared ``Parameter`` objects, so it does not
bump their autograd version counters: a colocated role whose forward graph still waits for its
backward is not invalidated by another role's update (which a ``Trainer.step_role`` would do).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from cotune.errors import DivergenceError

if TYPE_CHECKING:
    from cotune.train.state import RoleState, Trainer

#: ``(trainer, state, grads, coef)``: one role's step from gradients computed elsewhere, with an
#: external clip factor (``None``: no clipping), as ``Trainer.step(coef, clip=False)`` takes it.
RoleUpdate = tuple["Trainer", "RoleState", dict[str, torch.Tensor], "float | None"]


def step_roles(
    updates: list[RoleUpdate],
    roles: list[str] | None = None,
    norms: list[float | None] | None = None,
) -> list[bool]:
    """Apply every update; the role's step count advances (a skipped update counts as a step,
    as ``Trainer.step`` leaves it). With fp16 loss scaling (a scale per role) a role steps
    alone through its trainer. Returns, per update, whether it was applied (False: skipped
    by ``train.on_nonfinite: skip``); ``roles`` names each update's role in a divergence
    error; ``norms``: each update's gradient norm where the caller computed it already (over
    the same tensors in the trainer's parameter order, before any clipping; None: computed
    here), for the non-finite guard."""
    groups: dict[tuple, list[int]] = {}
    applied = [True] * len(updates)
    for i, u in enumerate(updates):
        trainer, state = u[0], u[1]
        if trainer._active is not None:
            raise RuntimeError("another role state is already active")
        if trainer.cfg.autocast == "fp16":
            skipped = trainer.skipped
            with _named(roles, i):
                trainer.step_role(state, u[2], u[3])
            applied[i] = trainer.skipped == skipped
            continue
        d = trainer.optimizer.defaults
        key = (
            tuple(d["betas"]), d["eps"], d["weight_decay"], trainer.cfg.on_nonfinite,
            trainer.device, trainer.lr_at(state.step),
        )  # fmt: skip
        groups.setdefault(key, []).append(i)
    known = norms if norms is not None else [None] * len(updates)
    for key, group in groups.items():
        _step_group([updates[i] for i in group], group, lr=key[-1], roles=roles, applied=applied,
                    norms=[known[i] for i in group])  # fmt: skip
    return applied


@contextlib.contextmanager
def _named(roles: list[str] | None, i: int) -> Iterator[None]:
    """A divergence error raised inside names update ``i``'s role."""
    try:
        yield
    except DivergenceError as err:
        if roles is None:
            raise
        raise err.for_role(roles[i]) from None


def _step_group(
    group: list[RoleUpdate],
    index: list[int],
    lr: float,
    roles: list[str] | None,
    applied: list[bool],
    norms: list[float | None],
) -> None:
    leader = group[0][0]
    skip = leader.cfg.on_nonfinite == "skip"
    tensors, owners = [], []
    joint = leader.joint_optimizer()
    for i, known, (trainer, state, grads, coef) in zip(index, norms, group):
        state.place(trainer.device)
        mine = [(k, g) for k in trainer.params if (g := grads.get(k)) is not None]
        if mine:
            norm = (
                known
                if known is not None
                else float(torch.nn.utils.get_total_norm([g for _, g in mine]))
            )
            if not math.isfinite(norm):
                with _named(roles, i):
                    trainer.nonfinite(f"non-finite gradient (norm {norm})", state.step + 1)
                state.step += 1  # skipped (``stop`` raised), as ``step`` leaves it
                applied[i] = False
                continue
            if coef is not None:
                torch._foreach_mul_([g for _, g in mine], coef)
        weights = [state.params[k] for k in trainer.params]
        backup = [w.clone() for w in weights] if skip else None
        for k, g in mine:
            t = state.params[k]
            t.grad = g
            tensors.append(t)
            joint.state[t] = state.optim.setdefault(k, {})
        owners.append((i, trainer, state, weights, backup))
    joint.param_groups[0]["params"] = tensors
    joint.param_groups[0]["lr"] = lr
    try:
        if tensors:
            joint.step()
    finally:
        for t in tensors:
            t.grad = None
        joint.state.clear()
        joint.param_groups[0]["params"] = []
    for i, trainer, state, weights, backup in owners:
        state.step += 1
        if not bool(torch.stack(torch._foreach_norm(weights)).isfinite().all()):
            if backup is not None:
                for w, b in zip(weights, backup):
                    w.copy_(b)
            applied[i] = False
            with _named(roles, i):
                trainer.nonfinite("the update made the adapter weights non-finite", state.step)
