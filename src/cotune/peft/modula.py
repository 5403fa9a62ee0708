"""MoDULA (Ma et al., EMNLP 2024, arXiv 2412.07405): a universal LoRA expert + domain experts + router.

`E_u(x) = s·B_u A_u x` (`lora_A`, `lora_B`: a plain LoRA), `E_i(x) = s·B_i A_i x` for domains
i = 1..N (`lora_domain.<i>.lora_A/B`), router `W_g` (`lora_router`), `g = TopK(softmax(W_g x))`:

- MoDULA-Res  (`variant: res`):  `y = W x + E_u(x) + Σ_i g_i E_i(x)`, g over the N domain experts;
- MoDULA-Flan (`variant: flan`): `y = W x + Σ_j g_j E_j(x)`, g over {universal} ∪ domains (index 0 = u).

Three training stages (`stage` option, or `AdapterSet.set_stage`), each training only its part:
`universal` (E_u alone in the forward), `domain` (expert `domain` alone, plus E_u in Res; the
gate is one-hot on it; across devices of several domains each example goes through its own
domain's expert, `domain_ids`), `router` (all experts frozen, the router mixes them; also
inference; a load-balancing loss, `balance_coef`, joins the training loss). `peft.stages`
chains the three in one run (`cotune.stages`). All B start at zero and the router at zero (uniform gates): identity at init. Not mergeable.
Saved as `peft_type: "COTUNE_MODULA"` with `modula_config`; stock PEFT refuses the unknown type.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from cotune.errors import AdapterError
from cotune.models.packing import per_token
from cotune.peft.base import AdapterLayer, LayerSpec
from cotune.peft.mosld import (
    BalancedRouterMixin,
    StagedMixin,
    check_balance,
    check_moe,
    topk_gates,
)

MODULA_STAGES = ("universal", "domain", "router")
_EXPERT = re.compile(r"(?:^|\.)lora_domain\.(\d+)\.")


def expert_index(name: str) -> int | None:
    """The domain expert a parameter name belongs to (None: universal, router, head, ...)."""
    m = _EXPERT.search(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class ModulaOptions:
    num_experts: int = 2  # domain experts
    variant: str = "res"
    top_k: int = 1  # 0: dense mixture
    stage: str = "universal"
    domain: int = 0  # the expert trained in the "domain" stage
    balance_coef: float = 0.01  # Switch-style load-balancing loss weight in the router stage

    def __post_init__(self) -> None:
        check_moe(self.num_experts, self.top_k, self.stage, MODULA_STAGES)
        check_balance(self.balance_coef)
        if self.variant not in ("res", "flan"):
            raise ValueError(f"variant must be 'res' or 'flan', got {self.variant!r}")
        if not 0 <= self.domain < self.num_experts:
            raise ValueError(f"domain must be in [0, num_experts), got {self.domain}")


class _Lora(nn.Module):
    """One LoRA expert: `lora_A` kaiming-uniform, `lora_B` zero."""

    def __init__(self, fin: int, fout: int, r: int, *, device: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.lora_A = nn.Linear(fin, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, fout, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor, scaling: float) -> torch.Tensor:
        return self.lora_B(self.lora_A(x) * scaling)


class ModulaLayer(BalancedRouterMixin, StagedMixin, AdapterLayer):
    mergeable: ClassVar[bool] = False
    peft_type: ClassVar[str | None] = "COTUNE_MODULA"
    peft_variant: ClassVar[str | None] = "modula_config"
    stage_params: ClassVar[dict[str, tuple[str, ...]]] = {
        "universal": ("lora_A.", "lora_B."),
        "domain": ("lora_domain.",),  # narrowed to one expert in set_trainable
        "router": ("lora_router.",),
    }

    def __init__(self, base_layer: nn.Module, spec: LayerSpec) -> None:
        super().__init__(base_layer, spec)
        opts = spec.options if isinstance(spec.options, ModulaOptions) else ModulaOptions()
        self.r, self.top_k, self.stage = spec.r, opts.top_k, opts.stage
        self.variant, self.domain = opts.variant, opts.domain
        self.balance_coef = float(opts.balance_coef)
        # Domain stage across devices: the experts that train, and each example's expert
        # (set per batch by `route_domains`); None: expert `domain` alone, as in one-domain runs.
        self.trainable_domains: tuple[int, ...] = (opts.domain,)
        self.domain_ids: torch.Tensor | None = None
        self.scaling = spec.alpha / math.sqrt(spec.r) if spec.use_rslora else spec.alpha / spec.r
        self.lora_dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        w = base_layer.weight
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        kw = {"device": w.device, "dtype": dtype}
        universal = _Lora(self.in_features, self.out_features, spec.r, **kw)
        self.lora_A, self.lora_B = universal.lora_A, universal.lora_B  # PEFT's names: a plain LoRA
        self.lora_domain = nn.ModuleList(
            _Lora(self.in_features, self.out_features, spec.r, **kw)
            for _ in range(opts.num_experts)
        )
        n_gates = opts.num_experts + (1 if opts.variant == "flan" else 0)
        self.lora_router = nn.Linear(self.in_features, n_gates, bias=False, **kw)
        nn.init.zeros_(self.lora_router.weight)

    def _check_domain(self, domain: int) -> None:
        if not 0 <= domain < len(self.lora_domain):
            raise AdapterError(f"domain must be in [0, {len(self.lora_domain)}), got {domain}")

    def set_stage(self, stage: str, *, domain: int | None = None) -> None:
        if domain is not None:
            self._check_domain(domain)
            self.domain = domain
        self.trainable_domains = (self.domain,)
        super().set_stage(stage)

    def train_domains(self, domains: tuple[int, ...]) -> None:
        """Domain stage over several domains at once (devices of different domains): these
        experts train, each on the examples routed to it (`domain_ids`)."""
        for d in domains:
            self._check_domain(d)
        self.trainable_domains = tuple(domains)
        self.set_trainable()

    def set_trainable(self) -> None:
        super().set_trainable()
        if self.stage == "domain":  # only the chosen domains' experts learn
            for i, expert in enumerate(self.lora_domain):
                expert.requires_grad_(i in self.trainable_domains)

    def _universal(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(x) * self.scaling)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        if self.stage == "universal":
            return self._universal(x)
        if self.stage == "domain":
            out = self._domain_experts(x)
            return out + self._universal(x) if self.variant == "res" else out
        logits = self.lora_router(x)
        g = topk_gates(logits, self.top_k)
        self.track_balance(self.lora_router, logits)
        experts = [e(x, self.scaling) for e in self.lora_domain]
        if self.variant == "flan":
            experts = [self._universal(x), *experts]
        mixed = torch.stack(experts, dim=-1) @ g[..., None]  # [..., out, E] @ [..., E, 1]
        out = mixed.squeeze(-1)
        return out + self._universal(x) if self.variant == "res" else out

    def _domain_experts(self, x: torch.Tensor) -> torch.Tensor:
        """One-hot gate per example: each example goes through its own domain's expert only,
        so an expert gets gradient from its domain's examples alone."""
        # (A padding-free block's x is its real tokens [N, D]: each token takes its row's id.)
        ids = None if self.domain_ids is None else per_token(x, self.domain_ids)
        if ids is None:
            return self.lora_domain[self.domain](x, self.scaling)
        present = torch.unique(ids).tolist()
        if len(present) == 1:  # a device's batch: one domain, no masking
            return self.lora_domain[present[0]](x, self.scaling)
        out = torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)
        for d in present:
            mask = (ids == d).to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
            out = out + mask * self.lora_domain[d](x, self.scaling)
        return out

    @classmethod
    def peft_config_fields(cls, options: Any) -> dict[str, Any]:
        opts = options if isinstance(options, ModulaOptions) else ModulaOptions()
        return {"modula_config": dataclasses.asdict(opts)}

    @classmethod
    def options_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        return dict(config.get("modula_config") or {})
