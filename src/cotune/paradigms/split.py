"""Vanilla split learning (SL) with LoRA: devices take turns, one at a time.

The model is cut as in ``splitfed`` (device: embeddings + blocks [0, cut) with their adapters;
server: the rest, one shared server-side adapter). There is a single device-side adapter: the
device whose turn it is trains it for ``turn_steps`` steps through the cut, then hands it on to
the next device (round robin). The hand-over is a real message, relayed through the server
(``relay: server``, the usual SL deployment where devices only talk to the server) or sent
device to device (``relay: p2p``). With ``relay_optimizer`` the AdamW moments and step count
travel with the weights, so K devices taking turns train exactly like one optimizer over the
concatenated sequence of their batches.
"""

from __future__ import annotations

import torch

from cotune.paradigms.base import Experiment, ParadigmResult, parse_options, reply
from cotune.paradigms.options import SplitOptions
from cotune.paradigms.splitfed import SplitServer
from cotune.paradigms.splitting import (
    SplitContext,
    SplitDevice,
    device_memory,
    make_layout,
    segment_memory,
)
from cotune.runtime import Message
from cotune.sim.simulation import SERVER, device_id

_AVG, _SQ = "exp_avg::", "exp_avg_sq::"


class TurnDevice(SplitDevice):
    """A split device that can hand its adapter (and optimizer state) to the next one."""

    relay_optimizer: bool = True

    def relay_payload(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {k: v.detach() for k, v in self.state.params.items()}
        adam_steps = {}
        if self.relay_optimizer:
            for k, st in self.state.optim.items():
                if "exp_avg" in st:
                    tensors[_AVG + k], tensors[_SQ + k] = st["exp_avg"], st["exp_avg_sq"]
                    adam_steps[k] = float(st["step"])
        return tensors, {"step": self.state.step, "adam_steps": adam_steps}

    def on_get_relay(self, msg: Message) -> Message:
        tensors, meta = self.relay_payload()
        return reply(msg, "relay", tensors, **meta)

    def on_relay(self, msg: Message) -> None:
        t = msg.tensors
        with torch.no_grad():
            for k, v in self.state.params.items():
                v.copy_(t[k])
        if self.relay_optimizer:
            steps = msg.meta["adam_steps"]
            self.state.optim = {k: {} for k in self.state.params}
            for k, s in steps.items():
                self.state.optim[k] = {
                    "step": torch.tensor(s, dtype=torch.float32),
                    "exp_avg": t[_AVG + k].clone(),
                    "exp_avg_sq": t[_SQ + k].clone(),
                }
        self.state.step = int(msg.meta["step"])  # the LR schedule follows the adapter


def preflight(exp: Experiment) -> None:
    """The cut must fit the model, with adapters on both sides (before any file is written)."""
    make_layout(exp, parse_options(SplitOptions, exp.cfg.paradigm.options))


def run(exp: Experiment) -> ParadigmResult:
    cfg = exp.cfg
    opts = parse_options(SplitOptions, cfg.paradigm.options)
    ctx = SplitContext.build(exp, opts, cfg.train.steps)
    devices: list[TurnDevice] = []
    for i, idx in enumerate(exp.parts):
        dev = TurnDevice(device_id(i), ctx, exp.train_set.subset(idx), seed=cfg.seed + i)
        dev.relay_optimizer = opts.relay_optimizer
        exp.engine.register(dev)
        devices.append(dev)
    srv_state = ctx.server_trainer.new_state(cfg.seed, exp.initial_params())
    server = SplitServer(ctx, {d.role_id: srv_state for d in devices})
    exp.engine.register(server)
    mem = device_memory(exp, ctx)
    for d in devices:
        exp.sim.memory[d.role_id] = mem
    exp.sim.memory[SERVER] = segment_memory(exp, ctx.layout.server, train=True)

    start = 0
    if exp.resume is not None:
        st = exp.resume["states"]
        for d in devices:
            d.restore(st[d.role_id])
        srv_state = st["server-side"]
        server.states = {d.role_id: srv_state for d in devices}
        start = int(exp.resume["step"])

    def holder(step: int) -> TurnDevice:  # step is 1-based
        return devices[((step - 1) // opts.turn_steps) % len(devices)]

    def hand_over(src: TurnDevice, dst: TurnDevice, rnd: int) -> None:
        if opts.relay == "p2p":
            tensors, meta = src.relay_payload()
            exp.engine.send(
                Message("relay", src.role_id, dst.role_id, tensors, {**meta, "round": rnd})
            )
            return
        rep = exp.engine.request(Message("get_relay", SERVER, src.role_id, {}, {"round": rnd}))
        meta = {k: rep.meta[k] for k in ("step", "adam_steps")}
        exp.engine.send(Message("relay", SERVER, dst.role_id, rep.tensors, {**meta, "round": rnd}))

    last_eval: dict[str, float] = {}
    points = set(exp.eval_points())
    with exp.progress(cfg.train.steps - start, f"split {cfg.name}") as bar:
        for step in range(start + 1, cfg.train.steps + 1):
            dev, rnd = holder(step), (step - 1) // opts.turn_steps + 1
            dev.send_activations(step, rnd)
            logs = server.serve(step)
            norm = dev.finish_step()
            for s, who, err in [x for x in ctx.skipped if x[0] == step]:
                exp.log_record("skip", s, who, round=rnd, error=err)
            loss = logs[0].loss if logs else float("nan")
            lr = logs[0].lr if logs else None
            exp.log_record("train", step, "mean", round=rnd, loss=loss, lr=lr,
                           grad_norm=norm, device=dev.role_id)  # fmt: skip
            bar.update(1, loss=loss)
            nxt = holder(step + 1)
            if step < cfg.train.steps and nxt is not dev:
                hand_over(dev, nxt, rnd)
            if step in points:
                last_eval = exp.evaluate_state(ctx.combined(dev.state, srv_state))
                exp.log_record("eval", step, SERVER, round=rnd, **last_eval)
            states = {"server-side": srv_state, **{d.role_id: d.state for d in devices}}
            exp.maybe_checkpoint(step, states, {})
    final = holder(cfg.train.steps)
    if not last_eval:
        last_eval = exp.evaluate_state(ctx.combined(final.state, srv_state))
    return ParadigmResult(
        states={SERVER: ctx.combined(final.state, srv_state)},
        final_eval=last_eval,
        extra=ctx.extra(),
    )
