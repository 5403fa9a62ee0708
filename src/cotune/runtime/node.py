"""What a role has on its node: a small ``NodeContext``, built by the engine, never the run.

A role is created by a factory (its class) from a ``NodeContext``: its id, the config, its own
data shard, the model it holds (loaded on first use), a compute ``Meter`` and a grid handle
for nested calls. Nothing else: no ``Experiment``, no other role's objects. On the in-process
``local`` engine every node's model is the run's one shared model (one frozen base, many role
states); on ``isolated`` each node gets its own copy, so no two roles share any Python object.

The ``Meter`` is how a role reports the work it did (counted FLOPs, a memory probe) to whoever
measures it (the simulator); its reports travel out of band and never change a message's bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from cotune.config import RunConfig
    from cotune.data import EncodedDataset
    from cotune.models import LoadedModel, Segment
    from cotune.peft import AdapterSet
    from cotune.peft.domains import DomainPlan
    from cotune.runtime.grid import Grid
    from cotune.sim.costs import FlopCounter, MemoryEstimate
    from cotune.train import Trainer


class NodeModel(Protocol):
    """The model a node holds, with its adapters and the trainer over them."""

    @property
    def loaded(self) -> LoadedModel: ...

    @property
    def adapters(self) -> AdapterSet: ...

    @property
    def trainer(self) -> Trainer: ...

    @property
    def flop_key(self) -> str: ...

    @property
    def forward(self) -> Segment: ...

    def initial_params(self) -> dict[str, torch.Tensor]: ...


class MeterSink(Protocol):
    """Receives a node's reports (the simulator, or nothing)."""

    def compute(
        self,
        role: str,
        flops: float,
        *,
        round: int,
        after: float | None,
        waits_for: str | None,
        label: str,
    ) -> None: ...

    def memory(self, role: str, key: str, probe: Callable[[], MemoryEstimate]) -> None: ...


class Meter:
    """A node's compute meter: ``flops`` counts the work a function really does (cached per
    shape), ``compute`` reports it, ``memory`` reports a memory estimate (probed once per key).
    Without a sink the reports go nowhere (a real deployment measures host time instead)."""

    def __init__(self, role: str, flops: FlopCounter, sink: MeterSink | None = None) -> None:
        self.role, self.flops, self.sink = role, flops, sink

    def compute(
        self,
        flops: float,
        *,
        round: int = 0,
        after: float | None = None,
        waits_for: str | None = None,
        label: str = "",
    ) -> None:
        """``flops`` of work done now. It could not start before ``after`` (simulated seconds:
        a reply's ``arrival``, a round's ``closed_at``) nor before the last message from
        ``waits_for`` arrived here (a hub relaying what it was sent)."""
        if self.sink is not None:
            self.sink.compute(
                self.role, flops, round=round, after=after, waits_for=waits_for, label=label
            )

    def memory(self, key: str, probe: Callable[[], MemoryEstimate]) -> None:
        if self.sink is not None:
            self.sink.memory(self.role, key, probe)


@dataclass
class NodeContext:
    """Everything a role may use, all of it its own."""

    node_id: str
    cfg: RunConfig
    seed: int
    meter: Meter
    data: EncodedDataset | None = None  # this node's own shard (None: it holds no data)
    groups: list[int | None] | None = None  # each example's class or domain (None: unknown)
    grid: Grid | None = None  # for nested calls (an edge asking its devices, ...)
    domains: DomainPlan | None = None  # MoDULA's domain stage: which expert each device trains
    device: str = "cpu"  # the torch device this node computes on
    load_model: Callable[[], NodeModel] | None = field(default=None, repr=False)
    # Loads only what anatomy.segment(start, end, embed=, head=) runs (None: this node shares
    # a whole model, so a segment is a view of it).
    load_segment: Callable[[int, int, bool, bool], NodeModel] | None = field(
        default=None, repr=False
    )
    _model: NodeModel | None = field(default=None, repr=False)

    @property
    def model(self) -> NodeModel:
        """The node's model, loaded on first use (a data-only node never loads one)."""
        if self._model is None:
            if self.load_model is None:
                raise RuntimeError(f"node {self.node_id!r} has no model")
            self._model = self.load_model()
        return self._model

    def segment_model(self, start: int, end: int, *, embed: bool, head: bool) -> NodeModel:
        """The model with only blocks ``[start, end)`` (and the embeddings / head as asked)
        materialised, for a role that runs just that segment (a split device's bottom). Nodes
        that share the run's model get the whole model (the segment is a view of it)."""
        if self._model is None and self.load_segment is not None:
            self._model = self.load_segment(start, end, embed, head)
        return self.model

    @property
    def task(self) -> str:
        return self.cfg.model.task

    def role_tensors(self, tensors: dict[str, Any]) -> dict[str, Any]:
        """The part of an adapter state this node trains (all of it outside a domain stage)."""
        if self.domains is None:
            return tensors
        return {k: v for k, v in tensors.items() if self.domains.owns(self.node_id, k)}


CACHE_ATTR = "_cotune_node_cache"


def node_cache(base: Any) -> dict[Any, Any]:
    """Objects a node builds once per base model (fedbiot's emulator), kept on the base module
    itself so they live exactly as long as it does. Node copies do not inherit it."""
    cache = base.__dict__.get(CACHE_ATTR)
    if cache is None:
        cache = base.__dict__[CACHE_ATTR] = {}
    return cache
