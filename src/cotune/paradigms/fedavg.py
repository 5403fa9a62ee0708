"""Federated LoRA (FedLoRA): the FedAvg family over adapters.

Each round the server samples devices, sends them the global adapter, each trains it locally on
its own shard and uploads the result; the server aggregates the updates that reported in time
(sample-weighted FedAvg, or a server optimizer: FedAvgM, FedAdam, FedYogi, FedAdagrad; or a
robust reducer: coordinate median, trimmed mean). FedProx adds a proximal term on the device.

Partial participation: devices connected at the round's start are sampled (``random``
availability instead drops a sampled device mid-round with probability ``drop_p``); a device
that goes offline before it uploads comes back as a ``failed`` reply and the round carries on
without it; a ``quorum`` or ``deadline_s`` closes the round early and ``late`` updates are
discarded. The driver talks to the devices only through the grid; it never sees the clock.
"""

from __future__ import annotations

import logging
import math

import torch

from cotune.aggregation import get_aggregator
from cotune.errors import ConfigError, ProtocolError
from cotune.paradigms.base import (
    Experiment,
    ParadigmResult,
    mean,
    parse_options,
    screen_updates,
    state_tensors,
)
from cotune.paradigms.federated import FedDevice, RoundTraffic, log_mean_losses, sample_round
from cotune.paradigms.options import FedAvgOptions
from cotune.progress import eval_fields
from cotune.runtime import Message
from cotune.runtime.ids import SERVER

log = logging.getLogger(__name__)


def steps_per_round(exp: Experiment, opts: FedAvgOptions, devices: list[str]) -> int:
    """Local steps of a round: ``local_steps``, or the most any device's ``local_epochs`` take
    (from the data sizes the devices declared when they joined)."""
    if opts.local_epochs is None:
        return opts.local_steps
    bs = exp.cfg.train.batch_size
    sizes = [int(exp.grid.node_info(d)["examples"]) for d in devices]
    return max(max(1, math.ceil(opts.local_epochs * math.ceil(n / bs))) for n in sizes)


def num_rounds(exp: Experiment, opts: FedAvgOptions) -> int:
    return opts.rounds or math.ceil(exp.cfg.train.steps / opts.local_steps)


def preflight(exp: Experiment) -> None:
    """Checks that need more than the config, run before the run directory is touched."""
    opts = parse_options(FedAvgOptions, exp.cfg.paradigm.options)
    get_aggregator(opts.aggregator, **opts.aggregator_options)  # option values


def run(exp: Experiment) -> ParadigmResult:
    cfg, grid = exp.cfg, exp.grid
    opts = parse_options(FedAvgOptions, cfg.paradigm.options)
    aggregator = get_aggregator(opts.aggregator, **opts.aggregator_options)
    devices = grid.node_ids("device-")
    for d in devices:
        grid.start(d, FedDevice)
    glob = exp.trainer.new_state(cfg.seed, exp.initial_params())
    rounds = num_rounds(exp, opts)
    spr = steps_per_round(exp, opts, devices)
    ranks = None
    if cfg.devices.ranks is not None:
        from cotune.paradigms import fed_ranks

        ranks = fed_ranks.device_ranks(cfg, devices, grid.node_info)
        if opts.rank_aggregation == "stack" and cfg.train.dp.mode == "central":
            raise ConfigError("devices.ranks with train.dp central: use rank_aggregation zero_pad")
    secure = opts.secure_aggregation
    if secure is not None:
        from cotune.paradigms.fed_dp import NOT_A_MEAN
        from cotune.paradigms.fed_secagg import SecureRound

        why = ("train.dp central (the server must see each update to clip it)"
               if cfg.train.dp.mode == "central" else "devices.ranks" if ranks is not None
               else f"aggregator {opts.aggregator}" if opts.aggregator in NOT_A_MEAN else None)  # fmt: skip
        if why:
            raise ConfigError(f"paradigm.options.secure_aggregation: not with {why}")
    privacy = None
    if cfg.train.dp.mode != "off":
        from cotune.paradigms.fed_dp import RoundPrivacy

        if exp.domains is not None:
            raise ConfigError("train.dp: not with a domain stage (peft.stages), whose devices "
                              "send different parts of the adapter")  # fmt: skip
        privacy = RoundPrivacy(cfg, opts, devices, rounds)

    start = 0
    if exp.resume is not None:
        glob = exp.resume["states"][SERVER]
        for d in devices:
            grid.restore(d, exp.resume["states"].get(d))
        aggregator.load_state_dict(exp.resume["extra"]["aggregator"])
        start = int(exp.resume["extra"]["round"])
        if privacy is not None:
            privacy.ledger.load_state_dict(exp.resume["extra"].get("dp", {}))
        if ranks is not None:
            ranks.update(exp.resume["extra"].get("ranks", {}))

    every = cfg.eval.every
    last_eval: dict[str, float] = {}
    rejected_total = 0  # uploads refused (non-finite or malformed): counted, never aggregated
    with exp.progress(rounds - start, f"fedavg {cfg.name}", unit="round") as bar:
        for rnd in range(start + 1, rounds + 1):
            step = rnd * spr
            bar.phase(f"round {rnd}/{rounds}: devices training")
            chosen = sample_round(grid, devices, rnd, cfg.seed,
                                  clients_per_round=opts.clients_per_round,
                                  fraction=opts.fraction)  # fmt: skip
            if not chosen:  # nobody connected: the server waits and tries again
                grid.wait(opts.idle_wait_s)
                exp.log_record(
                    "round", step, SERVER, round=rnd, participants=0, reported=0, dropped=0
                )
                continue
            traffic = RoundTraffic(grid)
            meta = {"round": rnd, "schedule_step": (rnd - 1) * spr,
                    **(privacy.round_meta() if privacy is not None else {})}  # fmt: skip

            sround, sa_meta = None, {}
            if secure is not None:
                sround = SecureRound(grid, secure, rnd, cfg.seed, opts.weighting)
                try:
                    chosen, sa_meta = sround.setup(chosen)
                except ProtocolError as e:  # too few devices answered to mask safely
                    log.warning("round %d: %s; skipped", rnd, e)
                    exp.log_record("round", step, SERVER, round=rnd, participants=len(chosen),
                                   reported=0, dropped=len(chosen), secagg_failed=1)  # fmt: skip
                    continue
            msgs = []
            for d in chosen:
                tensors, extra = exp.role_tensors(d, state_tensors(glob)), {}
                if ranks is not None:
                    tensors, extra = fed_ranks.for_device(tensors, ranks[d], opts.rank_prune)
                msgs.append(
                    Message("train", SERVER, d, tensors, {**meta, **extra, **sa_meta.get(d, {})})
                )
            futures = grid.submit_many(msgs, round=rnd)
            done = grid.gather(futures, quorum=opts.quorum, deadline_s=opts.deadline_s)
            reports = [r.message for r in done.ok if r.message is not None]
            claimed = {m.sender: m.meta.get("rank") for m in reports}
            expected = (
                (lambda d: exp.role_tensors(d, state_tensors(glob)))
                if ranks is None
                else lambda d, c=claimed: fed_ranks.expected(
                    exp.role_tensors(d, state_tensors(glob)),
                    c.get(d),
                    ranks[d],  # type: ignore[index]
                )
            )
            if sround is not None:  # masked vectors: the secure round checks them itself
                good, rejected = reports, []
            else:
                good, rejected = screen_updates(reports, expected)
            if ranks is not None:
                for m in good:  # self-pruning: a device keeps the smaller rank it chose
                    ranks[m.sender] = int(m.meta["rank"])
                if opts.rank_aggregation == "zero_pad":
                    ref = state_tensors(glob)
                    for m in good:
                        m.tensors = fed_ranks.pad(m.tensors, ref)
            rejected_total += len(rejected)
            weights = [
                float(m.meta["examples"]) if opts.weighting == "examples" else 1.0 for m in good
            ]
            bar.phase(f"round {rnd}/{rounds}: aggregating")
            dp_fields: dict = {}
            new = None  # the round's new global adapter, if the round makes one
            if sround is not None:
                mean_update, dp_fields = sround.aggregate(good, state_tensors(glob))
                if mean_update is not None and len(good) >= opts.min_reports:
                    new = aggregator.aggregate(state_tensors(glob), [mean_update], [1.0])
            elif len(good) >= opts.min_reports and privacy is not None:
                new, dp_fields = privacy.aggregate(
                    aggregator, state_tensors(glob), good, len(chosen), rnd
                )
                exp.meter.compute(4.0 * sum(v.numel() for v in new.values()) * len(good),
                                  after=done.closed_at, label="aggregate")  # fmt: skip
            elif len(good) >= opts.min_reports:
                # In a domain stage each device sends only what it trains: average per tensor.
                combine = (
                    aggregator.aggregate if exp.domains is None else aggregator.aggregate_partial
                )
                if ranks is not None and opts.rank_aggregation == "stack":
                    ref = state_tensors(glob)
                    stacked = fed_ranks.stack_and_refactor(ref, [m.tensors for m in good], weights)
                    new = aggregator.aggregate(ref, [stacked], [1.0])
                else:
                    new = combine(state_tensors(glob), [m.tensors for m in good], weights)
                n_params = sum(v.numel() for v in new.values())
                exp.meter.compute(3.0 * n_params * len(good), after=done.closed_at,
                                  label="aggregate")  # fmt: skip
            if new is not None:
                with torch.no_grad():
                    for k, v in new.items():
                        glob.params[k].copy_(v)
            losses = [m.meta["losses"] for m in good]
            log_mean_losses(exp, losses, (rnd - 1) * spr + 1, rnd)
            bar.update(0, train_loss=mean([ls[-1] for ls in losses if ls]) if losses else None)
            exp.log_record(
                "round",
                step,
                SERVER,
                round=rnd,
                participants=len(chosen),
                reported=len(good),
                dropped=len(chosen) - len(good) - len(rejected),
                rejected=len(rejected),
                **traffic.record(chosen),
                **dp_fields,
            )
            if step // every > (step - spr) // every or rnd == rounds:
                last_eval = exp.evaluate_state(glob)
                exp.log_record("eval", step, SERVER, round=rnd, **last_eval)
            bar.update(1, **eval_fields(last_eval))
            exp.maybe_checkpoint(
                step,
                lambda: {SERVER: glob, **grid.snapshots(devices)},
                {
                    "round": rnd,
                    "aggregator": aggregator.state_dict(),
                    **({"dp": privacy.ledger.state_dict()} if privacy is not None else {}),
                    **({"ranks": dict(ranks)} if ranks is not None else {}),
                },  # fmt: skip
            )
    if not last_eval:
        last_eval = exp.evaluate_state(glob)
    return ParadigmResult(
        states={SERVER: glob},
        final_eval=last_eval,
        extra={
            "rounds": rounds,
            "rejected_updates": rejected_total,
            **({"dp": privacy.summary()} if privacy is not None else {}),
            **({"ranks": dict(ranks)} if ranks is not None else {}),
        },  # fmt: skip
    )
