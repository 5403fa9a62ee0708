"""Per-role training state over one shared model (design principle 3).

Every simulated device (and the server) trains the *same* module objects: one frozen base and
one set of adapter ``Parameter`` objects. What a role owns is a ``RoleState``: its own tensors
for those parameters, its AdamW moments, its step count, its batch sampler and its RNG state.
``Trainer.activate(state)`` swaps the role's tensors into the shared parameters by pointer
(``param.data = tensor``) and hands the optimizer the role's moment dict, so switching roles
costs no copy and memory grows with the adapters, not with the number of devices.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cotune.config import TrainSection
from cotune.errors import CheckpointError, DivergenceError

log = logging.getLogger(__name__)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based): linear warm-up, then decay."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


@dataclass
class RoleState:
    """Everything one role owns while training: parameters, optimizer moments, progress, RNG."""

    params: dict[str, torch.Tensor]
    optim: dict[str, dict[str, Any]] = field(default_factory=dict)
    step: int = 0
    rng: torch.Tensor | None = None  # the CPU generator's state
    sampler: dict[str, Any] | None = None
    cuda_rng: torch.Tensor | None = None  # the node's CUDA generator's state (GPU nodes)
    scaler: dict[str, Any] | None = None  # fp16 loss scaling (train.autocast: fp16)

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "optim": self.optim,
            "step": self.step,
            "rng": self.rng,
            "sampler": self.sampler,
            "cuda_rng": self.cuda_rng,
            "scaler": self.scaler,
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> RoleState:
        try:
            return cls(
                params=d["params"],
                optim=d["optim"],
                step=int(d["step"]),
                rng=d["rng"],
                sampler=d["sampler"],
                cuda_rng=d.get("cuda_rng"),  # absent from checkpoints of CPU-only versions
                scaler=d.get("scaler"),
            )
        except KeyError as exc:
            raise CheckpointError(f"role state is missing {exc.args[0]!r}") from None

    def clone_params(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.params.items()}

    def place(self, device: torch.device) -> None:
        """Move the tensors this role trains to ``device`` (a state restored from a CPU
        checkpoint, or built on another node), once; already placed tensors stay as they are."""
        for k, v in self.params.items():
            if _misplaced(v, device):
                self.params[k] = v.to(device)
        for moments in self.optim.values():
            for k, v in moments.items():
                # AdamW keeps its step count on the CPU (capturable=False): leave scalars be.
                if isinstance(v, torch.Tensor) and v.dim() > 0 and _misplaced(v, device):
                    moments[k] = v.to(device)


def _misplaced(t: torch.Tensor, device: torch.device) -> bool:
    # Meta tensors (layers a partially loaded node does not hold) have no data to move.
    return t.device != device and not t.is_meta


def _own_copy(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    t = t.detach()
    return t.to(device, copy=True) if _misplaced(t, device) else t.clone()


class Trainer:
    """One AdamW over the shared trainable parameters; roles take turns through ``activate``.

    The trainer computes where its parameters live (the node's device). With
    ``train.autocast: fp16`` it scales the loss (``backward``) and unscales before clipping; a
    gradient overflow then only skips the step and lowers the scale, as loss scaling intends.
    """

    def __init__(self, params: dict[str, nn.Parameter], cfg: TrainSection, total_steps: int):
        if not params:
            raise ValueError("no trainable parameters: did the adapter injection match any module?")
        self.params = params
        self.cfg = cfg
        self.total_steps = total_steps
        # (A node that loaded only its segment holds the other layers' adapters on meta.)
        held = [p.device for p in params.values() if not p.is_meta]
        self.device = held[0] if held else torch.device("cpu")
        self.scaler: torch.amp.GradScaler | None = None
        self.overflow_skips = 0  # fp16 steps skipped for a gradient overflow (scale lowered)
        self.optimizer = torch.optim.AdamW(
            list(params.values()),
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            weight_decay=cfg.weight_decay,
            foreach=True,
        )
        self._active: RoleState | None = None
        self.skipped = 0  # updates skipped for a non-finite value (train.on_nonfinite: skip)

    def new_state(self, seed: int, params: dict[str, torch.Tensor] | None = None) -> RoleState:
        """A fresh role state starting from ``params`` (default: the shared parameters' values)."""
        src = params if params is not None else {k: p.data for k, p in self.params.items()}
        missing = set(self.params) - set(src)
        if missing:
            raise CheckpointError(f"state lacks parameters: {sorted(missing)[:5]}")
        gen = torch.Generator().manual_seed(seed)
        cuda_rng = None
        if self.device.type == "cuda":
            cuda_rng = torch.Generator(device=self.device).manual_seed(seed).get_state()
        return RoleState(
            params={k: _own_copy(src[k], self.device) for k in self.params},
            optim={k: {} for k in self.params},
            rng=gen.get_state(),
            cuda_rng=cuda_rng,
        )

    @contextmanager
    def activate(self, state: RoleState) -> Iterator[RoleState]:
        """Swap ``state`` into the shared parameters, optimizer and global RNG for the block."""
        if self._active is not None:
            raise RuntimeError("another role state is already active")
        self._check_fits(state)  # before anything is swapped: a bad state leaves the model be
        state.place(self.device)
        cuda = self.device.type == "cuda"
        outer_rng = torch.get_rng_state()
        outer_cuda = torch.cuda.get_rng_state(self.device) if cuda else None
        # The parameters' own tensors go back in at the end: outside a block they hold the
        # node's initial values, so a role built later starts where one built first did.
        home = [p.data for p in self.params.values()]
        for name, p in self.params.items():
            p.data = state.params[name]
            p.grad = None
            self.optimizer.state[p] = state.optim.setdefault(name, {})
        if state.rng is not None:
            torch.set_rng_state(state.rng)
        if cuda and state.cuda_rng is not None:
            torch.cuda.set_rng_state(state.cuda_rng, self.device)
        if self.cfg.autocast == "fp16":  # each role's own loss scale, like its RNG
            self.scaler = torch.amp.GradScaler(self.device.type)
            if state.scaler is not None:
                self.scaler.load_state_dict(state.scaler)
        self._active = state
        try:
            yield state
        finally:
            # AdamW mutated the role's own dicts in place; the RNG and scale are read back.
            state.rng = torch.get_rng_state()
            torch.set_rng_state(outer_rng)
            if cuda:
                state.cuda_rng = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(outer_cuda, self.device)
            if self.scaler is not None:
                state.scaler = self.scaler.state_dict()
                self.scaler = None
            for p, data in zip(self.params.values(), home):
                p.data = data
                p.grad = None
                self.optimizer.state.pop(p, None)
            self._active = None

    def _check_fits(self, state: RoleState) -> None:
        missing = [name for name in self.params if name not in state.params]
        if missing:
            raise CheckpointError(
                f"role state lacks {len(missing)} trained parameter(s): {missing[:3]}"
            )
        rng = torch.get_rng_state()
        if state.rng is not None and (
            not isinstance(state.rng, torch.Tensor)
            or state.rng.dtype != rng.dtype
            or state.rng.shape != rng.shape
        ):
            raise CheckpointError("role state's RNG state is not a CPU generator's state")

    def _span(self) -> int:
        if self.cfg.schedule_steps is not None:  # this trainer's share of the longer schedule
            return max(1, round(self.total_steps * self.cfg.schedule_steps / self.cfg.steps))
        return self.total_steps

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based) on this trainer's schedule."""
        return self.cfg.lr * lr_factor(step, self._span(), self.cfg.warmup_steps, self.cfg.schedule)

    def set_lr(self, step: int) -> float:
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, scaled when fp16 loss scaling is on."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def clip_and_step(self, loss: float | None = None) -> float | None:
        """Clip (when configured), step and zero the gradients; returns the pre-clip grad norm."""
        return self.step(loss=loss)

    def step(
        self, coef: float | None = None, *, clip: bool = True, loss: float | None = None
    ) -> float | None:
        """The one optimizer step every paradigm takes, guarded against divergence.

        ``coef`` is an external clip factor (split paradigms clip by the norm across the cut,
        which neither side sees alone; they pass ``clip=False``); otherwise
        ``train.max_grad_norm`` clips here. A
        non-finite loss, gradient or resulting weight stops the run (``DivergenceError`` naming
        the step) or, with ``train.on_nonfinite: skip``, leaves the weights as they were.
        Returns the gradient norm before clipping (None when nothing was measured or skipped).
        """
        with_grad = [p for p in self.params.values() if p.grad is not None]
        grads = [p.grad for p in with_grad]
        step = self._active.step + 1 if self._active is not None else None
        if loss is not None and not math.isfinite(loss):
            return self.nonfinite(f"non-finite loss ({loss})", step)
        norm = None
        scaler = self.scaler
        if scaler is not None and grads:
            scaler.unscale_(self.optimizer)
        if grads:
            total = torch.nn.utils.get_total_norm(grads)
            norm = float(total)
            if not math.isfinite(norm):
                if scaler is not None:  # an fp16 overflow: skip the step, lower the scale
                    scaler.update()
                    self.overflow_skips += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    return None
                return self.nonfinite(f"non-finite gradient (norm {norm})", step)
        if coef is not None:
            torch._foreach_mul_(grads, coef)
        elif clip and self.cfg.max_grad_norm is not None and grads:
            torch.nn.utils.clip_grads_with_norm_(with_grad, self.cfg.max_grad_norm, total)
        skip = self.cfg.on_nonfinite == "skip"
        backup = [p.data.clone() for p in self.params.values()] if skip else None
        if scaler is not None and grads:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        weights = [p.data for p in self.params.values()]
        if not bool(torch.stack(torch._foreach_norm(weights)).isfinite().all()):
            if backup is not None:
                for w, b in zip(weights, backup):
                    w.copy_(b)
            return self.nonfinite("the update made the adapter weights non-finite", step)
        return norm if clip and self.cfg.max_grad_norm is not None and coef is None else None

    def step_role(
        self, state: RoleState, grads: dict[str, torch.Tensor], coef: float | None
    ) -> None:
        """One role's optimizer step from gradients computed elsewhere, with an external clip
        factor (split paradigms: the norm across the cut); the role's step count advances."""
        with self.activate(state):
            self.set_lr(state.step)
            for k, p in self.params.items():
                p.grad = grads.get(k)
            self.step(coef, clip=False)
            state.step += 1

    def step_many(
        self, updates: list[tuple[RoleState, dict[str, torch.Tensor], float | None]]
    ) -> None:
        """``step(coef, clip=False)`` for several roles of this trainer at once, each
        ``(state, grads, coef)``: see ``cotune.train.joint.step_roles``."""
        from cotune.train.joint import step_roles

        step_roles([(self, *u) for u in updates])

    def joint_optimizer(self) -> torch.optim.AdamW:
        """An AdamW with this trainer's settings and no parameters of its own: a joint step
        (``cotune.train.joint``) fills its list with role tensors for one call."""
        joint = getattr(self, "_joint", None)
        if joint is None:
            d = self.optimizer.defaults
            joint = self._joint = torch.optim.AdamW(
                [torch.zeros(1)], lr=d["lr"], betas=d["betas"], eps=d["eps"],
                weight_decay=d["weight_decay"], foreach=True,
            )  # fmt: skip
        return joint

    def nonfinite(self, what: str, step: int | None) -> None:
        where = f" at step {step}" if step is not None else ""
        if self.cfg.on_nonfinite == "stop":
            self.optimizer.zero_grad(set_to_none=True)
            raise DivergenceError(f"training diverged: {what}{where}", step=step)
        log.warning("skipping the update%s: %s (train.on_nonfinite: skip)", where, what)
        self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        return None
