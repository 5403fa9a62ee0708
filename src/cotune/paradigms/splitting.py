"""The split device role (``SplitDevice``) shared by ``split`` and ``splitfed``; the cut's layout,
the server's checks of what crosses it and global clipping are in ``split_cut`` (which
``splitfrozen`` reuses too).

One training step of one device, as messages on the grid::

    device (local event "step"): forward to the cut ──activations (hidden, mask[, labels])──▶ server
    server: forward (+ loss, backward) of its blocks
       U-shaped only: ──activations──▶ device (top + loss + backward) ──gradients──▶ server backward
    server ──gradients (cut gradient, server's squared grad norm)──▶ device backward
    device ──norm (device's squared grad norm)──▶ server        (global clipping only)
    device (local event "finish"): a held-back backward, then its optimizer step

Both sides clip with the same global norm, so one device with aggregation every step equals
central training. Device and server each own a ``Trainer`` on their own node.

Autograd keeps a version counter per ``Parameter``: an optimizer step of *any* role between a
device's forward and its backward invalidates the graph (colocated roles share the Parameters).
So within a step every device first runs its forward, the server then serves the queue in
arrival order (simulated time) and every device backward runs; device optimizer steps come
last. The math equals serving devices one by one in arrival order; the clock sees devices in
parallel and a FIFO server.
"""

from __future__ import annotations

from typing import Any

import torch

from cotune.data import Batch, BatchSampler
from cotune.models import Activations, segment_loss
from cotune.models.packing import padding_free, token_dims
from cotune.paradigms.base import reply
from cotune.paradigms.split_cut import (
    clip_coef,
    cut_options,
    device_memory,
    global_clip,
    make_layout,
    owned_by_device,
    side_reg,
    sq_norm,
)
from cotune.runtime import Message, Role
from cotune.runtime.ids import SERVER
from cotune.runtime.node import NodeContext
from cotune.runtime.validate import check_activation
from cotune.train import RoleState, Trainer
from cotune.train.joint import step_roles


class SplitDevice(Role):
    """A device holding the bottom (and, U-shaped, the top) of the model with its adapters.

    Its step is driven by local events (its own loop): ``step`` (finish the last step if it is
    not finished, then the next batch, forward, upload) and ``finish`` (the backward of a cut
    gradient it was told to hold back, then its optimizer step; ``update`` is the step alone,
    for ``split``'s one device at a time).
    """

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx.node_id)
        assert ctx.data is not None
        self.ctx, self.dataset = ctx, ctx.data
        cfg = ctx.cfg
        self.opts = cut_options(cfg)
        # A device runs only its bottom (U-shaped: also the top, so it holds the whole model).
        model = (
            ctx.model
            if self.opts.u_shaped
            else ctx.segment_model(0, self.opts.cut, embed=True, head=False)
        )
        self.layout = make_layout(model, cfg, self.opts)
        self.trainer = Trainer(
            {k: model.trainer.params[k] for k in self.layout.device_names},
            cfg.train,
            cfg.train.steps,
        )
        self.codec = cfg.engine.activation_codec
        self.micros = cfg.train.grad_accum  # micro-batches a step (the server asks for each)
        self.global_clip = global_clip(self.opts, cfg)
        self.packed = cfg.train.padding_free  # this side's blocks on the real tokens only
        self.state = self.trainer.new_state(ctx.seed, model.initial_params())
        self.sampler = BatchSampler(len(self.dataset), cfg.train.batch_size, ctx.seed)
        layout = self.layout
        self.reg = side_reg(model.adapters, lambda p: owned_by_device(layout, p))
        self._pending: tuple[Activations, torch.Tensor | None, torch.Tensor] | None = None
        self.grads: dict[str, torch.Tensor] = {}
        self.server_sq = 0.0
        self.rejected = False
        self.round = 0
        # Backward waits for the "finish" event (a cohort, or the pooled server's protocol).
        self.defer_backward = False
        self.cut_grad: torch.Tensor | None = None
        self._norm_step: int | None = None  # send a "norm" message after this step's backward
        self.cohort: Any = None  # the cohort run this device's forward belongs to (colocated)
        self._cohort: Any = None  # the cohort this device leads (built on its first step)
        ctx.meter.memory("split-device", lambda: device_memory(model.loaded, cfg, layout))

    # --- local events ---------------------------------------------------------------------
    def tick_step(self, meta: dict[str, Any]) -> float | None:
        """This step: the end of the last one (when the driver did not ask for it apart: the
        same event saves a control round trip per step), then a batch, the forward to the cut,
        the upload. Returns the last step's gradient norm (None: nothing was left to finish)."""
        last = self.tick_finish(meta)
        self.defer_backward = bool(meta.get("defer", False))
        self.send_activations(int(meta["step"]), int(meta["round"]))
        return last

    def tick_finish(self, meta: dict[str, Any]) -> float | None:
        """The end of this step: the backward of a held-back cut gradient, then the update.
        One event, not two: the update needs nothing from the server that the cut gradient
        did not bring (its squared norm), so a deployed device saves a control round trip."""
        self.run_deferred_backward()
        return self.finish_step()

    def tick_update(self, meta: dict[str, Any]) -> float | None:
        return self.finish_step()

    @classmethod
    def batch_step(cls, roles: list[SplitDevice], meta: dict[str, Any]) -> list[float | None]:
        """Colocated devices: the end of the last step (``batch_finish``), then the step's
        forwards as one batch when a cohort can run them."""
        from cotune.paradigms.split_cohort import DeviceCohort

        last = cls.batch_finish(roles, meta)
        cohort = DeviceCohort.for_roles(roles)
        together = cohort is not None and cohort.ready(roles)
        pooled = bool(meta.get("defer", False))
        for r in roles:
            r.defer_backward = together or pooled
        step, rnd = int(meta["step"]), int(meta["round"])
        if together and cohort is not None:
            # One forward of the devices whose FLOPs are known; the others one by one.
            for r in cohort.forward(roles, step, rnd):
                r.cohort = cohort
        else:
            for r in roles:
                r.send_activations(step, rnd)
        return last

    @classmethod
    def batch_finish(cls, roles: list[SplitDevice], meta: dict[str, Any]) -> list[float | None]:
        """Colocated devices: every backward (a cohort's as one), then the updates as one
        optimizer call. Backwards first: a role's graph must not outlive another's update."""
        cls._backward_all(roles)
        return cls.batch_update(roles, meta)

    @staticmethod
    def _backward_all(roles: list[SplitDevice]) -> None:
        cohorts = {id(r.cohort): r.cohort for r in roles if r.cohort is not None}
        done: dict[int, int] = {}  # a cohort member's backward FLOPs
        for cohort in cohorts.values():
            done.update(cohort.backward())
        for r in roles:  # in device order, whether a device ran in the cohort or alone
            r.cohort = None
            if id(r) in done:
                r.backward_done(done[id(r)])
            else:
                r.run_deferred_backward()

    # --- the step -------------------------------------------------------------------------
    def outgoing(self, acts: Activations, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors of the ``activations`` message (a test may corrupt them here)."""
        out = {"hidden": acts.hidden.detach(), "attention_mask": acts.attention_mask}
        if not self.opts.u_shaped:
            out["labels"] = labels  # label-sharing split learning, as SplitLoRA does
        return out

    def next_batch(self, rnd: int) -> Batch:
        """This step's batch (the sampler moves on; the step's flags reset)."""
        self.rejected, self.round = False, rnd
        return self._draw()

    def _draw(self) -> Batch:
        """The sampler's next batch (its position kept in the state, for checkpoints)."""
        batch = self.dataset.batch(self.sampler.next_indices())
        self.state.sampler = self.sampler.state_dict()
        return batch

    def send_activations(self, step: int, rnd: int, batch: Batch | None = None) -> None:
        batch = self.next_batch(rnd) if batch is None else batch
        self.emit(*self.upload(step, rnd, batch, *self._forward(batch)))

    def _forward(self, batch: Batch) -> tuple[Activations, torch.Tensor | None, int]:
        """The bottom segment on ``batch`` (and the method's regularizer), with its FLOPs."""
        bottom = self.layout.bottom

        def forward(b):
            return bottom(b.input_ids, b.attention_mask), self.reg()

        with self.trainer.activate(self.state), padding_free(self.packed):
            (acts, reg), flops = self.ctx.meter.flops.run(
                "split-device-fwd",
                forward,
                batch,
                dims=token_dims(batch.attention_mask, self.packed),
            )
        return acts, reg, flops

    def _next_micro(self, msg: Message, micro: int) -> Message:
        """Gradient accumulation: after micro-batch ``micro - 1``'s backward (its graph freed),
        the next micro-batch's forward; its activations go back as the gradient's reply."""
        batch = self._draw()
        tensors, meta = self.upload(int(msg.meta["step"]), self.round, batch, *self._forward(batch))
        return reply(msg, "activations", tensors, **meta, micro=micro)

    def emit(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Send an ``upload``'s cut activations to the server (also used by a device cohort)."""
        msg = Message("activations", self.role_id, SERVER, tensors, meta)
        assert self.ctx.grid is not None
        self.ctx.grid.send(msg, codec=self.codec)

    def upload(
        self,
        step: int,
        rnd: int,
        batch: Batch,
        acts: Activations,
        reg: torch.Tensor | None,
        flops: int,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """A forward done: charge it, keep its graph for the backward, and the tensors and
        meta of its ``activations`` message."""
        self.ctx.meter.compute(flops, round=rnd, label="forward")
        self._pending = (acts, reg, batch.labels)
        meta = {"step": step, "round": rnd, "examples": int(batch.input_ids.shape[0])}
        meta["device_reg"] = float(reg.detach()) if reg is not None else 0.0
        return self.outgoing(acts, batch.labels), meta

    def on_activations(self, msg: Message) -> Message:
        """U-shaped: the server's output comes back; run the top, the loss and its backward."""
        top = self.layout.top
        assert self._pending is not None and top is not None
        mine = self._pending[0]
        hidden = check_activation(
            f"message 'activations' from {msg.sender!r}: tensor 'hidden'",
            msg.tensors["hidden"],
            shape=list(mine.hidden.shape),
            dtype=mine.hidden.dtype,
        )
        acts = Activations(hidden.requires_grad_(True), mine.attention_mask)
        task = self.ctx.task

        def fwd_bwd(a: Activations, labels: torch.Tensor) -> float:
            loss = segment_loss(top, a, None, labels, task)
            (loss / self.micros).backward()  # a micro-batch's share (train.grad_accum)
            return float(loss.detach())

        with self.trainer.activate(self.state), padding_free(self.packed):
            loss, flops = self.ctx.meter.flops.run(
                "split-device-top", fwd_bwd, acts, self._pending[2],
                dims=token_dims(acts.attention_mask, self.packed),
            )  # fmt: skip
            self._stash()
        self.ctx.meter.compute(flops, round=self.round, label="top")
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
        micro = int(msg.meta.get("micro", 0))
        if self.defer_backward and micro == self.micros - 1:
            self.cut_grad = grad  # a cohort (or the pooled server's protocol) runs it later
            return None
        self._backward(grad)
        if micro < self.micros - 1:  # accumulating: the next micro-batch goes up
            return self._next_micro(msg, micro + 1)
        if msg.meta.get("want_norm"):
            return reply(msg, "norm", device_sq=sq_norm(list(self.grads.values())))
        return None

    def _backward(self, grad: torch.Tensor) -> None:
        assert self._pending is not None
        acts, reg, _ = self._pending

        def backward(g: torch.Tensor) -> None:
            outs, grads = [acts.hidden], [g]
            if reg is not None:  # once per step: a share per micro-batch
                outs.append(reg)
                grads.append(torch.full_like(reg, 1.0 / self.micros))
            torch.autograd.backward(outs, grads)

        # Under padding_free too: a checkpointed block recomputes its forward in backward.
        with self.trainer.activate(self.state), padding_free(self.packed):
            _, flops = self.ctx.meter.flops.run(
                "split-device-bwd",
                backward,
                grad,
                dims=token_dims(acts.attention_mask, self.packed),
            )
            self._stash()
        self.backward_done(flops)

    def backward_done(self, flops: int) -> None:
        """Charge the backward; send the norm message when the server asked for one."""
        self.ctx.meter.compute(flops, round=self.round, label="backward")
        self._pending, self.cut_grad = None, None
        if self._norm_step is not None:
            meta = {"step": self._norm_step, "round": self.round}
            meta["device_sq"] = sq_norm(list(self.grads.values()))
            assert self.ctx.grid is not None
            self.ctx.grid.send(Message("norm", self.role_id, SERVER, {}, meta))
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
        for k, p in self.trainer.params.items():
            if p.grad is not None:
                # deactivation drops the Parameter's reference, so the tensor is ours: no copy
                self.grads[k] = self.grads[k] + p.grad if k in self.grads else p.grad

    def finish_step(self) -> float | None:
        """Apply this step's update (global clip factor from both sides' norms)."""
        update = self._update()
        if update is not None:
            step_roles([(self.trainer, *update[0])], roles=[self.role_id])
        return None if update is None else update[1]

    def _update(
        self,
    ) -> tuple[tuple[RoleState, dict[str, torch.Tensor], float | None], float] | None:
        """This step's ``(state, grads, clip factor)`` and gradient norm (None: no update);
        the gradients are handed over."""
        grads, self.grads = self.grads, {}
        if self.rejected or not grads:
            return None
        own = sq_norm(list(grads.values()))
        total = own + self.server_sq if self.opts.clip == "global" else own
        coef = clip_coef(self.ctx.cfg.train.max_grad_norm, total)
        return (self.state, grads, coef), total**0.5

    @classmethod
    def batch_update(cls, roles: list[SplitDevice], meta: dict[str, Any]) -> list[float | None]:
        """Colocated devices' updates as one optimizer call (``cotune.train.joint``)."""
        updates = [r._update() for r in roles]
        stepping = [(r, u) for r, u in zip(roles, updates) if u is not None]
        step_roles(
            [(r.trainer, *u[0]) for r, u in stepping], roles=[r.role_id for r, _ in stepping]
        )
        return [None if u is None else u[1] for u in updates]

    def on_get_adapter(self, msg: Message) -> Message:
        tensors = {k: v.detach() for k, v in self.state.params.items()}
        return reply(msg, "adapter", tensors, examples=len(self.dataset))

    def on_set_adapter(self, msg: Message) -> None:
        with torch.no_grad():
            for k, v in msg.tensors.items():
                self.state.params[k].copy_(v)

    def snapshot(self) -> RoleState:
        return self.state

    def restore(self, state: RoleState) -> None:
        self.state = state
        if state.sampler is not None:
            self.sampler.load_state_dict(state.sampler)
