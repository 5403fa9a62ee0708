"""HierFedLoRA (arXiv 2503.21213): devices → group (edge) aggregators → cloud.

Devices are split into near-IID groups from their label histograms (``hierfed_plan``). In each
cloud round the cloud sends the global adapter to every edge aggregator; group ``g`` runs
``τ_g`` group rounds (each member trains ``local_steps`` steps, the edge averages) and uploads
its adapter. Group ``g`` trains only the adapters of its top ``D_g`` blocks (and the head): the
lower blocks run forward under ``torch.no_grad()``, so backward, FLOPs, activation memory and the
upload all shrink. The cloud averages each tensor over the groups that trained it; the others
keep the global value. A controller picks (τ_g, D_g) to balance the groups' round times.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from cotune.aggregation import weighted_average
from cotune.errors import ConfigError, ProtocolError
from cotune.jsonsafe import is_count
from cotune.paradigms.base import (
    Experiment,
    ParadigmResult,
    mean,
    parse_options,
    state_tensors,
)
from cotune.paradigms.hierfed_plan import (
    GroupPlan,
    group_devices,
    group_divergence,
    plan_groups,
)
from cotune.paradigms.hierfed_roles import (
    EdgeAggregator,
    HierDevice,
    step_flops,
    trained_keys,
)
from cotune.paradigms.options import HierFedOptions
from cotune.progress import eval_fields
from cotune.runtime import Message
from cotune.runtime.ids import SERVER
from cotune.runtime.validate import meta_number


def check_depths(exp: Experiment, opts: HierFedOptions) -> int:
    """The deepest depth a group may train; ConfigError when the options exceed the model."""
    n = exp.loaded.anatomy.num_layers
    depth = opts.depth if opts.depth is not None else n
    for name, value in (("depth", depth), ("min_depth", opts.min_depth)):
        if value > n:
            raise ConfigError(
                f"paradigm.options.{name}: {value} exceeds the model's {n} blocks (use 1..{n})"
            )
    if opts.controller == "balanced" and opts.min_depth > depth:
        raise ConfigError(f"paradigm.options.min_depth: {opts.min_depth} > depth {depth}")
    return depth


def make_plan(
    exp: Experiment, opts: HierFedOptions, devices: list[str], edges: list[str],
    described: list[Message],
) -> list[GroupPlan]:  # fmt: skip
    """Groups and (τ_g, D_g) from what the nodes declared (speed, links) and what the devices
    described (data size and label mix): the cloud knows nothing else about them."""
    n = exp.loaded.anatomy.num_layers
    depth = check_depths(exp, opts)
    hists = histograms(described, len(exp.data.group_names or []))
    groups = group_devices(hists, opts.num_groups, opts.grouping, exp.cfg.seed)
    model = exp.model
    fwd = step_flops(model, exp.cfg) * exp.cfg.train.grad_accum
    numel = {k: p.numel() * 4 for k, p in exp.trainer.params.items()}  # fp32 bytes on the wire
    down = sum(numel.values())
    info = {r: exp.grid.node_info(r) for r in [*devices, *edges]}

    def link_s(src: str, dst: str, nbytes: int) -> float:
        s, d = info[src], info[dst]
        return s["latency_s"] + d["latency_s"] + nbytes / min(s["up_bps"], d["down_bps"])

    def group_round_s(members: list[int], d: int) -> float:
        # Cost model: forward through all n blocks, backward (≈ 2× forward) through d of them.
        flops = opts.local_steps * fwd * (1.0 + 2.0 * d / n)
        up = sum(numel[k] for k in trained_keys(model, d))
        edge = edges[groups.index(members)]
        return max(
            flops / info[devices[i]]["flops"]
            + link_s(edge, devices[i], down)
            + link_s(devices[i], edge, up)
            for i in members
        )

    tau = opts.tau if opts.tau is not None else (1 if opts.controller == "fixed" else 4)
    plans = plan_groups(
        groups, group_round_s, controller=opts.controller, tau=tau, depth=depth,
        min_depth=opts.min_depth,
    )  # fmt: skip
    for p, dv in zip(plans, group_divergence(groups, hists)):
        p.divergence = dv
    return plans


def histograms(described: list[Message], classes: int) -> np.ndarray:
    """``[devices, classes]`` label (or domain) counts as the devices described them; data
    without labels or domains is one class. A description is a peer's word: its size must be
    a positive number and its counts non-negative integers of the run's ``classes`` labels or
    domains (a class id of 10⁹ would have the server allocate a row that wide), else a
    ``ProtocolError`` names the device and the field."""
    for m in described:
        _check_description(m, classes)
    counts = [m.meta["groups"] for m in described]
    if any(c is None for c in counts):
        return np.array([[float(m.meta["examples"])] for m in described], dtype=np.float64)
    classes = 1 + max((int(g) for c in counts for g in c), default=0)
    out = np.zeros((len(counts), classes), dtype=np.float64)
    for row, c in zip(out, counts):
        for g, k in c.items():
            row[int(g)] = float(k)
    return out


def _check_description(m: Message, classes: int) -> None:
    if meta_number(m, "examples") <= 0:
        raise ProtocolError(f"{m.describe()}: meta 'examples' must be positive")
    groups = m.meta.get("groups")
    if groups is None:
        return
    ok = isinstance(groups, dict) and all(
        isinstance(g, str) and g.isdigit() and int(g) < classes
        and is_count(n)
        for g, n in groups.items()
    )  # fmt: skip
    if not ok:
        raise ProtocolError(
            f"{m.describe()}: meta 'groups' must map ids of the run's {classes} labels or "
            f"domains to example counts, got {str(groups)[:80]}"
        )


def preflight(exp: Experiment) -> None:
    """Depths inside the model (before any file is written; the edge profile is checked with
    the run's nodes)."""
    check_depths(exp, parse_options(HierFedOptions, exp.cfg.paradigm.options))


def run(exp: Experiment) -> ParadigmResult:
    cfg, grid = exp.cfg, exp.grid
    opts = parse_options(HierFedOptions, cfg.paradigm.options)
    devices, edges = grid.node_ids("device-"), grid.node_ids("edge-")
    for d in devices:
        grid.start(d, HierDevice)
    for e in edges:
        grid.start(e, EdgeAggregator)
    if exp.resume is None:
        described = grid.request_many(
            [Message("describe", SERVER, d, {}, {}) for d in devices], together=True
        )
        plans = make_plan(exp, opts, devices, edges, described)
        for e, plan in zip(edges, plans):
            members = [devices[i] for i in plan.members]
            meta = {"members": members, "tau": plan.tau, "depth": plan.depth,
                    "keys": trained_keys(exp.model, plan.depth),
                    "examples": sum(int(grid.node_info(d)["examples"]) for d in members)}  # fmt: skip
            grid.send(Message("configure", SERVER, e, {}, meta))
    else:  # planned and configured before the checkpoint: the edges get their state back
        plans = [GroupPlan(**p) for p in exp.resume["extra"]["plans"]]
        for e in edges:
            grid.restore(e, exp.resume["extra"]["edges"][e])

    glob = exp.trainer.new_state(cfg.seed, exp.initial_params())
    spr = opts.local_steps * max(p.tau for p in plans)  # steps per cloud round (log axis)
    rounds = opts.rounds or math.ceil(cfg.train.steps / spr)
    start = 0
    if exp.resume is not None:
        glob = exp.resume["states"][SERVER]
        for d in devices:
            grid.restore(d, exp.resume["states"].get(d))
        start = int(exp.resume["extra"]["round"])

    last_eval: dict[str, float] = {}
    with exp.progress(rounds - start, f"hierfed {cfg.name}", unit="round") as bar:
        for rnd in range(start + 1, rounds + 1):
            step = rnd * spr
            sent_before = len(grid.transfers)
            started = time.perf_counter()
            meta = {"round": rnd, "schedule_step": (rnd - 1) * spr}
            answers = [
                grid.submit(Message("cloud_round", SERVER, e, state_tensors(glob), meta)).result()
                for e in edges
            ]
            replies = [a.message for a in answers if a.message is not None]
            got = [r for r in replies if int(r.meta["reported"]) > 0]
            if got:
                new = cloud_aggregate(state_tensors(glob), got, opts.weighting)
                n_params = sum(sum(v.numel() for v in r.tensors.values()) for r in got)
                arrived = max(a.arrival or 0.0 for a in answers)
                exp.meter.compute(3.0 * n_params, after=arrived, label="aggregate")
                with torch.no_grad():
                    for k, v in new.items():
                        glob.params[k].copy_(v)
            log_round(exp, rnd, step, spr, replies, edges, plans, sent_before, started)
            if step // cfg.eval.every > (step - spr) // cfg.eval.every or rnd == rounds:
                last_eval = exp.evaluate_state(glob)
                exp.log_record("eval", step, SERVER, round=rnd, **last_eval)
            bar.update(1, **eval_fields(last_eval))
            exp.maybe_checkpoint(
                step,
                lambda: {SERVER: glob, **grid.snapshots(devices)},
                lambda rnd=rnd: {"round": rnd, "plans": [vars(p) for p in plans],
                         "edges": {e: grid.snapshot(e) for e in edges}},
            )  # fmt: skip
    if not last_eval:
        last_eval = exp.evaluate_state(glob)
    rejected = sum(int(grid.snapshot(e)["rejected"]) for e in edges)
    extra = {"rounds": rounds, "groups": [p.as_dict() for p in plans],
             "rejected_updates": rejected}  # fmt: skip
    return ParadigmResult(states={SERVER: glob}, final_eval=last_eval, extra=extra)


def cloud_aggregate(
    glob: dict[str, torch.Tensor], replies: list[Message], weighting: str
) -> dict[str, torch.Tensor]:
    """Each tensor: the weighted mean over the groups that trained it; others stay global."""
    out = dict(glob)
    for k in glob:
        have = [r for r in replies if k in r.tensors]
        if have:
            w = [float(r.meta["examples"]) if weighting == "examples" else 1.0 for r in have]
            out[k] = weighted_average([{k: r.tensors[k]} for r in have], w)[k]
    return out


def log_round(
    exp: Experiment, rnd: int, step: int, spr: int, replies: list[Message], edges: list[str],
    plans: list[GroupPlan], sent_before: int, started: float,
) -> None:  # fmt: skip
    traffic = exp.grid.transfers[sent_before:]
    per_device = [ls for r in replies for ls in r.meta["losses"]]
    for j in range(max((len(ls) for ls in per_device), default=0)):
        vals = [ls[j] for ls in per_device if j < len(ls)]
        exp.log_record("train", (rnd - 1) * spr + j + 1, "mean", round=rnd, loss=mean(vals))
    for e, plan, r in zip(edges, plans, replies):
        exp.log_record(
            "group", step, e, round=rnd, tau=plan.tau, depth=plan.depth,
            reported=int(r.meta["reported"]), loss=mean([v for ls in r.meta["losses"] for v in ls]),
        )  # fmt: skip
    participants = sum(len(p.members) * p.tau for p in plans)
    reported = sum(int(r.meta["reported"]) for r in replies)
    exp.log_record(
        "round", step, SERVER, round=rnd, participants=participants, reported=reported,
        dropped=participants - reported,
        bytes_up=sum(t.nbytes for t in traffic if t.sender.startswith("device-") or t.receiver == SERVER),
        bytes_down=sum(t.nbytes for t in traffic if t.receiver.startswith("device-") or t.sender == SERVER),
        round_host_s=time.perf_counter() - started,
    )  # fmt: skip
