"""The run's context: what a paradigm's driver is handed (``run(exp)``), built by ``cotune.run``.

The driver runs on the server node: it has the server's own model and trainer, its meter, the
``grid`` to every other role, and the experimenter's tools (evaluation, the metrics log,
checkpoints, progress). The simulator (``sim``) is here for ``cotune.run`` (checkpoints carry
its clock; summaries read its costs): paradigm modules never touch it (a test checks).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cotune.config import RunConfig
from cotune.data import EncodedDataset, TaskData
from cotune.models import LoadedModel, Segment
from cotune.models.packing import padding_free
from cotune.peft import AdapterSet
from cotune.peft.domains import DomainPlan
from cotune.progress import Progress
from cotune.report import MetricsLog
from cotune.runtime import Engine
from cotune.runtime.grid import Grid
from cotune.runtime.ids import SERVER
from cotune.runtime.node import Meter, NodeModel
from cotune.sim.simulation import Simulation
from cotune.train import RoleState, Trainer, evaluate


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
    # The adapter config as injected (GeLoRA's per-layer ranks filled in): what a node that
    # loads only its own segment injects into it.
    peft_section: Any = None
    # GGM's setup: the components it kept and why (written to the run directory).
    ggm_allocation: dict[str, Any] | None = None
    # CRC32C of the loaded base's tensors, by name (deployed runs: the devices check theirs).
    base_digest: dict[str, str] | None = None

    @property
    def task(self) -> str:
        return self.cfg.model.task

    @property
    def forward(self) -> Segment:
        return self.loaded.anatomy.full()

    def host_time(self) -> float:
        return time.perf_counter() - self.start_time

    def progress(self, total: int, label: str, unit: str = "step") -> Progress:
        """The run's progress display (evaluations show as its ``evaluating`` phase)."""
        self.bar = Progress(total, label, quiet=self.quiet, unit=unit)
        return self.bar

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
        bar = getattr(self, "bar", None)
        was = bar.current if bar is not None else None
        if bar is not None:
            bar.phase("evaluating")
        try:
            with self.trainer.activate(state), padding_free(self.cfg.train.padding_free):
                return evaluate(self.forward, self.loaded.model, self.test_set, self.task,
                                self.cfg.eval.batch_size)  # fmt: skip
        finally:
            if bar is not None and was is not None:
                bar.phase(was)

    def evaluate_states(
        self, states: dict[str, RoleState], step: int, rnd: int
    ) -> tuple[dict, dict]:
        """Evaluate each role's own adapter state; log one record per role and their mean."""
        per_role = {r: self.evaluate_state(st) for r, st in states.items()}
        for role, ev in per_role.items():
            self.log_record("eval", step, role, round=rnd, **ev)
        first = next(iter(per_role.values()))
        summary = {k: _mean([ev[k] for ev in per_role.values()]) for k in first}
        self.log_record("eval", step, "mean", round=rnd, **summary)
        return per_role, summary

    def evaluate_roles(self, role_ids: list[str], step: int, rnd: int) -> tuple[dict, dict]:
        """Evaluate each role's own adapter, read through the grid's snapshot channel; log one
        record per role and their mean."""
        assert self.grid is not None
        return self.evaluate_states({r: self.grid.snapshot(r) for r in role_ids}, step, rnd)

    def eval_points(self) -> list[int]:
        """Steps after which to evaluate: every ``eval.every`` steps and at the last step."""
        total, every = self.cfg.train.steps, self.cfg.eval.every
        points = list(range(every, total, every))
        return [*points, total]

    def log_record(self, event: str, step: int, role: str, **values: Any) -> None:
        record = {"event": event, "step": step, "role": role, **values}
        # The simulated time the driver saw it happen (asynchronous drivers pass the arrival
        # they acted on: other devices' timelines already run ahead), else the clock's latest.
        record["sim_time_s"] = values.get("sim_time_s", self.sim.now)
        record["host_time_s"] = self.host_time()
        self.log.log(record)

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

    def checkpoint_due(self, step: int) -> bool:
        """Whether ``maybe_checkpoint`` at ``step`` would write one (read states only then:
        on a network engine a snapshot is a round trip)."""
        every = self.cfg.output.checkpoint_every
        if every == "eval":
            every = self.cfg.eval.every
        if self.checkpoint_fn is None or not every or step >= self.cfg.train.steps:
            return False
        return step - self.last_checkpoint_step >= every

    def maybe_checkpoint(
        self,
        step: int,
        states: dict[str, RoleState] | Callable[[], dict[str, RoleState]],
        extra: dict[str, Any] | Callable[[], dict[str, Any]],
    ) -> None:
        """Checkpoint at a driver's consistent point when ``output.checkpoint_every`` says so.

        Drivers call this only between rounds/eval points, where every role's state is whole;
        ``"eval"`` (the default) checkpoints at the first such point at or after each
        evaluation step. The final checkpoint is written by ``cotune.run`` after the paradigm
        returns.
        """
        if not self.checkpoint_due(step):
            return
        assert self.checkpoint_fn is not None
        states = states() if callable(states) else states  # read only when writing
        extra = extra() if callable(extra) else extra
        self.checkpoint_fn(step, states, extra)
        self.last_checkpoint_step = step


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
