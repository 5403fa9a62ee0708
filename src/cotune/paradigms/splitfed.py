"""SplitLoRA: split-federated LoRA (SFL). Devices hold the embeddings and the first ``cut`` blocks
with their adapters, the server holds the rest; every step all devices train in parallel through
the cut (activations up, cut gradients down), and the device-side adapters are FedAvg'ed every
``aggregate_every`` steps (or device batches: ``aggregate_unit``).

Server side (``server_side``): ``shared`` is SplitLoRA's reference code (one server model and one
optimizer, updated once per device batch, devices served one after another, here in arrival
order); ``per_device`` is SplitFed-V1 (one server copy per device, averaged with the device
adapters every ``aggregate_every`` steps or client batches). See docs/methods.md (SplitLoRA) for what follows the
paper and what is reconstructed.

On the Grid: each device's step is a local event on it (its own loop: batch, forward, upload;
then backward and update once the cut gradient is in); the server role lives on the driver's
node and serves the uploads in the order they arrived.
"""

from __future__ import annotations

import torch

from cotune.paradigms.base import Experiment, ParadigmResult, mean, parse_options, screen_updates
from cotune.paradigms.options import SplitFedOptions
from cotune.paradigms.split_cut import (
    StepLog,
    combined,
    make_layout,
    segment_memory,
    split_extra,
    weighted_mean,
)
from cotune.paradigms.split_server import SplitServer, server_side
from cotune.paradigms.splitting import SplitDevice
from cotune.runtime import Message
from cotune.runtime.ids import SERVER
from cotune.train import RoleState


def preflight(exp: Experiment) -> None:
    """The cut must fit the model, with adapters on both sides (before any file is written)."""
    make_layout(exp.model, exp.cfg, parse_options(SplitFedOptions, exp.cfg.paradigm.options))


def run(exp: Experiment) -> ParadigmResult:
    cfg, grid = exp.cfg, exp.grid
    opts = parse_options(SplitFedOptions, cfg.paradigm.options)
    devices = grid.node_ids("device-")
    n_dev = len(devices)
    shared = opts.server_side == "shared"
    pooled = opts.server_batch == "pooled"
    # A sequential shared server steps once per device batch, so its LR schedule spans K x steps.
    server_steps = cfg.train.steps * (n_dev if shared and not pooled else 1)
    for d in devices:
        grid.start(d, SplitDevice)
    ctx, layout, server_trainer = server_side(exp, opts, server_steps)
    init = ctx.model.initial_params()
    srv_glob = server_trainer.new_state(cfg.seed, init)
    copies = dict.fromkeys(devices, srv_glob)
    if not shared:
        copies = {d: server_trainer.new_state(cfg.seed + i, init) for i, d in enumerate(devices)}
    # The devices' global adapter as the server keeps it (what it averaged last).
    dev_glob = RoleState(params={k: init[k].detach().clone() for k in layout.device_names})
    server = SplitServer(ctx, opts, layout, server_trainer, copies)
    grid.host(server)
    exp.meter.memory(
        "split-server", lambda: segment_memory(ctx.model.loaded, cfg, layout.server, train=True)
    )
    weights = [
        float(grid.node_info(d)["examples"]) if opts.weighting == "examples" else 1.0
        for d in devices
    ]
    rejected_total = 0

    start = 0
    if exp.resume is not None:
        st = exp.resume["states"]
        for d in devices:
            grid.restore(d, st[d])
        dev_glob = st["device-global"]
        srv_glob = st["server-side"]
        copies = dict.fromkeys(devices, srv_glob)
        if not shared:
            copies = {d: st[f"server-side-{d}"] for d in devices}
        server.states = copies
        start = int(exp.resume["step"])

    def aggregate(rnd: int) -> int:
        reps = grid.request_many(
            [Message("get_adapter", SERVER, d, {}, {"round": rnd}) for d in devices], together=True
        )
        ref = {k: dev_glob.params[k] for k in layout.device_names}
        good, rejected = screen_updates(reps, lambda _: ref)
        w = [wt for r, wt in zip(reps, weights) if r.sender not in rejected]
        if not good:
            return len(rejected)
        avg = weighted_mean([r.tensors for r in good], w)
        n = sum(v.numel() for v in avg.values()) * len(reps)
        after = max(r.arrival or 0.0 for r in reps)
        exp.meter.compute(3.0 * n, round=rnd, after=after, label="aggregate")
        for d in devices:
            grid.send(Message("set_adapter", SERVER, d, avg, {"round": rnd}))
        srv_avg = None
        if not shared:  # SplitFed-V1: the server copies are averaged too (server-internal)
            srv_avg = weighted_mean([copies[d].params for d in devices], weights)
        with torch.no_grad():
            for k, v in avg.items():
                dev_glob.params[k].copy_(v)
            for state in [srv_glob, *copies.values()] if srv_avg is not None else []:
                for k, v in srv_avg.items():
                    state.params[k].copy_(v)
        return len(rejected)

    every, last_eval = opts.aggregate_every, {}
    # Device batches per step: 1 when the period counts steps, K when it counts client batches.
    per_step = len(devices) if opts.aggregate_unit == "client_batches" else 1

    def aggregates_at(s: int) -> bool:  # the count reaches a multiple of the period in step s
        return s * per_step // every > (s - 1) * per_step // every

    done = sum(aggregates_at(s) for s in range(1, start + 1))  # rounds finished before `start`
    points = set(exp.eval_points())
    # A step's last part on the devices (the held-back backward, the update) runs when their
    # next step starts, in the same local event: one control round trip per step, not two.
    # Where the driver needs every device's update done (aggregation, evaluation, a
    # checkpoint, the end) it says so with a ``finish`` event. `unlogged`: the step whose
    # record waits for its devices' gradient norms (written when they are back: its times
    # say when the driver knew the whole step).
    unlogged: tuple[int, int, list[StepLog]] | None = None

    def log_step(norms: list[float | None]) -> None:
        nonlocal unlogged
        assert unlogged is not None
        step, rnd, logs = unlogged
        unlogged = None
        for s, dev, err in [x for x in server.skipped if x[0] == step]:
            exp.log_record("skip", s, dev, round=rnd, error=err)
        found = [n for n in norms if n is not None]
        exp.log_record("train", step, "mean", round=rnd, loss=mean([g.loss for g in logs]),
                       lr=logs[0].lr if logs else None,
                       grad_norm=mean(found) if found else None)  # fmt: skip

    with exp.progress(cfg.train.steps - start, f"splitfed {cfg.name}") as bar:
        for step in range(start + 1, cfg.train.steps + 1):
            rnd = done + 1
            before = grid.tick(devices, "step", {"step": step, "round": rnd, "defer": pooled})
            if unlogged is not None:  # the devices finished the last step first
                server.finish_step()
                log_step(before)
            logs = server.serve(step)
            unlogged = (step, rnd, logs)
            aggregates = aggregates_at(step) or step == cfg.train.steps
            if aggregates or step in points or exp.checkpoint_due(step):
                norms = grid.tick(devices, "finish")
                server.finish_step()
                log_step(norms)
            if aggregates:
                rejected_total += aggregate(rnd)
                done += aggregates_at(step)
            bar.update(1, train_loss=mean([g.loss for g in logs]))
            if step in points:
                last_eval = exp.evaluate_state(combined(dev_glob, srv_glob))
                exp.log_record("eval", step, SERVER, round=rnd, **last_eval)

            def states() -> dict[str, RoleState]:
                out = {"device-global": dev_glob, "server-side": srv_glob}
                out.update({d: grid.snapshot(d) for d in devices})
                if not shared:
                    out.update({f"server-side-{k}": v for k, v in copies.items()})
                return out

            exp.maybe_checkpoint(step, states, {})
    if not last_eval:
        last_eval = exp.evaluate_state(combined(dev_glob, srv_glob))
    extra = split_extra(opts, layout, ctx.model.trainer.params, len(server.skipped), rejected_total)
    return ParadigmResult(
        states={SERVER: combined(dev_glob, srv_glob)}, final_eval=last_eval, extra=extra
    )
