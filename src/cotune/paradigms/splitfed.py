"""SplitLoRA: split-federated LoRA (SFL). Devices hold the embeddings and the first ``cut`` blocks
with their adapters, the server holds the rest; every step all devices train in parallel through
the cut (activations up, cut gradients down), and the device-side adapters are FedAvg'ed every
``aggregate_every`` steps.

Server side (``server_side``): ``shared`` is SplitLoRA's reference code (one server model and one
optimizer, updated once per device batch, devices served one after another, here in arrival
order); ``per_device`` is SplitFed-V1 (one server copy per device, averaged with the device
adapters every ``aggregate_every`` steps). See docs/methods.md (SplitLoRA) for what follows the
paper and what is reconstructed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cotune.errors import ProtocolError
from cotune.models import Activations, task_loss
from cotune.paradigms.base import Experiment, ParadigmResult, mean, parse_options, screen_updates
from cotune.paradigms.options import SplitFedOptions
from cotune.paradigms.split_cohort import DeviceCohort
from cotune.paradigms.splitting import (
    SplitContext,
    SplitDevice,
    batch_dims,
    clip_coef,
    device_memory,
    make_layout,
    owned_by_device,
    segment_memory,
    side_reg,
    sq_norm,
    weighted_mean,
)
from cotune.runtime import Message, Role
from cotune.runtime.validate import check_activation
from cotune.sim.simulation import SERVER, device_id
from cotune.train import RoleState


@dataclass
class StepLog:
    device: str
    loss: float
    lr: float
    examples: int


class SplitServer(Role):
    """Serves the devices' activations in arrival order with the server-side adapter states."""

    def __init__(self, ctx: SplitContext, states: dict[str, RoleState]):
        super().__init__(SERVER)
        self.ctx = ctx
        self.states = states  # device id → the server state serving it (shared or per device)
        self.queue: list[tuple[float, int, Message]] = []
        self.bad: list[tuple[str, str]] = []
        self.reg = side_reg(ctx.exp, lambda p: not owned_by_device(ctx.layout, p))
        self.norms: dict[str, float] = {}  # device → squared grad norm (pooled + global clip)
        self._pending_step: (
            tuple[RoleState, dict[str, torch.Tensor], float, dict[str, float]] | None
        ) = None

    def on_activations(self, msg: Message) -> None:
        arrival = self.ctx.exp.sim.clock.last_arrival(SERVER, msg.sender)
        try:
            self.ctx.check_incoming(msg, labels=not self.ctx.opts.u_shaped)
        except ProtocolError as err:
            if self.ctx.opts.on_bad_message == "stop":
                raise
            self.bad.append((msg.sender, str(err)))
            return None
        self.queue.append((arrival, len(self.queue), msg))
        return None

    def on_norm(self, msg: Message) -> None:
        self.norms[msg.sender] = float(msg.meta["device_sq"])

    def serve(self, step: int) -> list[StepLog]:
        """Reject bad batches, then train on the queued batches (in arrival order, or pooled)."""
        exp = self.ctx.exp
        for dev, err in self.bad:
            self.ctx.skipped.append((step, dev, err))
            exp.engine.send(Message("rejected", SERVER, dev, {}, {"step": step, "error": err}))
        self.bad = []
        queue, self.queue = sorted(self.queue), []
        if getattr(self.ctx.opts, "server_batch", "sequential") == "pooled":
            return self._serve_pooled(queue, step) if queue else []
        return [self._serve_one(arrival, msg, step) for arrival, _, msg in queue]

    def _serve_pooled(self, queue: list[tuple[float, int, Message]], step: int) -> list[StepLog]:
        """One forward/backward on all activations of the step (padded to the longest); each
        device gets the gradient of its *own* mean loss, the server steps on the example-weighted
        mean of the devices' losses (its gradient is the pooled batch's)."""
        ctx, exp = self.ctx, self.ctx.exp
        sim, trainer = exp.sim, ctx.server_trainer
        msgs = [m for _, _, m in queue]
        rows = [int(m.tensors["hidden"].shape[0]) for m in msgs]
        lengths = [int(m.tensors["hidden"].shape[1]) for m in msgs]
        width, total_rows = max(lengths), sum(rows)
        weights = [n / total_rows for n in rows]
        pad = [width - t for t in lengths]
        hidden = torch.cat([F.pad(m.tensors["hidden"], (0, 0, 0, p)) for m, p in zip(msgs, pad)])
        mask = torch.cat([F.pad(m.tensors["attention_mask"], (0, p)) for m, p in zip(msgs, pad)])
        labels = [m.tensors["labels"] for m in msgs]
        acts = Activations(hidden.requires_grad_(True), mask)
        rnd = int(msgs[0].meta.get("round", 0))
        state = self.states[msgs[0].sender]  # shared server side: one state for every device

        def fwd_bwd(a: Activations, labels: list[torch.Tensor]) -> list[float]:
            out = ctx.layout.server(a)
            losses, start = [], 0
            for n, t, y in zip(rows, lengths, labels):
                part = (
                    out[start : start + n]
                    if exp.task == "classification"
                    else out[start : start + n, :t]
                )
                losses.append(task_loss(part, y, exp.task))
                start += n
            objective = sum(w * loss for w, loss in zip(weights, losses))
            reg = self.reg()
            (objective + reg if reg is not None else objective).backward()
            extra = float(reg.detach()) if reg is not None else 0.0
            return [float(loss.detach()) + extra for loss in losses]

        with trainer.activate(state):
            lr = trainer.set_lr(state.step)
            losses, flops = sim.flops.run(
                "split-server-pooled", fwd_bwd, acts, labels, dims=batch_dims(hidden)
            )
            grads = {k: p.grad for k, p in trainer.params.items() if p.grad is not None}
        # The server waits for the last device of the step before it can pool.
        sim.charge(SERVER, flops, round=rnd, after=max(a for a, _, _ in queue), label="server")
        server_sq = sq_norm(list(grads.values()))
        want = ctx.global_clip
        start = 0
        for m, n, t, w in zip(msgs, rows, lengths, weights):
            cut = acts.hidden.grad[start : start + n, :t] / w
            meta = {"step": step, "round": rnd, "server_sq": server_sq, "send_norm": want}
            exp.engine.send(
                Message("gradients", SERVER, m.sender, {"grad": cut}, meta), codec=ctx.codec
            )
            start += n
        self.norms = {}
        self._pending_step = (state, grads, server_sq, {m.sender: w for m, w in zip(msgs, weights)})
        if not want:
            self.finish_step()
        return [
            StepLog(m.sender, loss + float(m.meta.get("device_reg", 0.0)), lr, n)
            for m, loss, n in zip(msgs, losses, rows)
        ]

    def finish_step(self) -> None:
        """Pooled server: apply the step's update once the devices' norms are in (global clip:
        the server's norm plus each device's, weighted as in the pooled objective)."""
        if self._pending_step is None:
            return
        ctx, exp = self.ctx, self.ctx.exp
        state, grads, total, weights = self._pending_step
        self._pending_step = None
        if ctx.global_clip:
            missing = sorted(set(weights) - set(self.norms))
            if missing:
                raise ProtocolError(f"server: no 'norm' message from {missing} this step")
            total += sum(weights[d] ** 2 * self.norms[d] for d in weights)
            after = max(exp.sim.clock.last_arrival(SERVER, d) for d in weights)
            exp.sim.charge(SERVER, 0.0, after=after, label="wait")
        coef = clip_coef(exp.cfg.train.max_grad_norm, total)
        trainer = ctx.server_trainer
        with trainer.activate(state):
            trainer.set_lr(state.step)
            for k, p in trainer.params.items():
                p.grad = grads.get(k)
            trainer.step(coef, clip=False)
            state.step += 1

    def _serve_one(self, arrival: float, msg: Message, step: int) -> StepLog:
        ctx, exp = self.ctx, self.ctx.exp
        sim, trainer, dev = exp.sim, ctx.server_trainer, msg.sender
        state, rnd = self.states[dev], int(msg.meta.get("round", 0))
        t = msg.tensors
        acts = Activations(t["hidden"].requires_grad_(True), t["attention_mask"])
        with trainer.activate(state):
            lr = trainer.set_lr(state.step)
            if ctx.layout.top is None:

                def fwd_bwd(a: Activations, labels: torch.Tensor) -> float:
                    loss = task_loss(ctx.layout.server(a), labels, exp.task)
                    reg = self.reg()
                    (loss + reg if reg is not None else loss).backward()
                    return float(loss.detach()) + (float(reg.detach()) if reg is not None else 0)

                loss, flops = sim.flops.run(
                    "split-server", fwd_bwd, acts, t["labels"], dims=batch_dims(acts.hidden)
                )
                sim.charge(SERVER, flops, round=rnd, after=arrival, label="server")
            else:
                loss = self._u_turn(acts, dev, step, rnd, arrival)
            loss += float(msg.meta.get("device_reg", 0.0))
            grads = [p.grad for p in trainer.params.values() if p.grad is not None]
            server_sq = sq_norm(grads)
            want = ctx.global_clip
            meta = {"step": step, "round": rnd, "server_sq": server_sq, "want_norm": want}
            back = Message("gradients", SERVER, dev, {"grad": acts.hidden.grad}, meta)
            if want:
                rep = exp.engine.request(back, codec=ctx.codec)
                total = server_sq + float(rep.meta["device_sq"])
                sim.charge(SERVER, 0.0, after=sim.clock.last_arrival(SERVER, dev), label="wait")
            else:
                exp.engine.send(back, codec=ctx.codec)
                total = server_sq
            trainer.step(clip_coef(exp.cfg.train.max_grad_norm, total), clip=False, loss=loss)
            state.step += 1
        return StepLog(dev, loss, lr, int(acts.hidden.shape[0]))

    def _u_turn(self, acts: Activations, dev: str, step: int, rnd: int, arrival: float) -> float:
        """U-shape: forward the middle, let the device finish (loss stays there), backward."""
        exp, sim, codec = self.ctx.exp, self.ctx.exp.sim, self.ctx.codec
        out, flops = sim.flops.run(
            "split-server-fwd", self.ctx.layout.server, acts, dims=batch_dims(acts.hidden)
        )
        sim.charge(SERVER, flops, round=rnd, after=arrival, label="server-fwd")
        tensors = {"hidden": out.hidden.detach(), "attention_mask": out.attention_mask}
        msg = Message("activations", SERVER, dev, tensors, {"step": step, "round": rnd})
        rep = exp.engine.request(msg, codec=codec)
        grad = check_activation(
            f"message 'gradients' from {dev!r}: tensor 'grad'",
            rep.tensors.get("grad"),
            shape=list(out.hidden.shape),
            dtype=out.hidden.dtype,
        )

        def backward(g: torch.Tensor) -> None:
            reg = self.reg()
            outs, grads = [out.hidden], [g]
            if reg is not None:
                outs.append(reg)
                grads.append(torch.ones_like(reg))
            torch.autograd.backward(outs, grads)

        _, flops = sim.flops.run("split-server-bwd", backward, grad, dims=batch_dims(grad))
        after = sim.clock.last_arrival(SERVER, dev)
        sim.charge(SERVER, flops, round=rnd, after=after, label="server-bwd")
        return float(rep.meta["loss"])


def preflight(exp: Experiment) -> None:
    """The cut must fit the model, with adapters on both sides (before any file is written)."""
    make_layout(exp, parse_options(SplitFedOptions, exp.cfg.paradigm.options))


def run(exp: Experiment) -> ParadigmResult:
    cfg = exp.cfg
    opts = parse_options(SplitFedOptions, cfg.paradigm.options)
    n_dev = len(exp.parts)
    shared = opts.server_side == "shared"
    pooled = opts.server_batch == "pooled"
    # A sequential shared server steps once per device batch, so its LR schedule spans K x steps.
    server_steps = cfg.train.steps * (n_dev if shared and not pooled else 1)
    ctx = SplitContext.build(exp, opts, server_steps)
    devices = []
    for i, idx in enumerate(exp.parts):
        dev = SplitDevice(device_id(i), ctx, exp.train_set.subset(idx), seed=cfg.seed + i)
        exp.engine.register(dev)
        devices.append(dev)
    init = exp.initial_params()
    srv_glob = ctx.server_trainer.new_state(cfg.seed, init)
    copies = {d.role_id: srv_glob for d in devices}
    if not shared:
        copies = {
            d.role_id: ctx.server_trainer.new_state(cfg.seed + i, init)
            for i, d in enumerate(devices)
        }
    dev_glob = ctx.device_trainer.new_state(cfg.seed, init)
    cohort = DeviceCohort(ctx)
    # A cohort defers every device backward to after the server; the sequential server's global
    # clipping needs each device's norm before it serves the next device, so it runs one by one.
    needs_norm_reply = not pooled and ctx.global_clip
    server = SplitServer(ctx, copies)
    exp.engine.register(server)
    mem = device_memory(exp, ctx)
    for d in devices:
        exp.sim.memory[d.role_id] = mem
    exp.sim.memory[SERVER] = segment_memory(exp, ctx.layout.server, train=True)
    weights = [float(len(d.dataset)) if opts.weighting == "examples" else 1.0 for d in devices]

    start = 0
    if exp.resume is not None:
        st = exp.resume["states"]
        for d in devices:
            d.restore(st[d.role_id])
        dev_glob = st["device-global"]
        srv_glob = st["server-side"]
        copies = {d.role_id: srv_glob for d in devices}
        if not shared:
            copies = {d.role_id: st[f"server-side-{d.role_id}"] for d in devices}
        server.states = copies
        start = int(exp.resume["step"])

    def aggregate(rnd: int) -> None:
        reps = exp.engine.request_many(
            [Message("get_adapter", SERVER, d.role_id, {}, {"round": rnd}) for d in devices]
        )
        ref = {k: dev_glob.params[k] for k in ctx.layout.device_names}
        good, rejected = screen_updates(reps, lambda _: ref)
        ctx.rejected_updates += len(rejected)
        w = [wt for r, wt in zip(reps, weights) if r.sender not in rejected]
        if not good:
            return
        avg = weighted_mean([r.tensors for r in good], w)
        n = sum(v.numel() for v in avg.values()) * len(reps)
        after = max(exp.sim.clock.last_arrival(SERVER, d.role_id) for d in devices)
        exp.sim.charge(SERVER, 3.0 * n, round=rnd, after=after, label="aggregate")
        for d in devices:
            exp.engine.send(Message("set_adapter", SERVER, d.role_id, avg, {"round": rnd}))
        srv_avg = None
        if not shared:  # SplitFed-V1: the server copies are averaged too (server-internal)
            srv_avg = weighted_mean([copies[d.role_id].params for d in devices], weights)
        with torch.no_grad():
            for k, v in avg.items():
                dev_glob.params[k].copy_(v)
            for state in [srv_glob, *copies.values()] if srv_avg is not None else []:
                for k, v in srv_avg.items():
                    state.params[k].copy_(v)

    every, last_eval = opts.aggregate_every, {}
    points = set(exp.eval_points())
    with exp.progress(cfg.train.steps - start, f"splitfed {cfg.name}") as bar:
        for step in range(start + 1, cfg.train.steps + 1):
            rnd = (step - 1) // every + 1
            together = opts.cohort and not needs_norm_reply and cohort.ready(devices)
            for d in devices:
                d.defer_backward = together or pooled
            if together:
                together = cohort.forward(devices, step, rnd)
            else:
                for d in devices:
                    d.send_activations(step, rnd)
            logs = server.serve(step)
            if together:
                cohort.backward()
            for d in devices:
                d.run_deferred_backward()
            server.finish_step()
            norms = [n for d in devices if (n := d.finish_step()) is not None]
            for s, dev, err in [x for x in ctx.skipped if x[0] == step]:
                exp.log_record("skip", s, dev, round=rnd, error=err)
            loss = mean([g.loss for g in logs])
            lr = logs[0].lr if logs else None
            exp.log_record("train", step, "mean", round=rnd, loss=loss, lr=lr,
                           grad_norm=mean(norms) if norms else None)  # fmt: skip
            if step % every == 0 or step == cfg.train.steps:
                aggregate(rnd)
            bar.update(1, loss=loss)
            if step in points:
                last_eval = exp.evaluate_state(ctx.combined(dev_glob, srv_glob))
                exp.log_record("eval", step, SERVER, round=rnd, **last_eval)
            states: dict[str, RoleState] = {"device-global": dev_glob, "server-side": srv_glob}
            states.update({d.role_id: d.state for d in devices})
            if not shared:
                states.update({f"server-side-{k}": v for k, v in copies.items()})
            exp.maybe_checkpoint(step, states, {})
    if not last_eval:
        last_eval = exp.evaluate_state(ctx.combined(dev_glob, srv_glob))
    return ParadigmResult(
        states={SERVER: ctx.combined(dev_glob, srv_glob)},
        final_eval=last_eval,
        extra=ctx.extra(),
    )
