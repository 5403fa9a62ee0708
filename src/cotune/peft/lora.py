"""LoRA (Hu et al. 2021): `y = W x + s · B A dropout(x)`, `s = alpha / r` (rsLoRA: `alpha / sqrt(r)`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from cotune.peft.base import AdapterLayer, LayerSpec


@dataclass(frozen=True)
class LoraOptions:
    # PEFT's init_lora_weights: True (A kaiming-uniform, B zero), "gaussian" (A ~ N(0, 1/r), B zero),
    # False (A and B keep nn.Linear's default init, so the adapter is non-zero from the start).
    init_lora_weights: bool | str = True

    def __post_init__(self) -> None:
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"init_lora_weights must be true, false or 'gaussian', got {self.init_lora_weights!r}"
            )


class LoraLayer(AdapterLayer):
    """Parameters: `lora_A.weight` [r, in], `lora_B.weight` [out, r] (PEFT's names minus the adapter name)."""

    peft_type: ClassVar[str | None] = "LORA"

    def __init__(self, base_layer: nn.Module, spec: LayerSpec) -> None:
        super().__init__(base_layer, spec)
        self.r = spec.r
        self.alpha = spec.alpha
        self.scaling = spec.alpha / math.sqrt(spec.r) if spec.use_rslora else spec.alpha / spec.r
        self.lora_dropout: nn.Module = (
            nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        )
        w = base_layer.weight
        # Like PEFT, keep adapters in float32 when the base is half precision (stable updates).
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        # Built in the same order as PEFT (A, B, then re-init of A) so a shared seed gives the same init.
        self.lora_A = nn.Linear(self.in_features, spec.r, bias=False, device=w.device, dtype=dtype)
        self.lora_B = nn.Linear(spec.r, self.out_features, bias=False, device=w.device, dtype=dtype)
        opts = spec.options if isinstance(spec.options, LoraOptions) else LoraOptions()
        self.reset_adapter(opts.init_lora_weights)

    @torch.no_grad()
    def reset_adapter(self, init: bool | str = True) -> None:
        if init is False:
            return
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.weight.dtype)
        # Scale the rank-r intermediate rather than the output: r values per token instead of `out`.
        return self.lora_B(self.lora_A(self.lora_dropout(x)) * self.scaling)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def grouped_delta(
        self, x: torch.Tensor, rows: list[int], tensors: list[Mapping[str, torch.Tensor]]
    ) -> torch.Tensor | None:
        """A cohort's deltas in two batched matmuls over stacked per-group A and B (equal
        groups, no dropout, plain LoRA): 2 kernels and 2 backward nodes instead of 2 per group,
        which is most of a small cohort's overhead on a CPU."""
        if (
            type(self).delta is not LoraLayer.delta
            or len(set(rows)) != 1
            or not isinstance(self.lora_dropout, nn.Identity)
            or any(set(t) != {"lora_A.weight", "lora_B.weight"} for t in tensors)
        ):
            return None
        a = torch.stack([t["lora_A.weight"] for t in tensors])  # [G, r, in]
        b = torch.stack([t["lora_B.weight"] for t in tensors])  # [G, out, r]
        xs = x.to(a.dtype).reshape(len(rows), -1, x.shape[-1])  # group i's rows, flattened
        h = torch.bmm(xs, a.transpose(1, 2)) * self.scaling
        return torch.bmm(h, b.transpose(1, 2)).reshape(*x.shape[:-1], -1)

    @classmethod
    def peft_config_fields(cls, options: Any) -> dict[str, Any]:
        opts = options if isinstance(options, LoraOptions) else LoraOptions()
        return {"init_lora_weights": opts.init_lora_weights}

    @classmethod
    def options_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        # The init only matters before training; saved weights overwrite it on load.
        init = config.get("init_lora_weights", True)
        return {"init_lora_weights": init} if init in (True, False, "gaussian") else {}
