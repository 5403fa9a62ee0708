"""Machinery shared by the split-learning paradigms (``split``, ``splitfed``; ``splitfrozen``
reuses the layout checks and the server's message validation).

One training step of one device, as messages through ``exp.engine``::

    device: forward to the cut ──activations (hidden, mask[, labels])──▶ server
    server: forward (+ loss, backward) of its blocks
       U-shaped only: ──activations──▶ device (top + loss + backward) ──gradients──▶ server backward
    server ──gradients (cut gradient, server's squared grad norm)──▶ device backward
    device ──norm (device's squared grad norm)──▶ server        (global clipping only)

Both sides clip with the same global norm, so one device with aggregation every step equals
central training. Device and server each own a ``Trainer`` (their own AdamW states).

Autograd keeps a version counter per ``Parameter``: an optimizer step of *any* role between a
device's forward and its backward invalidates the graph. So within a step every device first
runs its forward, the server then serves the queue in arrival order (simulated time) and every
device backward runs; device optimizer steps come last. The math equals serving devices one by
one in arrival order; the clock sees devices in parallel and a FIFO server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cotune.data import Batch, BatchSampler, EncodedDataset
from cotune.errors import ConfigError, ProtocolError
from cotune.models import Activations, Segment, task_loss
from cotune.paradigms.base import Experiment, reply
from cotune.paradigms.options import CutOptions
from cotune.runtime import Message, Role
from cotune.runtime.validate import check_activation
from cotune.sim.costs import MemoryEstimate, MemoryProbe
from cotune.sim.simulation import SERVER
from cotune.train import RoleState, Trainer


def check_cut_message(exp: Experiment, msg: Message, *, labels: bool) -> Message:
    """Shape/dtype/NaN checks of a device's cut activations (ProtocolError naming them)."""
    name = f"message {msg.kind!r} from {msg.sender!r}"
    want = ["hidden", "attention_mask"] + (["labels"] if labels else [])
    for key in want:
        if key not in msg.tensors:
            raise ProtocolError(f"{name}: missing tensor {key!r} (has {sorted(msg.tensors)})")
    dtype = next(iter(exp.trainer.params.values())).dtype
    d = exp.loaded.anatomy.hidden_size
    h = check_activation(
        f"{name}: tensor 'hidden'", msg.tensors["hidden"], shape=[None, None, d], dtype=dtype
    )
    b, t = h.shape[:2]
    check_activation(
        f"{name}: tensor 'attention_mask'",
        msg.tensors["attention_mask"],
        shape=[b, t],
        dtype=torch.long,
    )
    if labels:
        shape = [b] if exp.task == "classification" else [b, t]
        check_activation(
            f"{name}: tensor 'labels'", msg.tensors["labels"], shape=shape, dtype=torch.long
        )
    return msg


@dataclass
class Layout:
    bottom: Segment
    server: Segment
    top: Segment | None
    device_names: list[str]
    server_names: list[str]


def make_layout(exp: Experiment, opts: CutOptions) -> Layout:
    """Segments for ``opts`` and which adapter parameters live on which side (ConfigError if bad)."""
    anatomy = exp.loaded.anatomy
    n, cut = anatomy.num_layers, opts.cut
    where = "paradigm.options"
    if not 1 <= cut <= n:
        raise ConfigError(
            f"{where}.cut: {cut} is outside the model ({exp.cfg.model.name_or_path} has {n} "
            f"blocks; the device needs at least one block: 1 <= cut < {n})"
        )
    top_start = n
    if opts.u_shaped:
        top_start = n if opts.cut_top is None else opts.cut_top
        if not cut < top_start <= n:
            raise ConfigError(
                f"{where}.cut_top: {top_start} must satisfy cut ({cut}) < cut_top <= {n} so the "
                "server keeps at least one block"
            )
    elif opts.cut_top is not None:
        raise ConfigError(f"{where}.cut_top is only used with u_shaped: true")
    elif cut == n:
        raise ConfigError(
            f"{where}.cut: {cut} leaves the server nothing (the model has {n} blocks); use "
            f"cut < {n}, or u_shaped: true with cut_top"
        )
    bottom = anatomy.segment(0, cut, embed=True, head=False)
    server = anatomy.segment(cut, top_start, embed=False, head=not opts.u_shaped)
    top = anatomy.segment(top_start, n, embed=False, head=True) if opts.u_shaped else None
    names = list(exp.trainer.params)
    dev = [k for k in names if bottom.owns(k) or (top is not None and top.owns(k))]
    srv = [k for k in names if k not in set(dev)]
    for side, got in (("device", dev), ("server", srv)):
        if not got:
            raise ConfigError(
                f"{where}: with cut={cut} the {side} side owns no adapter parameter; adapt "
                "layers on both sides of the cut (peft.layers / peft.target_modules) or move the cut"
            )
    return Layout(bottom, server, top, dev, srv)


def side_reg(exp: Experiment, owns: Callable[[str], bool]) -> Callable[[], torch.Tensor | None]:
    """The adapter method's regularizer over the layers one side holds (None: nothing to add)."""
    layers = [layer for path, layer in exp.adapters.layers.items() if owns(path)]

    def reg() -> torch.Tensor | None:
        losses = [x for layer in layers if (x := layer.regularization_loss()) is not None]
        return torch.stack(losses).sum() if losses else None

    return reg


def sq_norm(grads: list[torch.Tensor]) -> float:
    return sum(float(torch.linalg.vector_norm(g)) ** 2 for g in grads)


def clip_coef(max_norm: float | None, total_sq: float) -> float | None:
    """``clip_grad_norm_``'s factor for a norm computed across the cut (None: no clipping)."""
    if max_norm is None:
        return None
    return min(1.0, max_norm / (total_sq**0.5 + 1e-6))


def segment_memory(exp: Experiment, segment: Segment, *, train: bool) -> MemoryEstimate:
    """Peak memory of the role running ``segment``: only its weights, adapters, optimizer state
    and saved activations (forward-only segments: no grads, no optimizer, no saved tensors)."""
    cfg = exp.cfg
    ids = torch.ones(cfg.train.batch_size, cfg.model.max_length, dtype=torch.long)
    mask = ids.clone()
    inputs: torch.Tensor | Activations = ids
    if not segment.embed:
        d = exp.loaded.anatomy.hidden_size
        hidden = torch.zeros(*ids.shape, d, requires_grad=True)
        inputs = Activations(hidden, mask)
    was = exp.loaded.model.training
    exp.loaded.model.train(train)
    try:
        est = MemoryProbe().estimate("segment", segment, segment, inputs, mask)
    finally:
        exp.loaded.model.train(was)
    if train:
        return est
    # Forward only: no gradients, optimizer state or saved tensors; working set ≈ a few hidden
    # states of the batch (input, residual, attention/MLP output).
    act = 4 * ids.numel() * exp.loaded.anatomy.hidden_size * 4
    weights = est.weights
    return MemoryEstimate(weights, 0, 0, act, weights + act)


def device_memory(exp: Experiment, ctx: SplitContext) -> MemoryEstimate:
    """A training device's estimate: its bottom segment, plus its top one when U-shaped."""
    parts = [segment_memory(exp, ctx.layout.bottom, train=True)]
    if ctx.layout.top is not None:
        parts.append(segment_memory(exp, ctx.layout.top, train=True))
    fields = ("weights", "grads", "optimizer", "activations", "total")
    return MemoryEstimate(*(sum(getattr(m, f) for m in parts) for f in fields))


@dataclass
class SplitContext:
    """What the device and server roles of one split run share."""

    exp: Experiment
    opts: CutOptions
    layout: Layout
    device_trainer: Trainer
    server_trainer: Trainer
    codec: str
    skipped: list[tuple[int, str, str]] = field(default_factory=list)  # (step, device, error)
    rejected_updates: int = 0  # device adapters refused at aggregation (non-finite, malformed)

    @classmethod
    def build(cls, exp: Experiment, opts: CutOptions, server_steps: int) -> SplitContext:
        cfg = exp.cfg
        if cfg.train.grad_accum != 1:
            raise ConfigError("train.grad_accum: split paradigms support only grad_accum: 1")
        layout = make_layout(exp, opts)
        params = exp.trainer.params
        dev = Trainer({k: params[k] for k in layout.device_names}, cfg.train, cfg.train.steps)
        srv = Trainer({k: params[k] for k in layout.server_names}, cfg.train, server_steps)
        return cls(exp, opts, layout, dev, srv, cfg.engine.activation_codec)

    @property
    def global_clip(self) -> bool:
        """Clipping by the norm across the cut is on: server and devices exchange squared norms."""
        return self.opts.clip == "global" and self.exp.cfg.train.max_grad_norm is not None

    def extra(self) -> dict[str, object]:
        params = self.exp.trainer.params
        return {
            "cut": self.opts.cut,
            "u_shaped": self.opts.u_shaped,
            "device_trainable_params": sum(params[k].numel() for k in self.layout.device_names),
            "server_trainable_params": sum(params[k].numel() for k in self.layout.server_names),
            "skipped_batches": len(self.skipped),
            "rejected_updates": self.rejected_updates,
        }

    def combined(self, device: RoleState, server: RoleState) -> RoleState:
        """The whole adapter (device side + server side) as one state, for eval and export."""
        return RoleState(params={**device.params, **server.params})

    def check_incoming(self, msg: Message, *, labels: bool) -> Message:
        return check_cut_message(self.exp, msg, labels=labels)


class SplitDevice(Role):
    """A device holding the bottom (and, U-shaped, the top) of the model with its adapters."""

    def __init__(self, role_id: str, ctx: SplitContext, dataset: EncodedDataset, seed: int):
        super().__init__(role_id)
        self.ctx, self.dataset = ctx, dataset
        self.state = ctx.device_trainer.new_state(seed, ctx.exp.initial_params())
        self.sampler = BatchSampler(len(dataset), ctx.exp.cfg.train.batch_size, seed)
        self.reg = side_reg(ctx.exp, lambda p: owned_by_device(ctx.layout, p))
        self._pending: tuple[Activations, torch.Tensor | None, torch.Tensor] | None = None
        self.grads: dict[str, torch.Tensor] = {}
        self.server_sq = 0.0
        self.rejected = False
        self.round = 0
        # Backward waits for `run_deferred_backward` or a cohort (set per step by the paradigm).
        self.defer_backward = False
        self.cut_grad: torch.Tensor | None = None
        self._norm_step: int | None = None  # send a "norm" message after this step's backward

    def outgoing(self, acts: Activations, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors of the ``activations`` message (a test may corrupt them here)."""
        out = {"hidden": acts.hidden.detach(), "attention_mask": acts.attention_mask}
        if not self.ctx.opts.u_shaped:
            out["labels"] = labels  # label-sharing split learning, as SplitLoRA does
        return out

    def next_batch(self, rnd: int) -> Batch:
        """This step's batch (the sampler moves on; the step's flags reset)."""
        batch = self.dataset.batch(self.sampler.next_indices())
        self.state.sampler = self.sampler.state_dict()
        self.rejected, self.round = False, rnd
        return batch

    def send_activations(self, step: int, rnd: int, batch: Batch | None = None) -> None:
        exp, trainer = self.ctx.exp, self.ctx.device_trainer
        batch = self.next_batch(rnd) if batch is None else batch

        def forward(b):
            return self.ctx.layout.bottom(b.input_ids, b.attention_mask), self.reg()

        with trainer.activate(self.state):
            (acts, reg), flops = exp.sim.flops.run(
                "split-device-fwd", forward, batch, dims=batch_dims(batch.input_ids)
            )
        self.emit(step, rnd, batch, acts, reg, flops)

    def emit(
        self,
        step: int,
        rnd: int,
        batch: Batch,
        acts: Activations,
        reg: torch.Tensor | None,
        flops: int,
    ) -> None:
        """Charge the forward and send the cut activations (also used by a device cohort)."""
        exp = self.ctx.exp
        exp.sim.charge(self.role_id, flops, round=rnd, label="forward")
        self._pending = (acts, reg, batch.labels)
        meta = {"step": step, "round": rnd, "examples": int(batch.input_ids.shape[0])}
        meta["device_reg"] = float(reg.detach()) if reg is not None else 0.0
        msg = Message("activations", self.role_id, SERVER, self.outgoing(acts, batch.labels), meta)
        exp.engine.send(msg, codec=self.ctx.codec)

    def on_activations(self, msg: Message) -> Message:
        """U-shaped: the server's output comes back; run the top, the loss and its backward."""
        exp, top = self.ctx.exp, self.ctx.layout.top
        assert self._pending is not None and top is not None
        mine = self._pending[0]
        hidden = check_activation(
            f"message 'activations' from {msg.sender!r}: tensor 'hidden'",
            msg.tensors["hidden"],
            shape=list(mine.hidden.shape),
            dtype=mine.hidden.dtype,
        )
        acts = Activations(hidden.requires_grad_(True), mine.attention_mask)

        def fwd_bwd(a: Activations, labels: torch.Tensor) -> float:
            loss = task_loss(top(a), labels, exp.task)
            loss.backward()
            return float(loss.detach())

        with self.ctx.device_trainer.activate(self.state):
            loss, flops = exp.sim.flops.run(
                "split-device-top", fwd_bwd, acts, self._pending[2], dims=batch_dims(acts.hidden)
            )
            self._stash()
        exp.sim.charge(self.role_id, flops, round=self.round, label="top")
        return reply(msg, "gradients", {"grad": acts.hidden.grad}, loss=loss)

    def on_gradients(self, msg: Message) -> Message | None:
        assert self._pending is not None
        acts = self._pending[0]
        grad = check_activation(
            f"message 'gradients' from {msg.sender!r}: tensor 'grad'",
            msg.tensors["grad"],
            shape=list(acts.hidden.shape),
            dtype=acts.hidden.dtype,
        )
        self.server_sq = float(msg.meta.get("server_sq", 0.0))
        self._norm_step = int(msg.meta["step"]) if msg.meta.get("send_norm") else None
        if self.defer_backward:  # a cohort (or the pooled server's protocol) runs it later
            self.cut_grad = grad
            return None
        self._backward(grad)
        if msg.meta.get("want_norm"):
            return reply(msg, "norm", device_sq=sq_norm(list(self.grads.values())))
        return None

    def _backward(self, grad: torch.Tensor) -> None:
        exp = self.ctx.exp
        assert self._pending is not None
        acts, reg, _ = self._pending

        def backward(g: torch.Tensor) -> None:
            outs, grads = [acts.hidden], [g]
            if reg is not None:
                outs.append(reg)
                grads.append(torch.ones_like(reg))
            torch.autograd.backward(outs, grads)

        with self.ctx.device_trainer.activate(self.state):
            _, flops = exp.sim.flops.run("split-device-bwd", backward, grad, dims=batch_dims(grad))
            self._stash()
        self.backward_done(flops)

    def backward_done(self, flops: int) -> None:
        """Charge the backward; send the norm message when the server asked for one."""
        exp = self.ctx.exp
        exp.sim.charge(self.role_id, flops, round=self.round, label="backward")
        self._pending, self.cut_grad = None, None
        if self._norm_step is not None:
            meta = {"step": self._norm_step, "round": self.round}
            meta["device_sq"] = sq_norm(list(self.grads.values()))
            exp.engine.send(Message("norm", self.role_id, SERVER, {}, meta))
            self._norm_step = None

    def run_deferred_backward(self) -> None:
        """The backward of a deferred cut gradient (no-op when there is none)."""
        if self.cut_grad is not None:
            self._backward(self.cut_grad)

    def on_rejected(self, msg: Message) -> None:
        """The server dropped this step's batch (on_bad_message: skip): no update this step."""
        self._pending, self.grads, self.rejected, self.cut_grad = None, {}, True, None

    def _stash(self) -> None:
        # Gradients leave the shared Parameters when the state is deactivated: keep them here.
        for k, p in self.ctx.device_trainer.params.items():
            if p.grad is not None:
                # deactivation drops the Parameter's reference, so the tensor is ours: no copy
                self.grads[k] = self.grads[k] + p.grad if k in self.grads else p.grad

    def finish_step(self) -> float | None:
        """Apply this step's update (global clip factor from both sides' norms)."""
        if self.rejected or not self.grads:
            self.grads = {}
            return None
        cfg, trainer = self.ctx.exp.cfg.train, self.ctx.device_trainer
        own = sq_norm(list(self.grads.values()))
        total = own + self.server_sq if self.ctx.opts.clip == "global" else own
        coef = clip_coef(cfg.max_grad_norm, total)
        with trainer.activate(self.state):
            trainer.set_lr(self.state.step)
            for k, p in trainer.params.items():
                p.grad = self.grads.get(k)
            trainer.step(coef, clip=False)
            self.state.step += 1
        self.grads = {}
        return total**0.5

    def on_get_adapter(self, msg: Message) -> Message:
        tensors = {k: v.detach() for k, v in self.state.params.items()}
        return reply(msg, "adapter", tensors, examples=len(self.dataset))

    def on_set_adapter(self, msg: Message) -> None:
        with torch.no_grad():
            for k, v in msg.tensors.items():
                self.state.params[k].copy_(v)

    def restore(self, state: RoleState) -> None:
        self.state = state
        if state.sampler is not None:
            self.sampler.load_state_dict(state.sampler)


def batch_dims(t: torch.Tensor) -> tuple[int, int]:
    """``(batch, seq)`` of a ``[B, T, ...]`` tensor: lets the FLOP counter learn its exact law
    after a few counted shapes instead of recounting every new (dynamically padded) length."""
    return int(t.shape[0]), int(t.shape[1])


def owned_by_device(layout: Layout, path: str) -> bool:
    return layout.bottom.owns(path) or (layout.top is not None and layout.top.owns(path))


def weighted_mean(
    tensors: list[dict[str, torch.Tensor]], weights: list[float]
) -> dict[str, torch.Tensor]:
    total = sum(weights)
    return {k: sum((w / total) * t[k] for t, w in zip(tensors, weights)) for k in tensors[0]}
