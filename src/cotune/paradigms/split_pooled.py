"""The pooled split server (``server_batch: pooled``, a part of ``SplitServer``): one server
pass on every device's activations of a step, padded to the widest, each device's cut
gradient that of its *own* mean loss, one server update on the example-weighted objective (with
``train.grad_accum`` G: G pooled passes, one update); U-shaped, one middle pass and every
device's top turned at once. Global clipping waits for the devices' norms (``finish_step``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cotune.errors import ProtocolError
from cotune.models import Activations, task_loss
from cotune.models.packing import Packing, padding_free, token_dims
from cotune.models.segment import packed_task_loss
from cotune.paradigms.split_cut import (
    StepLog,
    clip_coef,
    micro_meta,
    sq_norm,
)
from cotune.runtime import Message
from cotune.runtime.ids import SERVER
from cotune.runtime.validate import meta_number


class PooledServing:
    """The pooled server's steps; mixed into ``SplitServer``, whose state (``ctx``, ``trainer``,
    ``layout``, ``states``, ``norms``, ...) and helpers (``_check``, ``_skip_step``) it uses."""

    def _serve_pooled(self, queue: list[tuple[float, int, Message]], step: int) -> list[StepLog]:
        """One forward/backward on all activations of the step (padded to the longest); each
        device gets the gradient of its *own* mean loss, the server steps on the example-weighted
        mean of the devices' losses (its gradient is the pooled batch's). With
        ``train.grad_accum`` G: G pooled passes, the first G-1 gradients requests whose replies
        bring each device's next micro-batch; the server's gradients summed, one update."""
        grid, micros = self.ctx.grid, self.ctx.cfg.train.grad_accum
        assert grid is not None
        msgs = [m for _, _, m in queue]
        rnd = int(msgs[0].meta.get("round", 0))
        arrival = max(a for a, _, _ in queue)  # the server waits for the last device to pool
        regs = {m.sender: meta_number(m, "device_reg", 0.0) for m in msgs}  # one a step
        total: dict[str, float] = {m.sender: 0.0 for m in msgs}
        examples: dict[str, int] = {m.sender: 0 for m in msgs}
        summed: dict[str, torch.Tensor] = {}
        for micro in range(micros):
            losses, lr, grads, cuts, weights, msgs = self._pooled_pass(
                msgs, micros, step, rnd, arrival
            )
            if not msgs:  # (skip) every device's U-turn failed its checks
                return []
            for k, g in grads.items():
                summed[k] = summed[k] + g if k in summed else g
            for m, loss in zip(msgs, losses):
                total[m.sender] += loss / micros
                examples[m.sender] += int(m.tensors["hidden"].shape[0])
            if micro == micros - 1:
                break
            meta = {"step": step, "round": rnd, **micro_meta(micro)}
            reqs = [Message("gradients", SERVER, m.sender, {"grad": c}, meta)
                    for m, c in zip(msgs, cuts)]  # fmt: skip
            msgs = []
            for rep in grid.request_many(reqs, codec=self.codec, together=True):
                try:
                    self._check(rep)
                except ProtocolError as err:  # (skip) the device leaves this step; what it
                    self._skip_step(step, rep.sender, str(err), keep_server=True)  # gave stays
                    continue
                msgs.append(rep)
                arrival = max(arrival, rep.arrival or 0.0)
            if not msgs:
                return []
        server_sq = sq_norm(list(summed.values()))
        want = self.global_clip
        for m, cut in zip(msgs, cuts):
            meta = {"step": step, "round": rnd, "server_sq": server_sq, "send_norm": want,
                    **micro_meta(micros - 1)}  # fmt: skip
            grid.send(Message("gradients", SERVER, m.sender, {"grad": cut}, meta), codec=self.codec)
        self.norms, self.norm_arrival = {}, {}
        state = self.states[msgs[0].sender]  # shared server side: one state for every device
        self._pending_step = (
            state,
            summed,
            server_sq,
            {m.sender: w for m, w in zip(msgs, weights)},
        )
        if not want:
            self.finish_step()
        return [StepLog(m.sender, total[m.sender] + regs[m.sender], lr, examples[m.sender])
                for m in msgs]  # fmt: skip

    def _pooled_pass(
        self, msgs: list[Message], micros: int, step: int, rnd: int, arrival: float
    ) -> tuple[
        list[float], float, dict[str, torch.Tensor], list[torch.Tensor], list[float], list[Message]
    ]:
        """One pooled forward/backward (the objective / ``micros``), its FLOPs metered: each
        device's loss, the LR, the server's gradients, each device's cut gradient (of its own
        mean loss), each device's weight in the objective, and the devices still in the step
        (U-shaped with ``on_bad_message: skip``: a device whose top answered badly drops out)."""
        if self.layout.top is not None:
            return self._pooled_u_pass(msgs, step, rnd, arrival)
        trainer, task = self.trainer, self.ctx.task
        rows, lengths, weights, acts = _pooled_inputs(msgs)
        mask = acts.attention_mask
        labels = [m.tensors["labels"] for m in msgs]
        state = self.states[msgs[0].sender]  # shared server side: one state for every device
        server = self.layout.server

        def fwd_bwd(a: Activations, labels: list[torch.Tensor]) -> list[float]:
            if server.packs_logits():  # a causal-LM head: each device's real tokens only
                logits, layout = server.packed_logits(a)
                parts = logits.split(layout.group_tokens(rows))
                own = [Packing.of(m.tensors["attention_mask"]) for m in msgs]
                losses = [packed_task_loss(p, y, o) for p, y, o in zip(parts, labels, own)]
            else:
                out, losses, start = server(a), [], 0
                for n, t, y in zip(rows, lengths, labels):
                    part = out[start : start + n]
                    losses.append(task_loss(part if task == "classification" else part[:, :t],
                                            y, task))  # fmt: skip
                    start += n
            objective = sum(w * loss for w, loss in zip(weights, losses))
            reg = self.reg()
            ((objective + reg if reg is not None else objective) / micros).backward()
            extra = float(reg.detach()) if reg is not None else 0.0
            return [float(loss.detach()) + extra for loss in losses]

        with trainer.activate(state):
            lr = trainer.set_lr(state.step)
            with padding_free(self.packed):
                losses, flops = self.ctx.meter.flops.run(
                    "split-server-pooled", fwd_bwd, acts, labels, dims=token_dims(mask, self.packed)
                )
            grads = {k: p.grad for k, p in trainer.params.items() if p.grad is not None}
        self.ctx.meter.compute(flops, round=rnd, after=arrival, label="server")
        return losses, lr, grads, _cut_grads(acts, rows, lengths, weights), weights, msgs

    def _pooled_u_pass(
        self, msgs: list[Message], step: int, rnd: int, arrival: float
    ) -> tuple[
        list[float], float, dict[str, torch.Tensor], list[torch.Tensor], list[float], list[Message]
    ]:
        """U-shaped, pooled: one forward of the middle on every device's activations, each
        device's slice of it down to its top (all at once: the tops neither call back nor wait
        on each other), their gradients (of each device's own loss / grad_accum) up, one
        backward of the example-weighted objective, as the label-sharing pooled pass takes."""
        grid = self.ctx.grid
        assert grid is not None
        rows, lengths, weights, acts = _pooled_inputs(msgs)
        state = self.states[msgs[0].sender]
        with self.trainer.activate(state):
            lr = self.trainer.set_lr(state.step)
            out, dims = self._middle(acts, rnd, arrival)
            downs, start = [], 0
            for m, n, t in zip(msgs, rows, lengths):
                tensors = {"hidden": out.hidden[start : start + n, :t].detach(),
                           "attention_mask": m.tensors["attention_mask"]}  # fmt: skip
                downs.append(Message("activations", SERVER, m.sender, tensors,
                                     {"step": step, "round": rnd}))  # fmt: skip
                start += n
            ups = grid.request_many(downs, codec=self.codec, together=True)
            full = torch.zeros_like(out.hidden)
            kept, device_losses, start = [], [], 0
            for m, rep, n, t, w in zip(msgs, ups, rows, lengths, weights):
                shape = [n, t, out.hidden.shape[-1]]
                try:
                    grad, loss = self._turned(rep, m.sender, shape, out.hidden.dtype)
                except ProtocolError as err:  # (skip) this device leaves the step; the
                    self._skip_step(step, m.sender, str(err), keep_server=True)  # others go on
                    start += n
                    continue
                full[start : start + n, :t] = w * grad
                device_losses.append(loss)
                kept.append(m)
                start += n
            after = max([arrival, *(r.arrival or 0.0 for r in ups)])
            server_reg = self._middle_backward(out, full, dims, rnd, after)
            grads = {k: p.grad for k, p in self.trainer.params.items() if p.grad is not None}
        cuts = _cut_grads(acts, rows, lengths, weights)
        index = {m.sender: i for i, m in enumerate(msgs)}
        keep = [index[m.sender] for m in kept]
        losses = [v + server_reg for v in device_losses]  # the loss as central logs it
        return losses, lr, grads, [cuts[i] for i in keep], [weights[i] for i in keep], kept

    def finish_step(self) -> None:
        """Pooled server: apply the step's update once the devices' norms are in (global clip:
        the server's norm plus each device's, weighted as in the pooled objective)."""
        if self._pending_step is None:
            return
        state, grads, total, weights = self._pending_step
        self._pending_step = None
        if self.global_clip:
            missing = sorted(set(weights) - set(self.norms))
            if missing:
                raise ProtocolError(f"server: no 'norm' message from {missing} this step")
            total += sum(weights[d] ** 2 * self.norms[d] for d in weights)
            after = max(self.norm_arrival[d] for d in weights)
            self.ctx.meter.compute(0.0, after=after, label="wait")
        with self.in_role():
            self.trainer.step_role(state, grads, clip_coef(self.ctx.cfg.train.max_grad_norm, total))


def _pooled_inputs(
    msgs: list[Message],
) -> tuple[list[int], list[int], list[float], Activations]:
    """A pooled pass's input: each device's rows and width, its weight in the objective (its
    share of the rows) and every device's activations padded to the widest, stacked."""
    rows = [int(m.tensors["hidden"].shape[0]) for m in msgs]
    lengths = [int(m.tensors["hidden"].shape[1]) for m in msgs]
    width, total_rows = max(lengths), sum(rows)
    pad = [width - t for t in lengths]
    hidden = torch.cat([F.pad(m.tensors["hidden"], (0, 0, 0, p)) for m, p in zip(msgs, pad)])
    mask = torch.cat([F.pad(m.tensors["attention_mask"], (0, p)) for m, p in zip(msgs, pad)])
    return (
        rows,
        lengths,
        [n / total_rows for n in rows],
        Activations(hidden.requires_grad_(True), mask),
    )


def _cut_grads(
    acts: Activations, rows: list[int], lengths: list[int], weights: list[float]
) -> list[torch.Tensor]:
    """Each device's cut gradient from a pooled backward: its rows and width, divided by its
    weight (the gradient of its *own* mean loss)."""
    cuts, start = [], 0
    for n, t, w in zip(rows, lengths, weights):
        cuts.append(acts.hidden.grad[start : start + n, :t] / w)
        start += n
    return cuts
