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

import torch
from torch.utils.flop_counter import FlopCounterMode

from cotune.aggregation import weighted_average
from cotune.data import Batch
from cotune.errors import ConfigError, PeerUnavailable
from cotune.models import task_loss
from cotune.paradigms.base import (
    Experiment,
    LegacyTrainingRole,
    ParadigmResult,
    mean,
    parse_options,
    reply,
    screen_updates,
    state_tensors,
)
from cotune.paradigms.hierfed_plan import (
    GroupPlan,
    group_devices,
    group_divergence,
    label_histograms,
    plan_groups,
)
from cotune.paradigms.options import HierFedOptions
from cotune.runtime import Message, Role
from cotune.sim.costs import MemoryEstimate, estimate_memory, saved_activation_bytes
from cotune.sim.profiles import DeviceProfile, get_profile
from cotune.sim.simulation import SERVER, device_id
from cotune.train import StepResult, full_model_loss, train_step


def trained_keys(exp: Experiment, depth: int) -> list[str]:
    """Adapter tensors a depth-``depth`` group trains: those of the top blocks, plus the head."""
    anatomy = exp.loaded.anatomy
    low = anatomy.num_layers - depth
    return [k for k in exp.trainer.params if (i := anatomy.layer_of(k)) is None or i >= low]


def depth_loss(exp: Experiment, depth: int) -> Callable[[Batch], torch.Tensor]:
    """Task loss with backward stopping below the top ``depth`` blocks."""
    anatomy = exp.loaded.anatomy
    n = anatomy.num_layers
    if depth >= n:
        return full_model_loss(exp.forward, exp.task, exp.adapters.regularization_loss)
    frozen = anatomy.segment(0, n - depth, embed=True, head=False)
    top = anatomy.segment(n - depth, n, embed=False, head=True)
    # Only the trained blocks' regularizers: a frozen block's term would give it a gradient.
    reg_layers = [layer for path, layer in exp.adapters.layers.items() if top.owns(path)]

    def loss_fn(batch: Batch) -> torch.Tensor:
        with torch.no_grad():  # the frozen lower blocks: no graph, no saved activations
            acts = frozen(batch.input_ids, batch.attention_mask)
        loss = task_loss(top(acts), batch.labels, exp.task)
        regs = [r for layer in reg_layers if (r := layer.regularization_loss()) is not None]
        return loss + torch.stack(regs).sum() if regs else loss

    return loss_fn


class HierDevice(LegacyTrainingRole):
    """Trains the group adapter it is sent at its group's depth; returns the trained part."""

    opts: HierFedOptions
    depth: int
    keys: list[str]

    def set_depth(self, depth: int) -> None:
        self.depth = depth
        self.keys = trained_keys(self.exp, depth)
        self.loss_fn = depth_loss(self.exp, depth)

    def on_train(self, msg: Message) -> Message:
        rnd = int(msg.meta["round"])
        with torch.no_grad():
            for k, v in msg.tensors.items():
                self.state.params[k].copy_(v)
        if self.opts.optimizer_state == "reset":
            self.state.optim = {k: {} for k in self.state.params}
        self.state.step = int(msg.meta["schedule_step"])
        results = self._train(self.opts.local_steps, rnd)
        sim = self.exp.sim
        if not sim.online(self.role_id, rnd, sim.clock.free_at(self.role_id)):
            raise PeerUnavailable(f"{self.role_id} went offline in round {rnd} before uploading")
        up = {k: self.state.params[k].detach() for k in self.keys}
        return reply(
            msg,
            "update",
            up,
            round=rnd,
            examples=len(self.dataset),
            losses=[r.loss for r in results],
        )

    def _train(self, steps: int, rnd: int) -> list[StepResult]:
        # As TrainingRole.train_steps, but the FLOP counter's cache key names the depth: the
        # same batch shape costs less at a smaller depth.
        accum, sim, out = self.exp.cfg.train.grad_accum, self.exp.sim, []
        with self.exp.trainer.activate(self.state):
            for _ in range(steps):
                micro = [self.dataset.batch(self.sampler.next_indices()) for _ in range(accum)]
                r = train_step(
                    self.exp.trainer, self.state, self.loss_fn, micro,
                    counter=sim.flops, key=f"depth-{self.depth}",
                )  # fmt: skip
                sim.charge(self.role_id, r.flops, round=rnd, label="train")
                out.append(r)
        self.state.sampler = self.sampler.state_dict()
        return out


class EdgeAggregator(Role):
    """A group's aggregator: runs τ_g group rounds over its members per cloud round."""

    def __init__(
        self, role_id: str, exp: Experiment, members: list[HierDevice], plan: GroupPlan
    ) -> None:
        super().__init__(role_id)
        self.exp, self.members, self.plan = exp, members, plan
        self.keys = trained_keys(exp, plan.depth)
        self.reported = 0
        self.rejected = 0  # member uploads refused (non-finite or malformed), over the run

    def on_cloud_round(self, msg: Message) -> Message:
        exp, sim = self.exp, self.exp.sim
        opts: HierFedOptions = self.members[0].opts
        rnd, base = int(msg.meta["round"]), int(msg.meta["schedule_step"])
        # The edge can forward the cloud's adapter only once it has arrived.
        sim.charge(self.role_id, 0.0, after=sim.clock.last_arrival(self.role_id, SERVER))
        group = dict(msg.tensors)
        losses: dict[str, list[float]] = {d.role_id: [] for d in self.members}
        self.reported = 0
        for k in range(self.plan.tau):
            meta = {"round": rnd, "group": self.role_id, "group_round": k + 1,
                    "schedule_step": base + k * opts.local_steps}  # fmt: skip
            updates, failed = [], []
            for dev in self.members:
                try:
                    rep = exp.engine.request(
                        Message("train", self.role_id, dev.role_id, group, meta)
                    )
                except PeerUnavailable:
                    failed.append(dev.role_id)
                    continue
                updates.append(rep)
                losses[dev.role_id] += rep.meta["losses"]
            ids = [d.role_id for d in self.members]
            end = sim.clock.round_end(ids, failed=failed, server=self.role_id).end_time
            ref = {k: group[k] for k in self.keys}
            updates, rejected = screen_updates(exp, updates, lambda _, ref=ref: ref)
            self.rejected += len(rejected)
            if not updates:
                continue
            self.reported += len(updates)
            weights = [
                float(u.meta["examples"]) if opts.weighting == "examples" else 1.0 for u in updates
            ]
            avg = weighted_average([u.tensors for u in updates], weights)
            n_params = sum(v.numel() for v in avg.values())
            sim.charge(self.role_id, 3.0 * n_params * len(updates), after=end, label="aggregate")
            group.update(avg)
        examples = sum(len(d.dataset) for d in self.members)
        return reply(
            msg, "group_update", {k: group[k] for k in self.keys},
            round=rnd, examples=examples, reported=self.reported, losses=list(losses.values()),
        )  # fmt: skip


def step_flops(exp: Experiment) -> float:
    """Forward FLOPs of one full-model training micro-batch (counted once, no graph)."""
    cfg = exp.cfg
    ids = torch.ones(cfg.train.batch_size, cfg.model.max_length, dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as mode:
        exp.forward(ids, torch.ones_like(ids))
    return float(mode.get_total_flops())


def depth_memory(exp: Experiment, depth: int) -> MemoryEstimate:
    """Peak training memory of a device at ``depth``: only the top blocks save activations."""
    cfg = exp.cfg
    ids = torch.ones(cfg.train.batch_size, cfg.model.max_length, dtype=torch.long)
    labels = torch.zeros(len(ids), dtype=torch.long) if exp.task == "classification" else ids
    params = list(exp.loaded.model.parameters())
    model = exp.loaded.model
    was = model.training
    model.train()
    try:
        act = saved_activation_bytes(
            lambda: depth_loss(exp, depth)(Batch(ids, ids, labels)), params
        )
    finally:
        model.train(was)
    keys = set(trained_keys(exp, depth))
    trained = sum(p.numel() * p.element_size() for k, p in exp.trainer.params.items() if k in keys)
    total = sum(p.numel() * p.element_size() for p in params)
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


def edge_profile(opts: HierFedOptions) -> DeviceProfile:
    try:
        return get_profile(opts.edge_profile)
    except Exception as err:  # noqa: BLE001 - the profile registry's own message says why
        raise ConfigError(f"paradigm.options.edge_profile: {err}") from None


def make_plan(exp: Experiment, opts: HierFedOptions, edges: list[str]) -> list[GroupPlan]:
    n = exp.loaded.anatomy.num_layers
    depth = check_depths(exp, opts)
    labels = [e.group for e in exp.data.train]  # causal LM: its domains, if the data has them
    hists = label_histograms(exp.parts, labels)
    groups = group_devices(hists, opts.num_groups, opts.grouping, exp.cfg.seed)
    fwd = step_flops(exp) * exp.cfg.train.grad_accum
    numel = {k: p.numel() * 4 for k, p in exp.trainer.params.items()}  # fp32 bytes on the wire
    down = sum(numel.values())
    clock, profiles = exp.sim.clock, exp.sim.profiles

    def group_round_s(members: list[int], d: int) -> float:
        # Cost model: forward through all n blocks, backward (≈ 2× forward) through d of them.
        flops = opts.local_steps * fwd * (1.0 + 2.0 * d / n)
        up = sum(numel[k] for k in trained_keys(exp, d))
        edge = edges[groups.index(members)]
        return max(
            flops / profiles[device_id(i)].flops
            + clock.link_time(edge, device_id(i), down)
            + clock.link_time(device_id(i), edge, up)
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


def preflight(exp: Experiment) -> None:
    """Depths inside the model and a known edge profile (before any file is written)."""
    opts = parse_options(HierFedOptions, exp.cfg.paradigm.options)
    edge_profile(opts)
    check_depths(exp, opts)


def run(exp: Experiment) -> ParadigmResult:
    cfg = exp.cfg
    opts = parse_options(HierFedOptions, cfg.paradigm.options)
    edge_prof = edge_profile(opts)
    edges = [f"edge-{g}" for g in range(opts.num_groups)]
    for e in edges:  # edge aggregators are hubs: parallel links, one compute timeline
        if e not in exp.sim.clock.roles:  # a resumed clock has them already
            exp.sim.clock.add_role(e, edge_prof, hub=True)
        exp.sim.profiles[e] = edge_prof
    plans = make_plan(exp, opts, edges)
    devices: list[HierDevice] = []
    for i, idx in enumerate(exp.parts):
        dev = HierDevice(device_id(i), exp, exp.train_set.subset(idx), seed=cfg.seed + i)
        dev.opts = opts
        devices.append(dev)
        exp.engine.register(dev)
    aggregators = []
    for e, plan in zip(edges, plans):
        mem = depth_memory(exp, plan.depth)
        for i in plan.members:
            devices[i].set_depth(plan.depth)
            exp.sim.memory[devices[i].role_id] = mem
        agg = EdgeAggregator(e, exp, [devices[i] for i in plan.members], plan)
        exp.engine.register(agg)
        aggregators.append(agg)

    glob = exp.trainer.new_state(cfg.seed, exp.initial_params())
    spr = opts.local_steps * max(p.tau for p in plans)  # steps per cloud round (log axis)
    rounds = opts.rounds or math.ceil(cfg.train.steps / spr)
    start = 0
    if exp.resume is not None:
        glob = exp.resume["states"][SERVER]
        for dev in devices:
            dev.restore(exp.resume["states"][dev.role_id])
        start = int(exp.resume["extra"]["round"])

    last_eval: dict[str, float] = {}
    with exp.progress(rounds - start, f"hierfed {cfg.name}") as bar:
        for rnd in range(start + 1, rounds + 1):
            step = rnd * spr
            sent_before = len(exp.engine.transfers)
            started = time.perf_counter()
            meta = {"round": rnd, "schedule_step": (rnd - 1) * spr}
            replies = [
                exp.engine.request(
                    Message("cloud_round", SERVER, a.role_id, state_tensors(glob), meta)
                )
                for a in aggregators
            ]
            arrived = max(exp.sim.clock.last_arrival(SERVER, a.role_id) for a in aggregators)
            got = [r for r in replies if int(r.meta["reported"]) > 0]
            if got:
                new = cloud_aggregate(state_tensors(glob), got, opts.weighting)
                n_params = sum(sum(v.numel() for v in r.tensors.values()) for r in got)
                exp.sim.charge(SERVER, 3.0 * n_params, after=arrived, label="aggregate")
                with torch.no_grad():
                    for k, v in new.items():
                        glob.params[k].copy_(v)
            log_round(exp, rnd, step, spr, replies, aggregators, sent_before, started)
            if step // cfg.eval.every > (step - spr) // cfg.eval.every or rnd == rounds:
                last_eval = exp.evaluate_state(glob)
                exp.log_record("eval", step, SERVER, round=rnd, **last_eval)
            bar.update(1, **{k: v for k, v in last_eval.items() if k in ("accuracy", "perplexity")})
            states = {SERVER: glob, **{d.role_id: d.state for d in devices}}
            exp.maybe_checkpoint(step, states, {"round": rnd})
    if not last_eval:
        last_eval = exp.evaluate_state(glob)
    extra = {"rounds": rounds, "groups": [p.as_dict() for p in plans],
             "rejected_updates": sum(a.rejected for a in aggregators)}  # fmt: skip
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
    exp: Experiment, rnd: int, step: int, spr: int, replies: list[Message],
    aggregators: list[EdgeAggregator], sent_before: int, started: float,
) -> None:  # fmt: skip
    traffic = exp.engine.transfers[sent_before:]
    per_device = [ls for r in replies for ls in r.meta["losses"]]
    for j in range(max((len(ls) for ls in per_device), default=0)):
        vals = [ls[j] for ls in per_device if j < len(ls)]
        exp.log_record("train", (rnd - 1) * spr + j + 1, "mean", round=rnd, loss=mean(vals))
    for a, r in zip(aggregators, replies):
        exp.log_record(
            "group", step, a.role_id, round=rnd, tau=a.plan.tau, depth=a.plan.depth,
            reported=int(r.meta["reported"]), loss=mean([v for ls in r.meta["losses"] for v in ls]),
        )  # fmt: skip
    participants = sum(len(a.members) * a.plan.tau for a in aggregators)
    reported = sum(int(r.meta["reported"]) for r in replies)
    exp.log_record(
        "round", step, SERVER, round=rnd, participants=participants, reported=reported,
        dropped=participants - reported,
        bytes_up=sum(t.nbytes for t in traffic if t.sender.startswith("device-") or t.receiver == SERVER),
        bytes_down=sum(t.nbytes for t in traffic if t.receiver.startswith("device-") or t.sender == SERVER),
        round_host_s=time.perf_counter() - started,
    )  # fmt: skip
