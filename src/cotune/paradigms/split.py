"""Vanilla split learning (SL) with LoRA: devices take turns, one at a time.

The model is cut as in ``splitfed`` (device: embeddings + blocks [0, cut) with their adapters;
server: the rest, one shared server-side adapter). There is a single device-side adapter: the
device whose turn it is trains it for ``turn_steps`` steps through the cut, then hands it on to
the next device (round robin). The hand-over is a real message, relayed through the server
(``relay: server``, the usual SL deployment where devices only talk to the server) or sent
device to device (``relay: p2p``). With ``relay_optimizer`` the AdamW moments and step count
travel with the weights, so K devices taking turns train exactly like one optimizer over the
concatenated sequence of their batches.

On the Grid: a device's step is a local event on it; with ``relay: p2p`` the device whose turn
ends hands the adapter on itself (a local event: its turn is over), with ``relay: server`` the
server asks it for the adapter and forwards it.
"""

from __future__ import annotations

from typing import Any

import torch

from cotune.paradigms.base import Experiment, ParadigmResult, parse_options, reply
from cotune.paradigms.options import SplitOptions
from cotune.paradigms.split_cut import combined, make_layout, segment_memory, split_extra
from cotune.paradigms.split_server import SplitServer, server_side
from cotune.paradigms.splitting import SplitDevice
from cotune.runtime import Message
from cotune.runtime.ids import SERVER
from cotune.runtime.node import NodeContext

_AVG, _SQ = "exp_avg::", "exp_avg_sq::"


class TurnDevice(SplitDevice):
    """A split device that can hand its adapter (and optimizer state) to the next one."""

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx)
        self.relay_optimizer = bool(getattr(self.opts, "relay_optimizer", True))

    def relay_payload(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {k: v.detach() for k, v in self.state.params.items()}
        adam_steps = {}
        if self.relay_optimizer:
            for k, st in self.state.optim.items():
                if "exp_avg" in st:
                    tensors[_AVG + k], tensors[_SQ + k] = st["exp_avg"], st["exp_avg_sq"]
                    adam_steps[k] = float(st["step"])
        return tensors, {"step": self.state.step, "adam_steps": adam_steps}

    def tick_hand_over(self, meta: dict[str, Any]) -> None:
        """Its turn is over: send the adapter straight to the next device (``relay: p2p``)."""
        tensors, info = self.relay_payload()
        assert self.ctx.grid is not None
        msg = Message("relay", self.role_id, meta["to"], tensors, {**info, "round": meta["round"]})
        self.ctx.grid.send(msg)

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
    make_layout(exp.model, exp.cfg, parse_options(SplitOptions, exp.cfg.paradigm.options))


def run(exp: Experiment) -> ParadigmResult:
    cfg, grid = exp.cfg, exp.grid
    opts = parse_options(SplitOptions, cfg.paradigm.options)
    devices = grid.node_ids("device-")
    for d in devices:
        grid.start(d, TurnDevice)
    ctx, layout, trainer = server_side(exp, opts, cfg.train.steps)
    srv_state = trainer.new_state(cfg.seed, ctx.model.initial_params())
    server = SplitServer(ctx, opts, layout, trainer, dict.fromkeys(devices, srv_state))
    grid.host(server)
    exp.meter.memory(
        "split-server", lambda: segment_memory(ctx.model.loaded, cfg, layout.server, train=True)
    )

    start = 0
    if exp.resume is not None:
        st = exp.resume["states"]
        for d in devices:
            grid.restore(d, st[d])
        srv_state = st["server-side"]
        server.states = dict.fromkeys(devices, srv_state)
        start = int(exp.resume["step"])

    def holder(step: int) -> str:  # step is 1-based
        return devices[((step - 1) // opts.turn_steps) % len(devices)]

    def hand_over(src: str, dst: str, rnd: int) -> None:
        if opts.relay == "p2p":
            grid.tick([src], "hand_over", {"to": dst, "round": rnd})
            return
        rep = grid.request(Message("get_relay", SERVER, src, {}, {"round": rnd}))
        meta = {k: rep.meta[k] for k in ("step", "adam_steps")}
        grid.send(Message("relay", SERVER, dst, rep.tensors, {**meta, "round": rnd}))

    last_eval: dict[str, float] = {}
    points = set(exp.eval_points())
    with exp.progress(cfg.train.steps - start, f"split {cfg.name}") as bar:
        for step in range(start + 1, cfg.train.steps + 1):
            dev, rnd = holder(step), (step - 1) // opts.turn_steps + 1
            grid.tick([dev], "step", {"step": step, "round": rnd})
            logs = server.serve(step)
            norm = grid.tick([dev], "update")[0]
            for s, who, err in [x for x in server.skipped if x[0] == step]:
                exp.log_record("skip", s, who, round=rnd, error=err)
            loss = logs[0].loss if logs else float("nan")
            lr = logs[0].lr if logs else None
            exp.log_record("train", step, "mean", round=rnd, loss=loss, lr=lr,
                           grad_norm=norm, device=dev)  # fmt: skip
            bar.update(1, train_loss=loss)
            nxt = holder(step + 1)
            if step < cfg.train.steps and nxt != dev:
                hand_over(dev, nxt, rnd)
            if step in points:
                last_eval = exp.evaluate_state(combined(grid.snapshot(dev), srv_state))
                exp.log_record("eval", step, SERVER, round=rnd, **last_eval)
            exp.maybe_checkpoint(
                step,
                lambda: {"server-side": srv_state, **{d: grid.snapshot(d) for d in devices}},
                {},
            )
    final = grid.snapshot(holder(cfg.train.steps))
    if not last_eval:
        last_eval = exp.evaluate_state(combined(final, srv_state))
    extra = split_extra(opts, layout, ctx.model.trainer.params, len(server.skipped), 0)
    return ParadigmResult(
        states={SERVER: combined(final, srv_state)}, final_eval=last_eval, extra=extra
    )
