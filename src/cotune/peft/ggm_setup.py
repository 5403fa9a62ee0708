"""APCA-GGM's allocation as a run's setup stage (called by ``build_experiment``).

1. inject every candidate component (`r` per targeted module) and warm up, collecting one score
   sample per step: at the server on the pooled training data (`source: server`), or on every
   device on its own shard (`source: federated`; each device sends its score samples to the
   server — bytes and FLOPs on the simulator's clock, round 0, label ``ggm``);
2. solve the graph and keep `kept_nodes` components (``cotune.peft.ggm_graph``);
3. put the original base weights back and inject the allocated adapter (per-module ranks,
   `options.allocation`), which keeps the warm-up's values of the kept components (server
   source; federated runs start them from their SVD values, since every device warmed its own).

The returned PeftSection is the adapter config every node injects, so roles built elsewhere (a
segment, a device process) build the same adapter without redoing anything.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from cotune.config import PeftSection
from cotune.errors import AdapterError
from cotune.peft.base import get_method
from cotune.peft.d2lora import D2loraOptions, d2lora_warmup
from cotune.peft.gelora import target_paths
from cotune.peft.ggm import GgmOptions, ImportanceTracker, component_nodes
from cotune.peft.ggm_graph import select_nodes
from cotune.peft.inject import AdapterSet, inject_adapters

log = logging.getLogger(__name__)
KEY = "ggm"  # FLOP-counter key and clock label of the warm-up


@dataclass
class Allocation:
    """What the setup decided, for the log and the run's files."""

    allocation: dict[str, list[int]]
    nodes: int  # candidate component nodes
    samples: int  # score samples (steps × warming roles)
    objective: list[float] = field(default_factory=list)
    report_bytes: dict[str, int] = field(default_factory=dict)  # federated: per device

    def ranks(self) -> dict[str, int]:
        return {p: len(i) for p, i in self.allocation.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "allocation": self.allocation,
            "ranks": self.ranks(),
            "kept_nodes": sum(self.ranks().values()),
            "candidate_nodes": self.nodes,
            "score_samples": self.samples,
            "objective": self.objective,
            "report_bytes": self.report_bytes,
        }


def ggm_options(cfg: PeftSection) -> GgmOptions:
    opts = get_method("ggm").parse_options(cfg.options)
    assert isinstance(opts, GgmOptions)
    return opts


def allocated_section(
    cfg: PeftSection, allocation: dict[str, list[int]], r: int | None = None
) -> PeftSection:
    """The adapter config after the allocation: exactly the modules with kept components, each at
    its count as rank, alpha scaled along so every module keeps the scaling ``alpha / r``."""
    r = cfg.r if r is None else r
    ranks = {re.escape(p): len(idx) for p, idx in allocation.items()}
    factor = (lambda k: (k / r) ** 0.5) if cfg.use_rslora else (lambda k: k / r)
    alphas = {key: cfg.alpha * factor(k) for key, k in ranks.items()}
    options = {**cfg.options, "allocation": {p: list(i) for p, i in allocation.items()}}
    return cfg.model_copy(
        update={
            "target_modules": list(ranks),
            "layers": None,
            "rank_pattern": ranks,
            "alpha_pattern": alphas,
            "options": options,
        }
    )


def _unwrap(adapters: AdapterSet, originals: dict[str, torch.Tensor]) -> None:
    """Put every adapted module's own layer back, with its original weight."""
    model = adapters.model
    for path, layer in adapters.layers.items():
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, layer.base_layer)
        with torch.no_grad():
            layer.base_layer.weight.copy_(originals[path])
    adapters.layers = {}


def ggm_adapters(
    cfg: Any,
    peft_cfg: PeftSection,
    loaded: Any,
    train_set: Any,
    parts: list[list[int]],
    *,
    head_paths: list[str],
    sim: Any = None,
) -> tuple[PeftSection, AdapterSet, Allocation | None]:
    """Inject GGM's adapters into ``loaded.model``: the allocated ones (after the warm-up and the
    graph step), or directly when ``peft.options.allocation`` is already given."""
    from cotune.runtime.ids import SERVER, device_id
    from cotune.runtime.messages import Message, encode_message

    opts = ggm_options(peft_cfg)
    model, anatomy = loaded.model, loaded.anatomy
    if opts.allocation is not None:
        adapters = inject_adapters(model, peft_cfg, anatomy=anatomy, head_paths=head_paths)
        return peft_cfg, adapters, None
    if peft_cfg.rank_pattern or peft_cfg.alpha_pattern:
        raise AdapterError(
            "peft.method ggm: rank_pattern / alpha_pattern come from the allocation; give every "
            "module the same candidate count with peft.r"
        )
    paths = target_paths(model, peft_cfg, anatomy, head_paths)
    modules = dict(model.named_modules())
    originals = {p: modules[p].weight.detach().clone() for p in paths}
    adapters = inject_adapters(model, peft_cfg, anatomy=anatomy, head_paths=head_paths)
    start = adapters.state_dict()
    warm = D2loraOptions(warmup_steps=opts.warmup_steps, warmup_lr=cfg.train.lr, keep_head=True)
    counter = sim.flops if sim is not None else None

    def warm_up(dataset: Any, seed: int, role: str) -> tuple[torch.Tensor, float]:
        tracker = ImportanceTracker(adapters.layers, opts.beta1, opts.beta2)
        before = counter.by_key.get(KEY, 0) if counter is not None else 0
        d2lora_warmup(
            loaded.anatomy.full(), adapters, dataset, cfg.model.task, warm,
            batch_size=cfg.train.batch_size, seed=seed, counter=counter,
            fp16=cfg.train.autocast == "fp16", on_backward=tracker.update, count_key=KEY,
        )  # fmt: skip
        end = 0.0
        if sim is not None:
            end = sim.charge(role, counter.by_key.get(KEY, 0) - before, label=KEY).end
        return tracker.matrix(), end

    report: dict[str, int] = {}
    if opts.source == "server":
        scores, _ = warm_up(train_set, cfg.seed, SERVER)
    else:
        rows = []
        for i, part in enumerate(parts):
            if len(part) < 1:
                continue  # a device without data has no gradients to score
            adapters.load_state_dict(start)
            samples, end = warm_up(train_set.subset(part), cfg.seed + 1 + i, device_id(i))
            rows.append(samples)
            msg = Message("ggm_scores", device_id(i), SERVER, {"scores": samples.float()})
            report[device_id(i)] = len(encode_message(msg, cfg.engine.codec))
            if sim is not None:
                sim.clock.transfer(device_id(i), SERVER, report[device_id(i)], after=end, label=KEY)
        if not rows:
            raise AdapterError("GGM federated: no device holds training data to score")
        scores = torch.cat(rows)
        adapters.load_state_dict(start)
    warmed = adapters.state_dict()
    nodes = component_nodes(adapters.layers)
    try:
        kept, result = select_nodes(
            scores, opts.important_nodes, opts.kept_nodes, selection=opts.selection,
            lam=opts.lam, tau=opts.tau, p=opts.p, max_iter=opts.max_iter,
            omega_step=opts.omega_step, eta=opts.eta, omega_iters=opts.omega_iters,
        )  # fmt: skip
    except ValueError as err:
        raise AdapterError(str(err)) from None
    allocation: dict[str, list[int]] = {}
    for j in kept:
        path, comp = nodes[j]
        allocation.setdefault(path, []).append(comp)
    allocation = {p: sorted(allocation[p]) for p in paths if p in allocation}
    _unwrap(adapters, originals)
    section = allocated_section(peft_cfg, allocation)
    new = inject_adapters(model, section, anatomy=anatomy, head_paths=head_paths)
    keep_warm = opts.source == "server"
    with torch.no_grad():
        for path, idx in allocation.items():
            layer = new.layers[path]
            if keep_warm:
                layer.lora_A.weight.copy_(warmed[f"{path}.lora_A.weight"][idx])
                layer.lora_B.weight.copy_(warmed[f"{path}.lora_B.weight"][:, idx])
        own = new.named_tensors()
        for name, value in (warmed if keep_warm else start).items():
            if not any(name.startswith(p + ".") for p in paths):
                own[name].copy_(value)  # the heads
    trace = result.objective if result is not None else []
    done = Allocation(allocation, len(nodes), int(scores.shape[0]), trace, report)
    log.info(
        "GGM kept %d of %d components: %s",
        len(kept), len(nodes), {p: len(i) for p, i in allocation.items()},
    )  # fmt: skip
    return section, new, done
