"""Asynchronous federated fine-tuning: FedAsync (Xie, Koyejo, Gupta 2019) and FedBuff (Nguyen
et al., AISTATS 2022). No rounds: ``concurrency`` devices train at once, each report is taken
in the order it reaches the server on the simulated clock, and the reporting device starts its
next task at once with the global adapter of that moment — so slow phones no longer hold back
every round. A report's staleness t is how many global versions went by while it trained; its
weight is s(t) (``staleness``: polynomial (t+1)^-a, constant, or hinge).

- ``fedasync``: every report is mixed in: w ← (1 − α·s(t))·w + α·s(t)·wᵢ (one version each).
- ``fedbuff``: each report's change Δᵢ = wᵢ − (the global it started from) waits in a buffer;
  every ``buffer_size`` reports, w ← w + η·mean(s(tᵢ)·Δᵢ) (one version per buffer).

On the Grid: one ``train`` request per task (``grid.submit``), the replies' simulated
``arrival`` order the work; records carry the arrival they describe as their time. Each
report is logged (``update`` records: staleness, version); each new version as a ``round``.
Resume: from a checkpoint's global adapter, version and buffer; tasks in flight at the
checkpoint are dispatched again from that adapter (not bit-identical to an uninterrupted run).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from cotune.paradigms.base import (
    Experiment,
    ParadigmResult,
    mean,
    state_tensors,
    update_problem,
)
from cotune.paradigms.federated import FedDevice, RoundTraffic
from cotune.paradigms.options import AsyncOptions, FedAsyncOptions, FedBuffOptions, parse_options
from cotune.runtime import Message
from cotune.runtime.ids import SERVER

log = logging.getLogger(__name__)


class FedAsyncDevice(FedDevice):
    options_model = FedAsyncOptions


class FedBuffDevice(FedDevice):
    options_model = FedBuffOptions


def staleness_weight(opts: AsyncOptions, t: int) -> float:
    if opts.staleness == "constant":
        return 1.0
    if opts.staleness == "hinge":
        return (
            1.0
            if t <= opts.staleness_b
            else 1.0 / (opts.staleness_a * (t - opts.staleness_b) + 1.0)
        )
    return (t + 1.0) ** -opts.staleness_a


def run_async(exp: Experiment, kind: str) -> ParadigmResult:
    cfg, grid = exp.cfg, exp.grid
    opts: Any = parse_options(FedAsyncOptions if kind == "fedasync" else FedBuffOptions,
                              cfg.paradigm.options)  # fmt: skip
    devices = grid.node_ids("device-")
    for d in devices:
        grid.start(d, FedAsyncDevice if kind == "fedasync" else FedBuffDevice)
    glob = exp.trainer.new_state(cfg.seed, exp.initial_params())
    m = min(opts.concurrency or len(devices), len(devices))
    total = opts.updates or len(devices) * math.ceil(cfg.train.steps / opts.local_steps)
    rng = np.random.default_rng([cfg.seed, 0xA5])
    active = sorted(rng.choice(len(devices), size=m, replace=False).tolist())
    version, processed, dropped_stale, failed = 0, 0, 0, 0
    buffer: list[tuple[dict[str, torch.Tensor], float]] = []
    if exp.resume is not None:
        glob = exp.resume["states"][SERVER]
        ex = exp.resume["extra"]
        version, processed = int(ex["version"]), int(ex["processed"])
        buffer = [(b, float(w)) for b, w in ex.get("buffer", [])]

    def step_of(n: int) -> int:  # a device's equivalent steps after n reports
        return n * opts.local_steps // m

    in_flight: dict[str, tuple[Any, int, dict[str, torch.Tensor]]] = {}

    def dispatch(d: str) -> None:
        tensors = exp.role_tensors(d, state_tensors(glob))
        meta = {"round": version + 1, "schedule_step": step_of(processed)}
        fut = grid.submit(Message("train", SERVER, d, tensors, meta), round=version + 1)
        start = {k: v.clone() for k, v in tensors.items()} if kind == "fedbuff" else {}
        in_flight[d] = (fut, version, start)

    for i in active[: max(0, min(m, total - processed))]:
        dispatch(devices[i])
    idle = [d for d in devices if d not in in_flight]
    traffic = RoundTraffic(grid)
    points = set(exp.eval_points())
    last_eval: dict[str, float] = {}
    losses: list[float] = []
    with exp.progress(total - processed, f"{kind} {cfg.name}", unit="report") as bar:
        while processed < total and in_flight:
            d = min(in_flight, key=lambda r: (_arrival(in_flight[r][0]), r))
            fut, started, start = in_flight.pop(d)
            rep = fut.result()
            processed += 1
            at = rep.arrival
            msg = rep.message
            problem = "failed: " + str(rep.error) if not rep.ok or msg is None else update_problem(
                msg, exp.role_tensors(d, state_tensors(glob)))  # fmt: skip
            tau = version - started
            if problem is None and opts.max_staleness is not None and tau > opts.max_staleness:
                problem, dropped_stale = (
                    f"staleness {tau} > {opts.max_staleness}",
                    dropped_stale + 1,
                )
            if problem is not None:
                failed += problem.startswith("failed")
                log.warning("%s: report of %s not taken (%s)", kind, d, problem)
                nxt = d
                if not rep.ok and idle:  # a device that dropped out: another takes its place
                    nxt = idle.pop(int(rng.integers(len(idle))))
                    idle.append(d)
                if processed + len(in_flight) < total:
                    dispatch(nxt)
                continue
            assert msg is not None
            s = staleness_weight(opts, tau)
            n_ex = float(msg.meta["examples"]) if opts.weighting == "examples" else 1.0
            losses.extend(x for x in msg.meta["losses"][-1:] if x is not None)
            exp.log_record("update", step_of(processed), d, staleness=tau, version=version,
                           weight=s, sim_time_s=at)  # fmt: skip
            new_version = _apply(kind, opts, glob, msg.tensors, start, s, n_ex, buffer)
            n_params = sum(v.numel() for v in msg.tensors.values())
            exp.meter.compute(3.0 * n_params, after=at, label="aggregate")
            if new_version:
                version += 1
                exp.log_record("round", step_of(processed), SERVER, round=version,
                               reports=processed, train_loss=mean(losses[-m:]),
                               sim_time_s=at, **traffic.record([d]))  # fmt: skip
                traffic = RoundTraffic(grid)
            step = step_of(processed)
            if any(step_of(processed - 1) < p <= step for p in points) or processed == total:
                last_eval = exp.evaluate_state(glob)
                exp.log_record("eval", step, SERVER, round=version, sim_time_s=at, **last_eval)
            bar.update(1, train_loss=losses[-1] if losses else None)
            exp.maybe_checkpoint(
                step,
                lambda: {SERVER: glob},
                {"version": version, "processed": processed,
                 "buffer": [(b, w) for b, w in buffer]},
            )  # fmt: skip
            if processed + len(in_flight) < total:
                dispatch(d)
    if not last_eval:
        last_eval = exp.evaluate_state(glob)
    return ParadigmResult(
        states={SERVER: glob},
        final_eval=last_eval,
        extra={"versions": version, "reports": processed, "stale_dropped": dropped_stale,
               "failed_reports": failed, "concurrency": m},
    )  # fmt: skip


def _arrival(fut: Any) -> float:
    """When a task's report reached the server (a failed one: when it was given up on)."""
    rep = fut.result()
    if rep.arrival is not None:
        return float(rep.arrival)
    return float(fut.submitted_at or 0.0)


def _apply(kind, opts, glob, report, start, s, weight, buffer) -> bool:
    """Take one report into the global adapter; True when that made a new version."""
    with torch.no_grad():
        if kind == "fedasync":
            a = opts.alpha * s
            for k, v in report.items():
                p = glob.params[k]
                p.mul_(1.0 - a).add_(v.to(p.dtype), alpha=a)
            return True
        delta = {k: (v.float() - start[k].float()) * s for k, v in report.items()}
        buffer.append((delta, weight))
        if len(buffer) < opts.buffer_size:
            return False
        total = sum(w for _, w in buffer)
        for k in delta:
            mean_delta = sum(w * b[k] for b, w in buffer) / total
            glob.params[k].add_(mean_delta.to(glob.params[k].dtype), alpha=opts.server_lr)
        buffer.clear()
        return True


def run(exp: Experiment) -> ParadigmResult:
    return run_async(exp, "fedasync")
