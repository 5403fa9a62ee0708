"""Federated LoRA (FedLoRA): the FedAvg family over adapters.

Each round the server samples devices, sends them the global adapter, each trains it locally on
its own shard and uploads the result; the server aggregates the updates that reported in time
(sample-weighted FedAvg, or a server optimizer: FedAvgM, FedAdam, FedYogi, FedAdagrad; or a
robust reducer: coordinate median, trimmed mean). FedProx adds a proximal term on the device.

Partial participation: devices online at the round's start are sampled (``random`` availability
instead drops a sampled device mid-round with probability ``drop_p``); a device that goes
offline before it uploads raises ``PeerUnavailable`` and the round carries on without it; a
``quorum`` or ``deadline_s`` closes the round early and late updates are discarded.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from cotune.aggregation import get_aggregator, proximal_loss
from cotune.errors import PeerUnavailable
from cotune.paradigms.base import (
    Experiment,
    ParadigmResult,
    TrainingRole,
    mean,
    parse_options,
    reply,
    screen_updates,
    state_tensors,
)
from cotune.paradigms.options import FedAvgOptions
from cotune.runtime import Message
from cotune.sim.simulation import SERVER, device_id
from cotune.train import full_model_loss


class FedDevice(TrainingRole):
    """Trains the global adapter it is sent on its own shard, returns the result."""

    opts: FedAvgOptions
    last_train_host_s: float = 0.0

    def local_steps(self) -> int:
        if self.opts.local_epochs is None:
            return self.opts.local_steps
        per_epoch = math.ceil(len(self.dataset) / self.exp.cfg.train.batch_size)
        return max(1, math.ceil(self.opts.local_epochs * per_epoch))

    def on_train(self, msg: Message) -> Message:
        rnd = int(msg.meta["round"])
        with torch.no_grad():
            for k, v in msg.tensors.items():
                self.state.params[k].copy_(v)
        if self.opts.optimizer_state == "reset":
            self.state.optim = {k: {} for k in self.state.params}
        self.state.step = int(msg.meta["schedule_step"])  # LR follows the global round
        if self.opts.prox_mu > 0:
            self.loss_fn = self._proximal(msg.tensors)
        started = time.perf_counter()
        results = self.train_steps(self.local_steps(), round=rnd)
        # Measurement, not protocol: host timings never ride in a message (they would change
        # its byte count, and so the simulated time, from one run to the next).
        self.last_train_host_s = time.perf_counter() - started
        sim = self.exp.sim
        if not sim.online(self.role_id, rnd, sim.clock.free_at(self.role_id)):
            raise PeerUnavailable(f"{self.role_id} went offline in round {rnd} before uploading")
        return reply(
            msg,
            "update",
            self.exp.role_tensors(self.role_id, state_tensors(self.state)),
            round=rnd,
            examples=len(self.dataset),
            losses=[r.loss for r in results],
        )

    def _proximal(self, global_params: dict[str, torch.Tensor]):
        exp, mu = self.exp, self.opts.prox_mu
        task = full_model_loss(exp.forward, exp.task, exp.adapters.regularization_loss)
        params = exp.trainer.params  # the shared parameters, holding this device's tensors now

        def loss_fn(batch):
            return task(batch) + proximal_loss(params, global_params, mu)

        return loss_fn


def num_rounds(exp: Experiment, opts: FedAvgOptions) -> int:
    return opts.rounds or math.ceil(exp.cfg.train.steps / opts.local_steps)


def sample_devices(
    exp: Experiment, opts: FedAvgOptions, devices: list[FedDevice], rnd: int, t0: float
):
    """Devices online at the round start, sampled without replacement (seeded per round)."""
    if exp.cfg.devices.availability.kind == "random":
        pool = devices  # random drops are not known in advance: they happen mid-round
    else:
        pool = [d for d in devices if exp.sim.online(d.role_id, rnd, t0)]
    k = opts.clients_per_round or max(1, round(opts.fraction * len(devices)))
    k = min(k, len(pool))
    rng = np.random.default_rng([exp.cfg.seed, 0xFED, rnd])
    picked = sorted(rng.choice(len(pool), size=k, replace=False).tolist()) if k else []
    return [pool[i] for i in picked]


def shape_reports(exp: Experiment, roles: list[str], t0: float, rnd: int) -> list[str]:
    """Apply the dispatch shaper (SimDC's traffic controller): reports reach the server in
    batches or at a rate, so a device's report counts from its release time; returns the
    reports the shaper dropped."""
    shaper = exp.sim.shaper
    if shaper is None or not roles:
        return []
    clock = exp.sim.clock
    ready = [clock.free_at(r) for r in roles]
    dropped = []
    for role, t in zip(roles, shaper.release(ready, origin=t0, round=rnd)):
        if t is None:
            dropped.append(role)
        else:
            clock.compute(role, 0.0, after=t, label="dispatch-wait")
    return dropped


def preflight(exp: Experiment) -> None:
    """Checks that need more than the config, run before the run directory is touched."""
    opts = parse_options(FedAvgOptions, exp.cfg.paradigm.options)
    get_aggregator(opts.aggregator, **opts.aggregator_options)  # option values


def run(exp: Experiment) -> ParadigmResult:
    cfg = exp.cfg
    opts = parse_options(FedAvgOptions, cfg.paradigm.options)
    aggregator = get_aggregator(opts.aggregator, **opts.aggregator_options)
    devices: list[FedDevice] = []
    for i, idx in enumerate(exp.parts):
        dev = FedDevice(device_id(i), exp, exp.train_set.subset(idx), seed=cfg.seed + i)
        dev.opts = opts
        exp.engine.register(dev)
        devices.append(dev)
    mem = exp.full_model_memory()
    for dev in devices:
        exp.sim.memory[dev.role_id] = mem
    glob = exp.trainer.new_state(cfg.seed, exp.initial_params())
    rounds = num_rounds(exp, opts)
    steps_per_round = (
        opts.local_steps if opts.local_epochs is None else max(d.local_steps() for d in devices)
    )

    start = 0
    if exp.resume is not None:
        glob = exp.resume["states"][SERVER]
        for dev in devices:
            dev.restore(exp.resume["states"][dev.role_id])
        aggregator.load_state_dict(exp.resume["extra"]["aggregator"])
        start = int(exp.resume["extra"]["round"])

    every = cfg.eval.every
    last_eval: dict[str, float] = {}
    rejected_total = 0  # uploads refused (non-finite or malformed): counted, never aggregated
    with exp.progress(rounds - start, f"fedavg {cfg.name}") as bar:
        for rnd in range(start + 1, rounds + 1):
            step = rnd * steps_per_round
            t0 = exp.sim.clock.free_at(SERVER)
            chosen = sample_devices(exp, opts, devices, rnd, t0)
            if not chosen:  # nobody online: the server waits and tries again
                exp.sim.charge(SERVER, 0.0, after=t0 + opts.idle_wait_s, label="idle")
                exp.log_record(
                    "round", step, SERVER, round=rnd, participants=0, reported=0, dropped=0
                )
                continue
            sent_before = len(exp.engine.transfers)
            round_started = time.perf_counter()
            updates, weights, losses, failed = [], [], [], []
            rejected: list[str] = []
            for dev in chosen:
                msg = Message(
                    "train",
                    SERVER,
                    dev.role_id,
                    exp.role_tensors(dev.role_id, state_tensors(glob)),
                    {"round": rnd, "schedule_step": (rnd - 1) * steps_per_round},
                )
                try:
                    rep = exp.engine.request(msg)
                except PeerUnavailable:
                    failed.append(dev.role_id)
                    continue
                updates.append((dev.role_id, rep))
            failed += shape_reports(exp, [r for r, _ in updates], t0, rnd)
            deadline = t0 + opts.deadline_s if opts.deadline_s is not None else None
            quorum = min(opts.quorum, len(chosen)) if opts.quorum is not None else None
            outcome = exp.sim.clock.round_end(
                [d.role_id for d in chosen], quorum=quorum, deadline=deadline, failed=failed
            )
            arrived = [m for r, m in updates if r in outcome.reported]
            good, rejected = screen_updates(
                exp, arrived, lambda r: exp.role_tensors(r, state_tensors(glob))
            )
            rejected_total += len(rejected)
            reported = [(m.sender, m) for m in good]
            for _, m in reported:
                weights.append(float(m.meta["examples"]) if opts.weighting == "examples" else 1.0)
                losses.append(m.meta["losses"])
            if len(reported) >= opts.min_reports:
                # In a domain stage each device sends only what it trains: average per tensor.
                combine = (
                    aggregator.aggregate if exp.domains is None else aggregator.aggregate_partial
                )
                new = combine(state_tensors(glob), [m.tensors for _, m in reported], weights)
                n_params = sum(v.numel() for v in new.values())
                exp.sim.charge(
                    SERVER,
                    3.0 * n_params * len(reported),
                    after=outcome.end_time,
                    label="aggregate",
                )
                with torch.no_grad():
                    for k, v in new.items():
                        glob.params[k].copy_(v)
            round_host_s = time.perf_counter() - round_started
            traffic = exp.engine.transfers[sent_before:]
            for j in range(max((len(ls) for ls in losses), default=0)):
                vals = [ls[j] for ls in losses if j < len(ls)]
                exp.log_record(
                    "train", (rnd - 1) * steps_per_round + j + 1, "mean", round=rnd, loss=mean(vals)
                )
            exp.log_record(
                "round",
                step,
                SERVER,
                round=rnd,
                participants=len(chosen),
                reported=len(reported),
                dropped=len(chosen) - len(reported) - len(rejected),
                rejected=len(rejected),
                bytes_up=sum(t.nbytes for t in traffic if t.receiver == SERVER),
                bytes_down=sum(t.nbytes for t in traffic if t.sender == SERVER),
                # Host seconds of the whole round vs. the devices' own training: the overhead
                # of the protocol (encoding, aggregation, bookkeeping) is the difference.
                round_host_s=round_host_s,
                device_train_host_s=sum(d.last_train_host_s for d in chosen),
            )
            if step // every > (step - steps_per_round) // every or rnd == rounds:
                last_eval = exp.evaluate_state(glob)
                exp.log_record("eval", step, SERVER, round=rnd, **last_eval)
            bar.update(1, **{k: v for k, v in last_eval.items() if k in ("accuracy", "perplexity")})
            states = {SERVER: glob, **{d.role_id: d.state for d in devices}}
            exp.maybe_checkpoint(
                step, states, {"round": rnd, "aggregator": aggregator.state_dict()}
            )
    if not last_eval:
        last_eval = exp.evaluate_state(glob)
    return ParadigmResult(
        states={SERVER: glob},
        final_eval=last_eval,
        extra={"rounds": rounds, "rejected_updates": rejected_total},
    )
