"""HierFedLoRA's roles: the device (``HierDevice``: trains only its group's top ``D_g`` blocks,
describes its data to the cloud, reports memory per depth) and the edge aggregator
(``EdgeAggregator``: runs its group's ``τ_g`` group rounds per cloud round); with what both
need to know about depth (which keys train, the loss through frozen lower blocks, FLOPs and
memory per depth).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from cotune.accel.quantize import stored_bytes
from cotune.aggregation import weighted_average
from cotune.config import RunConfig
from cotune.data import Batch
from cotune.flops import flop_counter
from cotune.models import Activations, segment_loss
from cotune.paradigms.base import (
    parse_options,
    reply,
    screen_updates,
)
from cotune.paradigms.federated import FedDevice
from cotune.paradigms.options import HierFedOptions
from cotune.peft import regularization_over
from cotune.runtime import Message, Role
from cotune.runtime.node import NodeContext, NodeModel
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
