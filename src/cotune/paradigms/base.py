"""What every paradigm shares: the experiment context, roles that train, checkpoints, logging.

A paradigm is a driver function ``run(exp) -> ParadigmResult`` written like a server app: it
registers roles with ``exp.engine`` and talks to them only through ``Message``s. Measurement
(evaluation on the held-out set) is the experimenter's privilege: it reads a role's state
directly and is never counted as traffic.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import BaseModel

from cotune.config import RunConfig
from cotune.data import Batch, BatchSampler, EncodedDataset, TaskData
from cotune.errors import DivergenceError
from cotune.models import LoadedModel, Segment
from cotune.peft import AdapterSet
from cotune.peft.domains import DomainPlan, route_domains
from cotune.progress import Progress
from cotune.report import MetricsLog
from cotune.runtime import Engine, Message, Role
from cotune.runtime.grid import Grid
from cotune.runtime.ids import SERVER
from cotune.runtime.node import Meter, NodeContext, NodeModel
from cotune.sim.costs import MemoryEstimate, MemoryProbe
from cotune.sim.simulation import Simulation
from cotune.train import RoleState, StepResult, Trainer, evaluate, full_model_loss, train_step
from cotune.train.loop import LossFn

T = TypeVar("T", bound=BaseModel)
log = logging.getLogger(__name__)


@dataclass
class Experiment:
    """Everything a paradigm needs, built once from a ``RunConfig`` by ``cotune.run``."""

    cfg: RunConfig
    loaded: LoadedModel
    adapters: AdapterSet
    data: TaskData
    train_set: EncodedDataset
    test_set: EncodedDataset
    parts: list[list[int]]
    engine: Engine
    trainer: Trainer
    run_dir: Path
    sim: Simulation
    log: MetricsLog | None = None  # opened by cotune.run once the run directory exists
    quiet: bool = True
    resume: dict[str, Any] | None = None  # a loaded checkpoint, when resuming
    start_time: float = field(default_factory=time.perf_counter)
    checkpoint_fn: Callable[[int, dict[str, RoleState], dict[str, Any]], None] | None = None
    last_checkpoint_step: int = 0
    tokenizer: Any = None  # the run's Tokenizer (paradigms that encode extra data, e.g. fedbiot)
    # Set by the stage driver (cotune.stages) for MoDULA's domain stage: each device's expert.
    domains: DomainPlan | None = None
    flop_key: str = "full"  # FLOP-counter key of a whole-model step (one per training stage)
    grid: Grid | None = None  # the driver's view of the other roles (cotune.nodes.make_grid)

    @property
    def task(self) -> str:
        return self.cfg.model.task

    @property
    def forward(self) -> Segment:
        return self.loaded.anatomy.full()

    def host_time(self) -> float:
        return time.perf_counter() - self.start_time

    def progress(self, total: int, label: str) -> Progress:
        return Progress(total, label, quiet=self.quiet)

    def initial_params(self) -> dict[str, torch.Tensor]:
        """The adapter values every role starts from (the server's initialization)."""
        return {k: p.data for k, p in self.trainer.params.items()}

    def role_tensors(
        self, role_id: str, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The part of an adapter state `role_id` trains (all of it outside a domain stage):
        what a device downloads and uploads, so an expert is averaged only over its domain."""
        if self.domains is None:
            return tensors
        return {k: v for k, v in tensors.items() if self.domains.owns(role_id, k)}

    def evaluate_state(self, state: RoleState) -> dict[str, float]:
        with self.trainer.activate(state):
            return evaluate(
                self.forward, self.loaded.model, self.test_set, self.task, self.cfg.eval.batch_size
            )

    def evaluate_roles(
        self, roles: list[TrainingRole] | list[str], step: int, rnd: int
    ) -> tuple[dict, dict]:
        """Evaluate each role's own adapter (a role, or a role id read through the grid's
        snapshot); log one record per role and their mean."""
        states = {
            r: self.grid.snapshot(r) if isinstance(r, str) else r.state  # type: ignore[union-attr]
            for r in roles
        }
        per_role = {(r if isinstance(r, str) else r.role_id): self.evaluate_state(st)
                    for r, st in states.items()}  # fmt: skip
        for role, ev in per_role.items():
            self.log_record("eval", step, role, round=rnd, **ev)
        first = next(iter(per_role.values()))
        summary = {k: mean([ev[k] for ev in per_role.values()]) for k in first}
        self.log_record("eval", step, "mean", round=rnd, **summary)
        return per_role, summary

    def eval_points(self) -> list[int]:
        """Steps after which to evaluate: every ``eval.every`` steps and at the last step."""
        total, every = self.cfg.train.steps, self.cfg.eval.every
        points = list(range(every, total, every))
        return [*points, total]

    def log_record(self, event: str, step: int, role: str, **values: Any) -> None:
        record = {"event": event, "step": step, "role": role, **values}
        record["sim_time_s"] = self.sim.now
        record["host_time_s"] = self.host_time()
        self.log.log(record)

    def full_model_memory(self) -> MemoryEstimate:
        """Peak training memory of one role holding the whole model, at the largest batch."""
        from cotune.nodes import SharedModel

        return full_model_memory(SharedModel(self), self.cfg)

    @property
    def model(self) -> NodeModel:
        """The server node's model (the run's one model), as a node sees its own."""
        from cotune.nodes import SharedModel

        return SharedModel(self)

    @property
    def meter(self) -> Meter:
        """The server node's meter: the driver reports its own work (aggregation) on it."""
        assert self.grid is not None
        return self.grid.meter(SERVER)

    def maybe_checkpoint(
        self, step: int, states: dict[str, RoleState], extra: dict[str, Any]
    ) -> None:
        """Checkpoint at a driver's consistent point when ``output.checkpoint_every`` says so.

        Drivers call this only between rounds/eval points, where every role's state is whole;
        ``"eval"`` (the default) checkpoints at the first such point at or after each
        evaluation step. The final checkpoint is written by ``cotune.run`` after the paradigm
        returns.
        """
        every = self.cfg.output.checkpoint_every
        if every == "eval":
            every = self.cfg.eval.every
        if self.checkpoint_fn is None or not every or step >= self.cfg.train.steps:
            return
        if step - self.last_checkpoint_step >= every:
            self.checkpoint_fn(step, states, extra)
            self.last_checkpoint_step = step


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
        self, steps: int, *, round: int = 0, key: str | None = None
    ) -> list[StepResult]:
        """Train ``steps`` optimizer steps; each step's counted FLOPs go to this node's meter
        (``key``: the FLOP counter's cache key, default the model's whole-step key)."""
        if self.dataset is None or self.sampler is None:
            raise RuntimeError(f"{self.role_id} has no data to train on")
        accum = self.ctx.cfg.train.grad_accum
        model, meter = self.ctx.model, self.ctx.meter
        results = []
        with model.trainer.activate(self.state):
            for _ in range(steps):
                idx = [self.sampler.next_indices() for _ in range(accum)]
                micro = [self.dataset.batch(i) for i in idx]
                try:
                    r = train_step(
                        model.trainer,
                        self.state,
                        self._loss_for(idx),
                        micro,
                        counter=meter.flops,
                        key=key or model.flop_key,
                    )
                except DivergenceError as err:
                    raise err.for_role(self.role_id) from None
                meter.compute(r.flops, round=round, label="train")
                results.append(r)
        self.state.sampler = self.sampler.state_dict()
        return results

    def snapshot(self) -> RoleState:
        return self.state

    def restore(self, state: RoleState) -> None:
        self.state = state
        if state.sampler is not None and self.sampler is not None:
            self.sampler.load_state_dict(state.sampler)


class LegacyTrainingRole(TrainingRole):
    """A ``TrainingRole`` for paradigms not yet ported to the Grid contract (hierfed, dlora):
    built from the run's ``Experiment``, which it keeps as ``self.exp``."""

    def __init__(self, role_id: str, exp: Experiment, dataset: EncodedDataset | None, seed: int):
        from cotune.nodes import SharedModel

        meter = exp.grid.meter(role_id) if exp.grid is not None else None
        if meter is None:
            from cotune.runtime.node import Meter

            meter = Meter(role_id, exp.sim.flops)
        ctx = NodeContext(role_id, exp.cfg, seed, meter, dataset, exp.grid, exp.domains)
        ctx._model = SharedModel(exp)
        super().__init__(ctx)
        self.exp = exp


def full_model_memory(model: NodeModel, cfg: RunConfig) -> MemoryEstimate:
    """Peak training memory of one node holding the whole model, at the largest batch."""
    ids = torch.ones(cfg.train.batch_size, cfg.model.max_length, dtype=torch.long)
    net = model.loaded.model
    was = net.training
    net.train()
    try:
        return MemoryProbe().estimate("full", net, model.forward, ids, ids.clone())
    finally:
        net.train(was)


def parse_options(model: type[T], options: dict[str, Any], where: str = "paradigm.options") -> T:
    """Validate a paradigm's free-form ``options`` dict into its typed model, naming bad fields.

    ``load_config`` has already validated them (``cotune.paradigms.options``); this gives the
    driver its typed copy.
    """
    from cotune.paradigms.options import parse_paradigm_options

    return parse_paradigm_options("", options, model)


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
        if not bool(torch.isfinite(t).all()):
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
