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
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from cotune.accel.quantize import stored_bytes
from cotune.aggregation import weighted_average
from cotune.config import RunConfig
from cotune.data import Batch
from cotune.errors import ConfigError, ProtocolError
from cotune.flops import flop_counter
from cotune.models import Activations, segment_loss
from cotune.paradigms.base import (
    Experiment,
    ParadigmResult,
    mean,
    parse_options,
    reply,
    screen_updates,
    state_tensors,
)
from cotune.paradigms.federated import FedDevice
from cotune.paradigms.hierfed_plan import (
    GroupPlan,
    group_devices,
    group_divergence,
    plan_groups,
)
from cotune.paradigms.options import HierFedOptions
from cotune.peft import regularization_over
from cotune.progress import eval_fields
from cotune.runtime import Message, Role
from cotune.runtime.ids import SERVER
from cotune.runtime.node import NodeContext, NodeModel
from cotune.runtime.validate import meta_number
from cotune.train import full_model_loss
from cotune.train.memory import (
    MemoryEstimate,
    estimate_memory,
    model_param_bytes,
    probe_ids,
    saved_activation_bytes,
)


def trained_keys(model: NodeModel, depth: int) -> list[str]:
    """Adapter tensors a depth-``depth`` group trains: those of the top blocks, plus the head."""
    anatomy = model.loaded.anatomy
    low = anatomy.num_layers - depth
    return [k for k in model.trainer.params if (i := anatomy.layer_of(k)) is None or i >= low]


def depth_loss(model: NodeModel, task: str, depth: int) -> Callable[[Batch], torch.Tensor]:
    """Task loss with backward stopping below the top ``depth`` blocks."""
    anatomy = model.loaded.anatomy
    n = anatomy.num_layers
    if depth >= n:
        return full_model_loss(model.forward, task, model.adapters.regularization_loss)
    frozen = anatomy.segment(0, n - depth, embed=True, head=False)
    top = anatomy.segment(n - depth, n, embed=False, head=True)
    # Only the trained blocks' regularizers: a frozen block's term would give it a gradient.
    reg_layers = [layer for path, layer in model.adapters.layers.items() if top.owns(path)]

    def loss_fn(batch: Batch) -> torch.Tensor:
        with torch.no_grad():  # the frozen lower blocks: no graph, no saved activations
            acts = frozen(batch.input_ids, batch.attention_mask)
        loss = segment_loss(top, acts, None, batch.labels, task)
        reg = regularization_over(reg_layers)
        return loss + reg if reg is not None else loss

    return loss_fn


class HierDevice(FedDevice):
    """A federated device that trains the group adapter at the depth it is told and returns
    only the part it trained."""

    options_model = HierFedOptions
    release_between_rounds = False  # a depth change may send a different part

    def __init__(self, ctx: NodeContext) -> None:
        self.depth: int | None = None
        self.keys: list[str] = []
        super().__init__(ctx)

    def report_memory(self) -> None:  # reported per depth, once the device knows its depth
        return None

    def on_describe(self, msg: Message) -> Message:
        """What the cloud plans groups from: the size and label (or domain) mix of the data."""
        assert self.dataset is not None
        groups = self.ctx.groups
        counts = None
        if groups and all(g is not None for g in groups):
            counts = {str(g): int(n) for g, n in zip(*np.unique(groups, return_counts=True))}
        return reply(msg, "description", examples=len(self.dataset), groups=counts)

    def prepare(self, msg: Message) -> None:
        depth = int(msg.meta["depth"])
        if depth == self.depth:
            return
        model, cfg = self.ctx.model, self.ctx.cfg
        self.depth = depth
        self.keys = trained_keys(model, depth)
        self.loss_fn = depth_loss(model, self.ctx.task, depth)
        self.ctx.meter.memory(f"depth-{depth}", lambda: depth_memory(model, cfg, depth))

    def flop_key(self) -> str | None:
        # The same batch shape costs less at a smaller depth: one key per depth.
        return f"depth-{self.depth}"

    def upload(self) -> dict[str, torch.Tensor]:
        return {k: self.state.params[k].detach() for k in self.keys}

    # --- a group's members as one cohort (paradigm.options.cohort; fed_cohort.py) ----------
    @classmethod
    def can_batch_train(cls, devices: list[FedDevice]) -> bool:
        # FedProx here trains the whole model (``FedDevice._proximal``): one by one.
        return all(d.prox_mu == 0 for d in devices) and super().can_batch_train(devices)

    @staticmethod
    def one_cohort(msgs: list[Message]) -> bool:
        return len({int(m.meta["depth"]) for m in msgs}) == 1

    def cohort_plan(self) -> Any:
        """Below the trained blocks without a graph, the top blocks with one."""
        from cotune.paradigms.fed_cohort import CohortPlan, model_plan

        model = self.ctx.model
        anatomy, depth = model.loaded.anatomy, int(self.depth or 0)
        n = anatomy.num_layers
        if not 0 < depth < n:  # the whole model (or not told its depth yet)
            return model_plan(model)
        frozen = anatomy.segment(0, n - depth, embed=True, head=False)
        top = anatomy.segment(n - depth, n, embed=False, head=True)
        top_body = anatomy.segment(n - depth, n, embed=False, head=False)

        def below(ids: torch.Tensor, mask: torch.Tensor) -> Activations:
            with torch.no_grad():
                return frozen(ids, mask)

        return CohortPlan(
            trainer=model.trainer, layers=model.adapters.layers, root=model.loaded.model,
            forward=lambda ids, mask: top(below(ids, mask)),
            body=lambda ids, mask: top_body(below(ids, mask)),
            head=anatomy.segment(n, n, embed=False, head=True),
        )  # fmt: skip

    def cohort_penalty(self, leaves: dict[str, torch.Tensor], plan: Any) -> list[torch.Tensor]:
        """The trained blocks' regularizers only, as ``depth_loss`` adds them."""
        from cotune.peft.grouped import bind_state

        model = self.ctx.model
        if not model.adapters.has_regularizer:  # no term can come: nothing to bind
            return []
        anatomy, depth = model.loaded.anatomy, int(self.depth or 0)
        n = anatomy.num_layers
        with bind_state(plan.layers, leaves):
            if not 0 < depth < n:
                reg = model.adapters.regularization_loss()
                return [] if reg is None else [reg]
            top = anatomy.segment(n - depth, n, embed=False, head=True)
            layers = [layer for path, layer in model.adapters.layers.items() if top.owns(path)]
            reg = regularization_over(layers)
            return [] if reg is None else [reg]


class EdgeAggregator(Role):
    """A group's aggregator: runs τ_g group rounds over its members per cloud round.

    The cloud tells it its plan (``configure``); it asks its members itself, through its own
    grid handle (nested requests), and uploads only the tensors its group trains.
    """

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx.node_id)
        self.ctx = ctx
        self.opts = parse_options(HierFedOptions, ctx.cfg.paradigm.options)
        self.plan: dict[str, Any] = {}
        self.rejected = 0  # member uploads refused (non-finite or malformed), over the run

    def on_configure(self, msg: Message) -> None:
        self.plan = dict(msg.meta)

    def snapshot(self) -> dict[str, Any]:
        return {"plan": self.plan, "rejected": self.rejected}

    def restore(self, state: dict[str, Any]) -> None:
        self.plan, self.rejected = dict(state["plan"]), int(state["rejected"])

    def on_cloud_round(self, msg: Message) -> Message:
        grid, meter, plan = self.ctx.grid, self.ctx.meter, self.plan
        assert grid is not None and plan, f"{self.role_id} was not configured"
        rnd, base = int(msg.meta["round"]), int(msg.meta["schedule_step"])
        meter.compute(0.0, waits_for=msg.sender)  # it forwards the adapter once it has it
        group = dict(msg.tensors)
        members, keys = list(plan["members"]), list(plan["keys"])
        losses: dict[str, list[float]] = {d: [] for d in members}
        reported = 0
        for k in range(int(plan["tau"])):
            meta = {"round": rnd, "group": self.role_id, "group_round": k + 1,
                    "schedule_step": base + k * self.opts.local_steps, "depth": plan["depth"]}  # fmt: skip
            futures = grid.submit_many(  # together: members on one host may run as a cohort
                [Message("train", self.role_id, d, group, meta) for d in members], round=rnd
            )
            done = grid.gather(futures)
            arrived = [r.message for r in done.ok if r.message is not None]
            for m in arrived:
                losses[m.sender] += m.meta["losses"]
            ref = {k: group[k] for k in keys}
            updates, rejected = screen_updates(arrived, lambda _, ref=ref: ref)
            self.rejected += len(rejected)
            if not updates:
                continue
            reported += len(updates)
            weights = [
                float(u.meta["examples"]) if self.opts.weighting == "examples" else 1.0
                for u in updates
            ]
            avg = weighted_average([u.tensors for u in updates], weights)
            n_params = sum(v.numel() for v in avg.values())
            meter.compute(3.0 * n_params * len(updates), after=done.closed_at, label="aggregate")
            group.update(avg)
        return reply(
            msg, "group_update", {k: group[k] for k in keys},
            round=rnd, examples=int(plan["examples"]), reported=reported,
            losses=list(losses.values()),
        )  # fmt: skip


def step_flops(model: NodeModel, cfg: RunConfig) -> float:
    """Forward FLOPs of one full-model training micro-batch (counted once, no graph)."""
    ids = probe_ids(cfg, model.loaded.model)
    with torch.no_grad(), flop_counter() as mode:
        model.forward(ids, torch.ones_like(ids))
    return float(mode.get_total_flops())


def depth_memory(model: NodeModel, cfg: RunConfig, depth: int) -> MemoryEstimate:
    """Peak training memory of a device at ``depth``: only the top blocks save activations."""
    task = cfg.model.task
    ids = probe_ids(cfg, model.loaded.model)
    labels = (
        torch.zeros(len(ids), dtype=torch.long, device=ids.device)
        if task == "classification"
        else ids
    )
    net = model.loaded.model
    params = list(net.parameters())
    was = net.training
    net.train()
    try:
        act = saved_activation_bytes(
            lambda: depth_loss(model, task, depth)(Batch(ids, ids, labels)), params
        )
    finally:
        net.train(was)
    keys = set(trained_keys(model, depth))
    trained = sum(stored_bytes(p) for k, p in model.trainer.params.items() if k in keys)
    total = sum(model_param_bytes(net))
    return estimate_memory(
        frozen_bytes=total - trained, trainable_bytes=trained, activation_bytes=act
    )


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
        and isinstance(n, int) and not isinstance(n, bool) and n >= 0
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
