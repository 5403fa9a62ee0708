"""GeLoRA (Ed-dib et al. 2024, arXiv 2412.09250): per-layer LoRA ranks from intrinsic dimensions.

A sample of data goes through the frozen model; the TwoNN intrinsic dimension `d_i` of the hidden
states entering each block (`d_{L}` leaving the last) bounds the rank the block needs. With rule
`max` (default) block i gets the bound `max(d_i, d_{i+1})` ("input and output representations");
rule `delta` uses `max(d_{i+1} − d_i, 1)`. Ranks `ceil(c · bound)` are scaled by the largest `c`
that fits the parameter budget, clamped to `[1, min(in, out) − 1]`, and written to `rank_pattern`
(exact module paths): the adapter itself is plain LoRA, so PEFT loads it as is.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from cotune.config import PeftSection
from cotune.errors import AdapterError
from cotune.peft.base import get_method, is_adaptable
from cotune.peft.inject import DEFAULT_HEADS, matches_target, parse_layer_index
from cotune.peft.lora import LoraLayer, LoraOptions
from cotune.peft.twonn import TwoNNStats, twonn_fit

POOLINGS = ("mean", "last", "tokens")
RULES = ("max", "delta")
SOURCES = ("server", "federated")


@dataclass(frozen=True)
class GeloraOptions(LoraOptions):
    sample_examples: int = 64  # examples forwarded to estimate the dimensions
    # Total adapter parameters (budget_unit "params") or mean rank ("mean_rank");
    # None: the parameter count of plain LoRA with rank peft.r on the same targets.
    budget: float | None = None
    budget_unit: str = "params"
    source: str = "server"  # server: a sample of pooled data; federated: devices send TwoNN stats
    pooling: str = "mean"  # one point per sequence (mean / last token) or every token
    rule: str = "max"
    estimator: str = "mle"  # "fit" (Facco's linear fit) needs all ratios: server only

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = {"budget_unit": ("params", "mean_rank"), "source": SOURCES, "pooling": POOLINGS}
        checks |= {"rule": RULES, "estimator": ("mle", "fit")}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}"
                )
        if self.sample_examples < 3:
            raise ValueError(f"sample_examples must be >= 3, got {self.sample_examples}")
        if self.budget is not None and self.budget <= 0:
            raise ValueError(f"budget must be > 0, got {self.budget}")
        if self.source == "federated" and self.estimator == "fit":
            raise ValueError(
                "estimator 'fit' needs every ratio in one place; use 'mle' with source federated"
            )


class GeloraLayer(LoraLayer):
    """Plain LoRA: GeLoRA only chooses the ranks (`rank_pattern`) before injection."""

    # Never claims a PEFT file: a plain LoRA file (with any rank_pattern) reloads as "lora".
    peft_variant: ClassVar[str | None] = "cotune_gelora"


def _ids_and_mask(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, Mapping):
        ids = batch["input_ids"]
        return ids, batch.get("attention_mask", torch.ones_like(ids))
    return batch.input_ids, batch.attention_mask


@torch.no_grad()
def hidden_points(
    model: nn.Module, batches: Iterable[Any], pooling: str = "mean", max_points: int = 2048
) -> list[torch.Tensor]:
    """Per hidden-state boundary (embeddings, after block 0, ...): an [N, hidden] point cloud."""
    was = model.training
    model.eval()
    clouds: list[list[torch.Tensor]] = []
    try:
        for batch in batches:
            ids, mask = _ids_and_mask(batch)
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            m = mask.to(torch.float32)
            for i, h in enumerate(out.hidden_states):
                h = h.to(torch.float32)
                if pooling == "mean":
                    pts = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
                elif pooling == "last":
                    last = (m.sum(1).long() - 1).clamp(min=0)
                    pts = h[torch.arange(h.shape[0], device=h.device), last]
                else:
                    pts = h[mask.bool()]
                if len(clouds) <= i:
                    clouds.append([])
                # The dimension estimate is float64 work on a small cloud: on the CPU (MPS has
                # no float64), whatever device the model runs on.
                clouds[i].append(pts.cpu())
    finally:
        model.train(was)
    if not clouds:
        raise AdapterError("GeLoRA: no batches to estimate intrinsic dimensions from")
    # Token clouds can be large: a fixed stride keeps it deterministic and O(max_points²).
    return [torch.cat(c)[:: max(1, math.ceil(sum(len(t) for t in c) / max_points))] for c in clouds]


def layer_stats(
    model: nn.Module, batches: Iterable[Any], pooling: str = "mean"
) -> list[TwoNNStats]:
    """What one device computes and sends in `source: federated`: 2 numbers per boundary."""
    return [TwoNNStats.of(p) for p in hidden_points(model, batches, pooling)]


def target_paths(
    model: nn.Module, cfg: PeftSection, anatomy: Any = None, head_paths: list[str] | None = None
) -> list[str]:
    """The module paths `inject_adapters` will adapt (same matching rules)."""
    modules = dict(model.named_modules())
    heads = (
        list(head_paths) if head_paths is not None else [h for h in DEFAULT_HEADS if h in modules]
    )
    heads = heads if cfg.train_head else []
    out = [
        p for p, m in modules.items()
        if p and is_adaptable(m) and not any(p == h or p.startswith(h + ".") for h in heads)
        and any(matches_target(t, p) for t in cfg.target_modules)
    ]  # fmt: skip
    if cfg.layers is not None:
        index = anatomy.layer_of if anatomy is not None else parse_layer_index
        out = [p for p in out if index(p) in cfg.layers]
    if not out:
        raise AdapterError(
            f"GeLoRA: peft.target_modules {cfg.target_modules} match no linear module"
        )
    return out


def _in_out(module: nn.Module) -> tuple[int, int]:
    from cotune.peft.base import in_out_features

    return in_out_features(module)


def ranks_from_dimensions(
    dims: list[float],
    model: nn.Module,
    cfg: PeftSection,
    opts: GeloraOptions,
    *,
    anatomy: Any = None,
    head_paths: list[str] | None = None,
) -> dict[str, int]:
    """`{re.escape(path): rank}` for every target, from the boundary dimensions `dims` [L + 1]."""
    paths = target_paths(model, cfg, anatomy, head_paths)
    modules = dict(model.named_modules())
    n_blocks = len(dims) - 1
    if opts.rule == "max":
        block = [max(dims[i], dims[i + 1]) for i in range(n_blocks)]
    else:
        block = [max(dims[i + 1] - dims[i], 1.0) for i in range(n_blocks)]
    mean_bound = sum(block) / len(block)
    index = anatomy.layer_of if anatomy is not None else parse_layer_index
    bounds, caps, sizes = [], [], []
    for p in paths:
        i = index(p)
        bounds.append(block[i] if i is not None and 0 <= i < n_blocks else mean_bound)
        fin, fout = _in_out(modules[p])
        caps.append(min(fin, fout) - 1)
        sizes.append(fin + fout)  # parameters per unit of rank
    if opts.budget is None:
        budget = cfg.r * sum(sizes)
    else:
        budget = opts.budget * sum(sizes) if opts.budget_unit == "mean_rank" else opts.budget
    if sum(sizes) > budget:
        raise AdapterError(
            f"GeLoRA: budget {budget:g} params is below rank 1 everywhere ({sum(sizes)})"
        )

    def ranks(c: float) -> list[int]:
        return [min(cap, max(1, math.ceil(c * b))) for b, cap in zip(bounds, caps, strict=True)]

    def cost(c: float) -> int:
        return sum(r * s for r, s in zip(ranks(c), sizes, strict=True))

    # Largest scale whose ranks fit the budget (cost is monotone in c).
    lo, hi = 0.0, 1.0
    while cost(hi) <= budget and hi < 1e6 and ranks(hi) != caps:
        lo, hi = hi, hi * 2
    if cost(hi) <= budget:  # every module at its cap, or the scale limit
        lo = hi
    for _ in range(60 if lo < hi else 0):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid)
    return {re.escape(p): r for p, r in zip(paths, ranks(lo), strict=True)}


def layer_dimensions(model: nn.Module, batches: Iterable[Any], opts: GeloraOptions) -> list[float]:
    points = hidden_points(model, batches, opts.pooling)
    if opts.estimator == "fit":
        return [twonn_fit(p) for p in points]
    return [TwoNNStats.of(p).dimension() for p in points]


def gelora_rank_pattern(
    model: nn.Module,
    anatomy: Any,
    batches: Iterable[Any],
    cfg: PeftSection,
    *,
    budget: float | None = None,
    head_paths: list[str] | None = None,
) -> dict[str, int]:
    """Per-module ranks from the TwoNN dimensions of `batches` (server-side sample)."""
    opts = gelora_options(cfg, budget=budget)
    dims = layer_dimensions(model, batches, opts)
    return ranks_from_dimensions(dims, model, cfg, opts, anatomy=anatomy, head_paths=head_paths)


def gelora_options(cfg: PeftSection, **overrides: Any) -> GeloraOptions:
    raw = dict(cfg.options) if cfg.method == "gelora" else {}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    opts = get_method("gelora").parse_options(raw)
    assert isinstance(opts, GeloraOptions)
    return opts


def _batches(dataset: Any, indices: list[int], batch_size: int) -> list[Any]:
    return [dataset.batch(indices[i : i + batch_size]) for i in range(0, len(indices), batch_size)]


def gelora_peft_section(
    cfg: PeftSection,
    model: nn.Module,
    anatomy: Any,
    train_set: Any,
    parts: list[list[int]],
    *,
    seed: int,
    head_paths: list[str] | None = None,
    batch_size: int = 32,
    sim: Any = None,
) -> PeftSection:
    """The run's PeftSection with GeLoRA's `rank_pattern` (called by `build_experiment`).

    `server`: a seeded sample of the pooled training data. `federated`: each device forwards
    `ceil(sample_examples / devices)` of its own examples and reports only `(Σ log μ, N)` per
    boundary; the server adds them up (nearest neighbours are then found within each device).
    With the run's `Simulation`, the forwards are charged (round 0, label "gelora") to whoever runs
    them: the server, or each reporting device.
    """
    from cotune.sim.simulation import SERVER, device_id

    def charged(role: str, fn: Any, *args: Any) -> Any:
        if sim is None:
            return fn(*args)
        out, flops = sim.flops.run(f"gelora:{role}", fn, *args)
        sim.charge(role, flops, round=0, label="gelora")
        return out

    opts = gelora_options(cfg)
    g = torch.Generator().manual_seed(seed)
    if opts.source == "server":
        idx = torch.randperm(len(train_set), generator=g)[: opts.sample_examples].tolist()
        batches = _batches(train_set, idx, batch_size)
        dims = charged(SERVER, layer_dimensions, model, batches, opts)
    else:
        per = math.ceil(opts.sample_examples / max(1, len(parts)))
        reports = []
        for i, part in enumerate(parts):
            pick = torch.randperm(len(part), generator=g)[:per].tolist()
            if len(pick) >= 3:  # a device with fewer than 3 examples has no TwoNN ratio to send
                batches = _batches(train_set, [part[j] for j in pick], batch_size)
                reports.append(charged(device_id(i), layer_stats, model, batches, opts.pooling))
        if not reports:
            raise AdapterError("GeLoRA federated: no device holds 3 or more examples")
        dims = [TwoNNStats.combine(s).dimension() for s in zip(*reports, strict=True)]
    pattern = ranks_from_dimensions(dims, model, cfg, opts, anatomy=anatomy, head_paths=head_paths)
    return cfg.model_copy(update={"rank_pattern": pattern})
