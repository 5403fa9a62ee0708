"""MoSLD (Zhao et al., COLING 2025, arXiv 2412.08946): a mixture of LoRA experts sharing one A.

`z = s · A · drop(x)` (one `A ∈ R^{r×in}` per layer, shared by every expert), `g = TopK(softmax(W_g x))`,
`y = W x + b + Σ_i g_i · B_i z`. Experts `B_i ∈ R^{out×r}` start at zero (identity at init); the
router `W_g ∈ R^{E×in}` starts at zero (uniform gates). Dropout acts on the shared branch: on its
input (`dropout_mode: input`, default) or DropConnect on `A` itself (`weight`).

Not mergeable (the gates depend on the input). Saved in PEFT's layout with `peft_type:
"COTUNE_MOSLD"`, `mosld_config` and tensors `<module>.lora_A.weight` [r, in], `.lora_B.weight`
[E, out, r], `.lora_router.weight` [E, in]; stock PEFT refuses the unknown type.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from cotune.errors import AdapterError
from cotune.peft.base import AdapterLayer, LayerSpec

MOSLD_STAGES = ("joint", "experts", "router")


def topk_gates(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Softmax gates with all but the `top_k` largest set to 0 (dense when `top_k` is 0 or ≥ E)."""
    g = torch.softmax(logits, dim=-1)
    if 0 < top_k < g.shape[-1]:
        vals, idx = g.topk(top_k, dim=-1)
        g = torch.zeros_like(g).scatter(-1, idx, vals)
    return g


def balance_loss(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-Transformer load balancing `E · Σ_i f_i · P_i` over every token position.

    `f_i`: share of the routing slots that went to expert i (the top-k picks; the argmax for a
    dense mixture), not differentiable; `P_i`: mean router probability of i, which carries the
    gradient. Equals 1 for a perfectly balanced router and grows towards E as it collapses.
    """
    probs = torch.softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
    e = probs.shape[-1]
    k = top_k if 0 < top_k < e else 1
    picked = torch.zeros_like(probs).scatter(-1, probs.detach().topk(k, dim=-1).indices, 1.0)
    f = picked.mean(0) / k
    return e * (f * probs.mean(0)).sum()


class BalancedRouterMixin:
    """Keeps the latest training forward's balance loss and hands it out once through
    `regularization_loss`, so every paradigm's training loop adds it to the task loss."""

    balance_coef: float = 0.0
    _balance: torch.Tensor | None = None

    @property
    def reg_from_forward(self) -> bool:
        """The regularizer depends on the last forward's inputs (row-grouped runs, which
        forward several roles' rows at once, must not use it)."""
        return self.balance_coef > 0

    def track_balance(self, router: nn.Linear, logits: torch.Tensor) -> None:
        self._balance = None
        active = self.training and torch.is_grad_enabled() and router.weight.requires_grad  # type: ignore[attr-defined]
        if self.balance_coef > 0 and active:
            self._balance = self.balance_coef * balance_loss(logits, self.top_k)  # type: ignore[attr-defined]

    def regularization_loss(self) -> torch.Tensor | None:
        # Read once: a layer skipped in a later forward must not hand back a freed graph.
        loss, self._balance = self._balance, None
        return loss


def check_balance(coef: float) -> None:
    if not isinstance(coef, (int, float)) or coef < 0:
        raise ValueError(f"balance_coef must be a number >= 0 (0 = off), got {coef!r}")


def check_moe(num_experts: int, top_k: int, stage: str, stages: Iterable[str]) -> None:
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = all experts), got {top_k}")
    if stage not in stages:
        raise ValueError(f"stage must be one of {list(stages)}, got {stage!r}")


class ExpertStack(nn.Module):
    """`weight` [E, out, r]: the per-expert B matrices as one tensor."""

    def __init__(self, e: int, out: int, r: int, *, device: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(e, out, r, device=device, dtype=dtype))


@dataclass(frozen=True)
class MosldOptions:
    num_experts: int = 4
    top_k: int = 2
    shared_dropout: float | None = None  # None: peft.dropout
    dropout_mode: str = "input"  # "input": dropout(x) before A; "weight": DropConnect on A
    stage: str = "joint"  # joint: everything; experts: A and B_i; router: W_g only
    balance_coef: float = 0.01  # Switch-style load-balancing loss weight while the router trains

    def __post_init__(self) -> None:
        check_moe(self.num_experts, self.top_k, self.stage, MOSLD_STAGES)
        check_balance(self.balance_coef)
        if self.dropout_mode not in ("input", "weight"):
            raise ValueError(f"dropout_mode must be 'input' or 'weight', got {self.dropout_mode!r}")
        if self.shared_dropout is not None and not 0.0 <= self.shared_dropout < 1.0:
            raise ValueError(f"shared_dropout must be in [0, 1), got {self.shared_dropout}")


class StagedMixin:
    """Stage → which parameter-name prefixes train; `set_stage` flips `requires_grad`."""

    stage_params: ClassVar[dict[str, tuple[str, ...]]] = {}
    stage: str

    def set_stage(self, stage: str, **options: Any) -> None:
        if options:
            raise AdapterError(
                f"set_stage: unknown option(s) {sorted(options)} for {self.method!r}"
            )  # type: ignore[attr-defined]
        if stage not in self.stage_params:
            raise AdapterError(f"stage must be one of {list(self.stage_params)}, got {stage!r}")
        self.stage = stage
        self.set_trainable()

    def set_trainable(self) -> None:
        train = self.stage_params[self.stage]
        for name, p in self.adapter_named_parameters():  # type: ignore[attr-defined]
            p.requires_grad_(name.startswith(train))

    def delta_weight(self) -> torch.Tensor:
        raise AdapterError(
            f"{self.path}: {self.method!r} has input-dependent gates; it has no single weight update"  # type: ignore[attr-defined]
        )


class MosldLayer(BalancedRouterMixin, StagedMixin, AdapterLayer):
    mergeable: ClassVar[bool] = False
    peft_type: ClassVar[str | None] = "COTUNE_MOSLD"
    peft_variant: ClassVar[str | None] = "mosld_config"
    stage_params: ClassVar[dict[str, tuple[str, ...]]] = {
        "joint": ("lora_A.", "lora_B.", "lora_router."),
        "experts": ("lora_A.", "lora_B."),
        "router": ("lora_router.",),
    }

    def __init__(self, base_layer: nn.Module, spec: LayerSpec) -> None:
        super().__init__(base_layer, spec)
        opts = spec.options if isinstance(spec.options, MosldOptions) else MosldOptions()
        self.r, self.top_k, self.stage = spec.r, opts.top_k, opts.stage
        self.balance_coef = float(opts.balance_coef)
        self.scaling = spec.alpha / math.sqrt(spec.r) if spec.use_rslora else spec.alpha / spec.r
        p = spec.dropout if opts.shared_dropout is None else opts.shared_dropout
        self.dropout_mode, self.p = opts.dropout_mode, p
        self.lora_dropout = (
            nn.Dropout(p) if p > 0 and opts.dropout_mode == "input" else nn.Identity()
        )
        w = base_layer.weight
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A = nn.Linear(self.in_features, spec.r, bias=False, device=w.device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        self.lora_B = ExpertStack(
            opts.num_experts, self.out_features, spec.r, device=w.device, dtype=dtype
        )
        self.lora_router = nn.Linear(
            self.in_features, opts.num_experts, bias=False, device=w.device, dtype=dtype
        )
        nn.init.zeros_(self.lora_router.weight)  # uniform gates at init

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.weight.dtype)
        a = self.lora_A.weight
        if self.dropout_mode == "weight" and self.training and self.p > 0:
            a = F.dropout(a, self.p)  # DropConnect: damps A's update, fed by every expert
        z = F.linear(self.lora_dropout(x), a) * self.scaling  # [..., r]
        logits = self.lora_router(x)
        g = topk_gates(logits, self.top_k)  # [..., E]
        self.track_balance(self.lora_router, logits)
        b = self.lora_B.weight  # [E, out, r] -> [out, E·r]; one matmul for all experts
        mixed = (g[..., :, None] * z[..., None, :]).flatten(-2)
        return F.linear(mixed, b.permute(1, 0, 2).reshape(b.shape[1], -1))

    @classmethod
    def peft_config_fields(cls, options: Any) -> dict[str, Any]:
        opts = options if isinstance(options, MosldOptions) else MosldOptions()
        return {"mosld_config": dataclasses.asdict(opts)}

    @classmethod
    def options_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        return dict(config.get("mosld_config") or {})
