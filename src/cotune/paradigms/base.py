"""What every paradigm shares: roles that train, the result, update screening, small helpers.

A paradigm is a driver function ``run(exp) -> ParadigmResult`` written like a server app: it
starts roles on their nodes through ``exp.grid`` and talks to them only through ``Message``s.
Measurement (evaluation on the held-out set) is the experimenter's privilege: it reads a role's
state through the grid's snapshot channel and is never counted as traffic. The ``Experiment``
(the run's context, ``cotune.experiment``) is re-exported here for the drivers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from pydantic import BaseModel

from cotune.config import RunConfig
from cotune.data import Batch, BatchSampler, EncodedDataset
from cotune.errors import DivergenceError
from cotune.experiment import Experiment  # noqa: F401 - re-exported for the drivers
from cotune.paradigms.options import parse_options  # noqa: F401 - re-exported for the drivers
from cotune.peft.domains import route_domains
from cotune.runtime import Message, Role
from cotune.runtime.node import NodeContext, NodeModel
from cotune.runtime.validate import all_finite
from cotune.train import RoleState, StepResult, full_model_loss, train_step
from cotune.train.loop import LossFn
from cotune.train.memory import MemoryEstimate, MemoryProbe, probe_ids

T = TypeVar("T", bound=BaseModel)
log = logging.getLogger(__name__)


@dataclass
class ParadigmResult:
    """The final state of each role whose adapter is the run's product (one for central, many for local)."""

    states: dict[str, RoleState]
    final_eval: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)


class TrainingRole(Role):
    """A role that trains its node's model on its node's data with its own ``RoleState``.

    Built on its node from a ``NodeContext`` (``TrainingRole(ctx)``): the model, data, seed and
    meter are the node's own. Its state is read for measurement through ``snapshot``.
    """

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx.node_id)
        self.ctx = ctx
        self.seed = ctx.seed
        model = ctx.model
        self.state = model.trainer.new_state(ctx.seed, model.initial_params())
        self.sampler: BatchSampler | None = None
        self.dataset: EncodedDataset | None = None
        self.loss_fn = full_model_loss(model.forward, ctx.task, model.adapters.regularization_loss)
        # Per-example domain experts (MoDULA's domain stage); None: no domain routing.
        self.example_domains: list[int] | None = None
        if ctx.data is not None:
            domains = None
            if ctx.domains is not None:
                domains = ctx.domains.example_experts(self.role_id, len(ctx.data))
            self.set_dataset(ctx.data, domains)

    def set_dataset(self, dataset: EncodedDataset, domains: list[int] | None = None) -> None:
        self.dataset = dataset
        self.example_domains = domains
        self.sampler = BatchSampler(len(dataset), self.ctx.cfg.train.batch_size, self.seed)

    def probe_memory(self) -> None:
        """Report the peak training memory of this node holding the whole model."""
        model, cfg = self.ctx.model, self.ctx.cfg
        self.ctx.meter.memory("full", lambda: full_model_memory(model, cfg))

    def _loss_for(self, micro_indices: list[list[int]]) -> LossFn:
        """The loss for one step's micro-batches, routing each example to its domain expert."""
        if self.example_domains is None:
            return self.loss_fn
        doms = self.example_domains
        routes = iter([[doms[j] for j in idx] for idx in micro_indices])
        adapters, inner = self.ctx.model.adapters, self.loss_fn

        def loss_fn(batch: Batch) -> torch.Tensor:  # called once per micro-batch, in order
            with route_domains(adapters, next(routes)):
                return inner(batch)

        return loss_fn

    def train_steps(
        self,
        steps: int,
        *,
        round: int = 0,
        key: str | None = None,
        on_step: Callable[[StepResult], None] | None = None,
    ) -> list[StepResult]:
        """Train ``steps`` optimizer steps; each step's counted FLOPs go to this node's meter
        (``key``: the FLOP counter's cache key, default the model's whole-step key); ``on_step``
        hears of each step as it completes (its own node's driver: progress, records)."""
        if self.dataset is None or self.sampler is None:
            raise RuntimeError(f"{self.role_id} has no data to train on")
        accum = self.ctx.cfg.train.grad_accum
        model = self.ctx.model
        results = []
        with model.trainer.activate(self.state):
            for _ in range(steps):
                idx = [self.sampler.next_indices() for _ in range(accum)]
                micro = [self.dataset.batch(i) for i in idx]
                results.append(self.active_step(micro, self._loss_for(idx), round, key))
                if on_step is not None:
                    on_step(results[-1])
        self.state.sampler = self.sampler.state_dict()
        return results

    def step_on(self, micro: list[Batch], rnd: int, key: str | None) -> StepResult:
        """One step on the given micro-batches with this role's own loss (a cohort's
        one-by-one fallback)."""
        with self.ctx.model.trainer.activate(self.state):
            return self.active_step(micro, self.loss_fn, rnd, key)

    def active_step(
        self, micro: list[Batch], loss_fn: LossFn, round: int, key: str | None
    ) -> StepResult:
        """One optimizer step on ``micro`` (this role's state active), charged to its meter."""
        model, meter = self.ctx.model, self.ctx.meter
        try:
            r = train_step(model.trainer, self.state, loss_fn, micro, counter=meter.flops,
                           key=key or model.flop_key)  # fmt: skip
        except DivergenceError as err:
            raise err.for_role(self.role_id) from None
        meter.compute(r.flops, round=round, label="train")
        return r

    def snapshot(self) -> RoleState:
        return self.state

    def restore(self, state: RoleState) -> None:
        self.state = state
        if state.sampler is not None and self.sampler is not None:
            self.sampler.load_state_dict(state.sampler)


def full_model_memory(model: NodeModel, cfg: RunConfig) -> MemoryEstimate:
    """Peak training memory of one node holding the whole model, at the largest batch."""
    ids = probe_ids(cfg, model.loaded.model)
    net = model.loaded.model
    was = net.training
    net.train()
    try:
        return MemoryProbe().estimate("full", net, model.forward, ids, ids.clone())
    finally:
        net.train(was)


def update_problem(msg: Message, reference: dict[str, torch.Tensor]) -> str | None:
    """Why a device's uploaded adapter must not enter an aggregate (None: it may).

    A buggy or hostile peer (or a diverged device) must not poison the global adapter nor crash
    the server: tensors must be exactly the expected names and shapes, finite, and a report's
    ``examples`` a positive number.
    """
    got, want = set(msg.tensors), set(reference)
    if got != want:
        return f"tensors {sorted(got ^ want)[:4]} missing or unexpected"
    for k, ref in reference.items():
        t = msg.tensors[k]
        if t.shape != ref.shape or not t.is_floating_point():
            return f"tensor {k!r} is {t.dtype}{list(t.shape)}, expected {list(ref.shape)}"
        if not all_finite(t):
            return f"tensor {k!r} has non-finite values"
    examples = msg.meta.get("examples", 1)
    if not isinstance(examples, int | float) or isinstance(examples, bool) or not examples > 0:
        return f"'examples' is {examples!r}, expected a positive number"
    return None


def screen_updates(
    msgs: list[Message], reference: Callable[[str], dict[str, torch.Tensor]]
) -> tuple[list[Message], list[str]]:
    """The uploads that may be aggregated, and the senders rejected (each logged with why)."""
    good, rejected = [], []
    for m in msgs:
        problem = update_problem(m, reference(m.sender))
        if problem is None:
            good.append(m)
        else:
            rejected.append(m.sender)
            log.warning("rejected the update of %s: %s", m.sender, problem)
    return good, rejected


def state_tensors(state: RoleState) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in state.params.items()}


def reply(
    msg: Message, kind: str, tensors: dict[str, torch.Tensor] | None = None, **meta: Any
) -> Message:
    return Message(
        kind=kind, sender=msg.receiver, receiver=msg.sender, tensors=tensors or {}, meta=meta
    )


def mean(values: list[float | None]) -> float:
    """The mean of the values that exist (a skipped step's loss travels as None)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else float("nan")
