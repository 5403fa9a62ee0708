"""Nodes of an in-process run: what each role's ``NodeContext`` holds, for ``local`` and
``isolated`` engines, and the grid a run's driver talks to.

``local``: every node's model is the run's one model (one frozen base, many role states: roles
swap their tensors in). ``isolated``: every node gets its own copy of the config, its data shard
and the model with its adapters and trainer, taken from a pristine template of the run's model
(as a real node loads the same checkpoint), so no two roles share any Python object and only
decoded messages pass between them. It exists to prove the contract and test it cheaply; it
holds one model per node, so it is not for large fleets.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any

from cotune.runtime.engine_grid import EngineGrid
from cotune.runtime.grid import Grid
from cotune.runtime.ids import SERVER, device_id, device_index
from cotune.runtime.node import CACHE_ATTR, Meter, NodeContext, NodeModel

if TYPE_CHECKING:
    import torch

    from cotune.models import LoadedModel, Segment
    from cotune.paradigms.base import Experiment
    from cotune.peft import AdapterSet
    from cotune.train import Trainer


class SharedModel:
    """``local``: a live view of the run's one model (a staged run swaps the trainer)."""

    def __init__(self, exp: Experiment) -> None:
        self.exp = exp

    @property
    def loaded(self) -> LoadedModel:
        return self.exp.loaded

    @property
    def adapters(self) -> AdapterSet:
        return self.exp.adapters

    @property
    def trainer(self) -> Trainer:
        return self.exp.trainer

    @property
    def flop_key(self) -> str:
        return self.exp.flop_key

    @property
    def forward(self) -> Segment:
        return self.exp.forward

    def initial_params(self) -> dict[str, torch.Tensor]:
        return self.exp.initial_params()


@dataclasses.dataclass
class OwnModel:
    """``isolated``: a node's own model, adapters and trainer."""

    loaded: LoadedModel
    adapters: AdapterSet
    trainer: Trainer
    flop_key: str

    @property
    def forward(self) -> Segment:
        return self.loaded.anatomy.full()

    def initial_params(self) -> dict[str, torch.Tensor]:
        return {k: p.data for k, p in self.trainer.params.items()}


class RunNodes:
    """The ``NodeHost`` of an in-process run: the server and ``device-<i>`` with shard ``i``."""

    def __init__(self, exp: Experiment, *, isolated: bool) -> None:
        self.exp, self.isolated = exp, isolated
        self._template: tuple[Any, Any] | None = None
        self._devices: dict[str, torch.device] = {}

    def device_of(self, role_id: str) -> torch.device:
        """Where ``role_id`` computes (``train.device`` / ``train.node_devices``; on the local
        engine every node is where the shared model is)."""
        if role_id not in self._devices:
            from cotune.accel.placement import node_device

            if self.isolated:
                self._devices[role_id] = node_device(self.exp.cfg.train, role_id)
            else:
                self._devices[role_id] = self.exp.trainer.device
        return self._devices[role_id]

    def node_ids(self) -> list[str]:
        devices = [device_id(i) for i in range(len(self.exp.parts))]
        return [SERVER, *devices, *infrastructure(self.exp.cfg)]

    def info(self, role_id: str) -> dict[str, Any]:
        i = device_index(role_id)
        return {"examples": len(self.exp.parts[i])} if i is not None else {}

    def prepare(self, role_id: str) -> None:
        """A role is being started on ``role_id`` (it is built on first use): the node must
        exist, and an isolated node's template is taken now, before any role trains."""
        i = device_index(role_id)
        if i is not None and not 0 <= i < len(self.exp.parts):
            raise KeyError(f"no node {role_id!r} in this run ({len(self.exp.parts)} devices)")
        if self.isolated:
            self._pristine()

    def context(self, role_id: str, *, grid: Grid, meter: Meter) -> NodeContext:
        exp, i = self.exp, device_index(role_id)
        if i is not None and not 0 <= i < len(exp.parts):
            raise KeyError(f"no node {role_id!r} in this run ({len(exp.parts)} devices)")
        data = exp.train_set.subset(exp.parts[i]) if i is not None else None
        # Each example's group (class, or a causal LM's domain; None: neither): the node's own.
        groups = [exp.data.train[j].group for j in exp.parts[i]] if i is not None else None
        cfg, domains = exp.cfg, exp.domains
        if self.isolated:
            data, groups, cfg, domains = copy.deepcopy((data, groups, cfg, domains))
        device = self.device_of(role_id)
        if data is not None:
            data = data.on(device)
        return NodeContext(
            node_id=role_id,
            cfg=cfg,
            seed=exp.cfg.seed + i if i is not None else exp.cfg.seed,
            meter=meter,
            data=data,
            groups=groups,
            grid=grid,
            domains=domains,
            device=str(device),
            load_model=(
                (lambda: self._own_model(role_id)) if self.isolated else (lambda: SharedModel(exp))
            ),
            load_segment=(lambda *a: self._own_segment(role_id, *a)) if self.isolated else None,
        )

    def _pristine(self) -> tuple[Any, Any]:
        """(model, adapters) as the run built them, copied once before any role trains."""
        if self._template is None:
            exp = self.exp
            # What the server built on its own model (an emulator, ...) is not a node's.
            cache = exp.loaded.model.__dict__.get(CACHE_ATTR)
            memo = {id(cache): {}} if cache is not None else {}
            self._template = copy.deepcopy((exp.loaded.model, exp.adapters), memo)
        return self._template

    def _own_model(self, role_id: str) -> NodeModel:
        from cotune.accel.placement import move_to

        exp = self.exp
        model, adapters = copy.deepcopy(self._pristine())
        move_to(model, self.device_of(role_id))
        anatomy = type(exp.loaded.anatomy)(model, exp.loaded.anatomy.task)
        loaded = dataclasses.replace(exp.loaded, model=model, anatomy=anatomy, tokenizer=None)
        from cotune.train import Trainer

        trainer = Trainer(adapters.named_trainable(), exp.cfg.train, exp.trainer.total_steps)
        return OwnModel(loaded, adapters, trainer, exp.flop_key)

    def _own_segment(
        self, role_id: str, start: int, end: int, embed: bool, head: bool
    ) -> NodeModel:
        """Only the segment's weights, read as a real node reads them (``load_segment``); the
        adapters injected into it start from the run's initial values (the seeded init, or the
        warm-up's) for the layers it holds."""
        import torch

        from cotune.accel.placement import place_model
        from cotune.models.partial import load_segment
        from cotune.peft import inject_adapters
        from cotune.train import Trainer

        exp = self.exp
        cfg = exp.cfg
        vocab = exp.tokenizer.vocab_size if cfg.model.name_or_path.startswith("random:") else None
        loaded, _ = load_segment(
            cfg.model, start, end, embed=embed, head=head,
            num_labels=exp.loaded.num_labels, vocab_size=vocab, seed=cfg.seed,
        )  # fmt: skip
        place_model(loaded, cfg, self.device_of(role_id))
        peft = exp.peft_section if exp.peft_section is not None else cfg.peft
        adapters = inject_adapters(
            loaded.model, peft, anatomy=loaded.anatomy, head_paths=loaded.anatomy.head_paths()
        )
        initial = self._pristine()[1].named_trainable()
        with torch.no_grad():
            for name, p in adapters.named_trainable().items():
                if not p.is_meta:
                    p.copy_(initial[name])
        trainer = Trainer(adapters.named_trainable(), cfg.train, exp.trainer.total_steps)
        return OwnModel(loaded, adapters, trainer, exp.flop_key)


class RemoteNodes(RunNodes):
    """A gRPC run's nodes: devices live in their own processes (their roles are started there,
    behind proxies); the server and infrastructure nodes are this process's, each on its own
    node copy as on ``isolated``."""

    def __init__(self, exp: Experiment, engine: Any) -> None:
        super().__init__(exp, isolated=True)
        self.engine = engine

    def is_remote(self, role_id: str) -> bool:
        return device_index(role_id) is not None

    def info(self, role_id: str) -> dict[str, Any]:
        """A device that trains on its own data file declared its size when it joined."""
        declared = self.engine.hub.ready.get(role_id, {}).get("examples")
        return {"examples": int(declared)} if declared is not None else super().info(role_id)

    def start_remote(self, role_id: str, factory: Any) -> Any:
        return self.engine.start_remote(role_id, factory)


def infrastructure(cfg: Any) -> dict[str, str]:
    """The run's nodes besides the server and devices (hierfed's edges): node → profile."""
    from cotune.paradigms.options import OPTIONS

    return OPTIONS[cfg.paradigm.name].model_validate(cfg.paradigm.options).infrastructure()


def make_grid(exp: Experiment) -> Grid:
    """The grid a run's driver talks to: the engine's, with the simulator underneath."""
    from cotune.errors import ConfigError
    from cotune.sim.grid import SimulatedGrid
    from cotune.sim.profiles import all_profiles, get_profile

    known = all_profiles(exp.cfg.devices.profile_file)
    for node, profile in infrastructure(exp.cfg).items():
        try:
            prof = get_profile(profile, known)
        except Exception as err:  # noqa: BLE001 - the profile registry's own message says why
            raise ConfigError(f"paradigm.options: node {node}: {err}") from None
        if node not in exp.sim.clock.roles:  # a resumed clock has them already
            exp.sim.clock.add_role(node, prof, hub=True)  # aggregators: parallel links
        exp.sim.profiles[node] = prof
    if exp.cfg.engine.kind in ("grpc", "ray"):
        from cotune.deploy.launch import deployed_grid

        inner = deployed_grid(exp)
    else:
        host = RunNodes(exp, isolated=exp.cfg.engine.kind == "isolated")
        inner = EngineGrid(exp.engine, host, exp.sim.flops)
    return SimulatedGrid(inner, exp.sim, exp.cfg.devices.availability.kind)
