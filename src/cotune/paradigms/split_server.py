"""The server of split learning (``SplitServer``), shared by ``splitfed`` and ``split``: it takes
each device's cut activations, runs its blocks (forward, loss, backward), sends the cut
gradient down and steps its side; ``shared`` serves devices one after another in arrival
order with one model and optimizer, ``per_device`` keeps a server copy per device, ``pooled``
runs one pass over every device's activations (``split_pooled.py``). U-shaped runs turn at the
server's top (the device's head and loss); gradient accumulation brings one micro-batch up per
round trip.
"""

from __future__ import annotations

from typing import Any

import torch

from cotune.errors import ProtocolError
from cotune.models import Activations, segment_loss
from cotune.models.packing import padding_free, token_dims
from cotune.paradigms.base import Experiment
from cotune.paradigms.split_cut import (
    Layout,
    StepLog,
    activation_dtype,
    admit_upload,
    check_cut,
    clip_coef,
    global_clip,
    make_layout,
    micro_meta,
    owned_by_device,
    side_reg,
    sq_norm,
)
from cotune.paradigms.split_pooled import PooledServing
from cotune.runtime import Message, Role
from cotune.runtime.ids import SERVER
from cotune.runtime.node import NodeContext
from cotune.runtime.validate import check_activation, meta_number
from cotune.train import RoleState, Trainer


class SplitServer(PooledServing, Role):
    """Serves the devices' activations in arrival order with the server-side adapter states.

    The server's own role, on the driver's node: the driver calls ``serve`` and
    ``finish_step``; devices reach it with messages.
    """

    def __init__(
        self, ctx: NodeContext, opts, layout: Layout, trainer: Trainer, states: dict[str, RoleState]
    ) -> None:
        super().__init__(ctx.node_id)
        self.ctx, self.opts, self.layout, self.trainer = ctx, opts, layout, trainer
        self.states = states  # device id → the server state serving it (shared or per device)
        self.codec = ctx.cfg.engine.activation_codec
        self.global_clip = global_clip(opts, ctx.cfg)
        self.queue: list[tuple[float, int, Message]] = []
        self.bad: list[tuple[str, str]] = []
        self.skipped: list[tuple[int, str, str]] = []  # (step, device, error), over the run
        self.reg = side_reg(ctx.model.adapters, lambda p: not owned_by_device(layout, p))
        self.dtype = activation_dtype(ctx.cfg)
        self.packed = ctx.cfg.train.padding_free  # the server's blocks on the real tokens only
        self.norms: dict[str, float] = {}  # device → squared grad norm (pooled + global clip)
        self.norm_arrival: dict[str, float] = {}
        self._pending_step: (
            tuple[RoleState, dict[str, torch.Tensor], float, dict[str, float]] | None
        ) = None

    def on_activations(self, msg: Message) -> None:
        admit_upload(msg, self._check, self.queue, self.bad, self.opts.on_bad_message)

    def on_norm(self, msg: Message) -> None:
        self.norms[msg.sender] = meta_number(msg, "device_sq", minimum=0.0)
        self.norm_arrival[msg.sender] = msg.arrival or 0.0

    def serve(self, step: int) -> list[StepLog]:
        """Reject bad batches, then train on the queued batches (in arrival order, or pooled)."""
        grid = self.ctx.grid
        assert grid is not None
        for dev, err in self.bad:
            self.skipped.append((step, dev, err))
            grid.send(Message("rejected", SERVER, dev, {}, {"step": step, "error": err}))
        self.bad = []
        queue, self.queue = sorted(self.queue), []
        with self.in_role():
            if getattr(self.opts, "server_batch", "sequential") == "pooled":
                return self._serve_pooled(queue, step) if queue else []
            served = [self._serve_one(arrival, msg, step) for arrival, _, msg in queue]
            return [s for s in served if s is not None]

    def _serve_one(self, arrival: float, msg: Message, step: int) -> StepLog | None:
        """One server update on a device's batch, or with ``train.grad_accum`` G on its G
        micro-batches: each gradient round trip brings the next micro-batch's activations
        back (the device frees each graph before the next forward), the server accumulates
        and steps after the last. None: a later micro-batch failed its checks (skip)."""
        meter, trainer, task, grid = self.ctx.meter, self.trainer, self.ctx.task, self.ctx.grid
        assert grid is not None
        dev, micros = msg.sender, self.ctx.cfg.train.grad_accum
        state, rnd = self.states[dev], int(msg.meta.get("round", 0))
        server = self.layout.server
        loss, examples = 0.0, 0
        with trainer.activate(state):
            lr = trainer.set_lr(state.step)
            for micro in range(micros):
                t = msg.tensors
                acts = Activations(t["hidden"].requires_grad_(True), t["attention_mask"])
                examples += int(acts.hidden.shape[0])
                if self.layout.top is None:

                    def fwd_bwd(a: Activations, labels: torch.Tensor) -> float:
                        out = segment_loss(server, a, None, labels, task)
                        reg = self.reg()
                        ((out + reg if reg is not None else out) / micros).backward()
                        return float(out.detach()) + (float(reg.detach()) if reg is not None else 0)

                    with padding_free(self.packed):
                        value, flops = meter.flops.run(
                            "split-server", fwd_bwd, acts, t["labels"],
                            dims=token_dims(acts.attention_mask, self.packed),
                        )  # fmt: skip
                    meter.compute(flops, round=rnd, after=arrival, label="server")
                else:
                    value = self._u_turn(acts, dev, step, rnd, arrival)
                loss += (value + meta_number(msg, "device_reg", 0.0)) / micros
                last = micro == micros - 1
                meta = {"step": step, "round": rnd, **micro_meta(micro)}
                if not last:  # the device's reply: its next micro-batch's activations
                    back = Message("gradients", SERVER, dev, {"grad": acts.hidden.grad}, meta)
                    msg = grid.request(back, codec=self.codec)
                    try:
                        self._check(msg)
                    except ProtocolError as err:  # (on_bad_message: skip) the whole step
                        self._skip_step(step, dev, str(err))
                        return None
                    arrival = msg.arrival or arrival
                    continue
                grads = [p.grad for p in trainer.params.values() if p.grad is not None]
                server_sq = sq_norm(grads)
                want = self.global_clip
                meta.update(server_sq=server_sq, want_norm=want)
                back = Message("gradients", SERVER, dev, {"grad": acts.hidden.grad}, meta)
                if want:
                    rep = grid.request(back, codec=self.codec)
                    total = server_sq + meta_number(rep, "device_sq", minimum=0.0)
                    meter.compute(0.0, after=rep.arrival, label="wait")
                else:
                    grid.send(back, codec=self.codec)
                    total = server_sq
            trainer.step(clip_coef(self.ctx.cfg.train.max_grad_norm, total), clip=False, loss=loss)
            state.step += 1
        return StepLog(dev, loss, lr, examples)

    def _check(self, msg: Message) -> None:
        check_cut(msg, hidden_size=self.ctx.model.loaded.anatomy.hidden_size, dtype=self.dtype,
                  task=self.ctx.task, labels=not self.opts.u_shaped)  # fmt: skip

    def _skip_step(self, step: int, dev: str, err: str, keep_server: bool = False) -> None:
        """A device's later micro-batch failed its checks: with ``on_bad_message: skip`` its
        whole step is dropped on its side, and on the server's unless ``keep_server`` (a pooled
        pass already mixed its earlier micro-batches with the other devices')."""
        if self.opts.on_bad_message == "stop":
            raise ProtocolError(err)
        if not keep_server:
            for p in self.trainer.params.values():
                p.grad = None
        self.skipped.append((step, dev, err))
        assert self.ctx.grid is not None
        self.ctx.grid.send(Message("rejected", SERVER, dev, {}, {"step": step, "error": err}))

    def _u_turn(self, acts: Activations, dev: str, step: int, rnd: int, arrival: float) -> float:
        """U-shape: forward the middle, let the device finish (loss stays there), backward."""
        grid = self.ctx.grid
        assert grid is not None
        out, dims = self._middle(acts, rnd, arrival)
        tensors = {"hidden": out.hidden.detach(), "attention_mask": out.attention_mask}
        msg = Message("activations", SERVER, dev, tensors, {"step": step, "round": rnd})
        rep = grid.request(msg, codec=self.codec)
        grad, loss = self._turned(rep, dev, list(out.hidden.shape), out.hidden.dtype)
        server_reg = self._middle_backward(out, grad, dims, rnd, rep.arrival)
        return loss + server_reg  # the loss as central logs it

    def _middle(self, acts: Activations, rnd: int, arrival: float) -> tuple[Activations, Any]:
        """U-shape: the server's middle blocks on ``acts`` (metered); their output and the
        step's FLOP dims."""
        meter = self.ctx.meter
        dims = token_dims(acts.attention_mask, self.packed)
        with padding_free(self.packed):
            out, flops = meter.flops.run("split-server-fwd", self.layout.server, acts, dims=dims)
        meter.compute(flops, round=rnd, after=arrival, label="server-fwd")
        return out, dims

    @staticmethod
    def _turned(
        rep: Message, dev: str, shape: list[int], dtype: torch.dtype
    ) -> tuple[torch.Tensor, float]:
        """A device's answer to a U-turn: the gradient at the middle's output (of its top's
        loss / grad_accum), checked, and that loss."""
        grad = check_activation(f"message 'gradients' from {dev!r}: tensor 'grad'",
                                rep.tensors.get("grad"), shape=shape, dtype=dtype)  # fmt: skip
        return grad, meta_number(rep, "loss")

    def _middle_backward(
        self, out: Activations, grad: torch.Tensor, dims: Any, rnd: int, after: float | None
    ) -> float:
        """Backward through the middle from ``grad`` (a micro-batch's share already) and the
        server's regularizer share (1 / grad_accum), metered; returns the regularizer."""

        def backward(g: torch.Tensor) -> float:
            reg = self.reg()
            outs, grads = [out.hidden], [g]
            if reg is not None:
                outs.append(reg)
                grads.append(torch.full_like(reg, 1.0 / self.ctx.cfg.train.grad_accum))
            torch.autograd.backward(outs, grads)
            return float(reg.detach()) if reg is not None else 0.0

        meter = self.ctx.meter
        with padding_free(self.packed):  # a checkpointed block recomputes its forward here
            server_reg, flops = meter.flops.run("split-server-bwd", backward, grad, dims=dims)
        meter.compute(flops, round=rnd, after=after, label="server-bwd")
        return server_reg


def server_side(exp: Experiment, opts, server_steps: int) -> tuple[NodeContext, Layout, Trainer]:
    """The server node's context, the layout on its model, and its trainer."""
    cfg = exp.cfg
    ctx = exp.grid.context(SERVER)
    layout = make_layout(ctx.model, cfg, opts)
    params = ctx.model.trainer.params
    trainer = Trainer({k: params[k] for k in layout.server_names}, cfg.train, server_steps)
    return ctx, layout, trainer
