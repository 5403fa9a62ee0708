"""BoRA (Wang et al. 2024, arXiv 2412.06441): DoRA with a magnitude per row *and* per column.

`V = W + s·BA` [out, in]. Default order ("col_first", the reference notes' proposal):
`H = m_c ⊙ V / ‖V‖_col`, `W' = m_r ⊙ H / ‖H‖_row`. The other order ("row_first", as the third-party
GLoKr adapter): `H = m_r ⊙ V / ‖V‖_row`, `W' = m_c ⊙ H / ‖H‖_col`. Either way
`W' = diag(d_r) · V · diag(d_c)`, so `y = d_r ⊙ ((x ⊙ d_c) Vᵀ) + b` and the merge is exact.

No PEFT equivalent: saved in PEFT's layout with `peft_type: "COTUNE_BORA"` (stock PEFT refuses the
unknown type) and keys `<module>.lora_magnitude_row` [out], `<module>.lora_magnitude_col` [in].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from cotune.errors import AdapterError
from cotune.peft.base import LayerSpec
from cotune.peft.lora import LoraLayer, LoraOptions

ORDERS = ("col_first", "row_first")


@dataclass(frozen=True)
class BoraOptions(LoraOptions):
    # The paper's equation was not available: which axis is normalised first is a choice.
    order: str = "col_first"
    # Treat both norms as constants in backward, as DoRA does (saves an [out, in] graph per layer).
    detach_norms: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {list(ORDERS)}, got {self.order!r}")


class BoraLayer(LoraLayer):
    """Parameters: `lora_A.weight`, `lora_B.weight`, `lora_magnitude_row` [out], `lora_magnitude_col` [in]."""

    peft_type: ClassVar[str | None] = "COTUNE_BORA"

    def __init__(self, base_layer: nn.Module, spec: LayerSpec) -> None:
        super().__init__(base_layer, spec)
        opts = spec.options if isinstance(spec.options, BoraOptions) else BoraOptions()
        self.order, self.detach_norms = opts.order, opts.detach_norms
        with torch.no_grad():
            v = self._v(self.base_weight_oi())
            # The norms of V itself: the first factor is then exactly 1, so the second is too and W' = V.
            self.lora_magnitude_row = nn.Parameter(torch.linalg.norm(v, dim=1))
            self.lora_magnitude_col = nn.Parameter(torch.linalg.norm(v, dim=0))
        self._merge_factors: tuple[torch.Tensor, torch.Tensor] | None = None

    def lora_delta_weight(self) -> torch.Tensor:
        return super().delta_weight()

    def _v(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.to(self.lora_A.weight.dtype) + self.lora_delta_weight()

    def factors(self, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(d_r [out], d_c [in])` with `W' = d_r[:, None] · V · d_c[None, :]`."""
        w = self.base_weight_oi() if weight is None else weight
        m_r, m_c = self.lora_magnitude_row, self.lora_magnitude_col
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_norms):
            v = self._v(w)
            if self.order == "col_first":
                n_c = torch.linalg.norm(v, dim=0)
                n_r = torch.linalg.norm(v * (m_c / n_c), dim=1)
            else:
                n_r = torch.linalg.norm(v, dim=1)
                n_c = torch.linalg.norm((m_r / n_r)[:, None] * v, dim=0)
        return m_r / n_r, m_c / n_c

    def _bora_out(self, x: torch.Tensor) -> torch.Tensor:
        d_r, d_c = self.factors()
        dtype = self.lora_A.weight.dtype
        xs = x.to(dtype) * d_c
        wx = F.linear(xs, self.base_weight_oi().to(dtype))
        # Dropout on the low-rank branch only, as LoRA; in eval this is exactly x W'ᵀ.
        y = (wx + self.lora_B(self.lora_A(self.lora_dropout(xs))) * self.scaling) * d_r
        bias = self.base_layer.bias
        return y if bias is None else y + bias.to(dtype)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_forward(x)
        return self._bora_out(x).to(self.base_output_dtype(x))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self._bora_out(x) - self.base_forward(x).to(self.lora_A.weight.dtype)

    def delta_weight(self) -> torch.Tensor:
        """`W' − W` (full rank in general: `D_r W D_c − W` plus the low-rank part)."""
        w = self.base_weight_oi()
        d_r, d_c = self.factors(w)
        return d_r[:, None] * self._v(w) * d_c[None, :] - w.to(d_r.dtype)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        d_r, d_c = (d.detach() for d in self.factors(weight))
        self._merge_factors = (d_r, d_c)  # for unmerge: they depend on the unmerged weight
        return (d_r[:, None] * self._v(weight) * d_c[None, :]).to(weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        f = self._merge_factors
        if f is None or bool((f[0] == 0).any() or (f[1] == 0).any()):
            raise AdapterError(
                f"{self.path}: cannot unmerge BoRA (no merge factors, or a zero magnitude)"
            )
        self._merge_factors = None
        v = weight / (f[0][:, None] * f[1][None, :]).to(weight.dtype)
        return v - self.lora_delta_weight().to(weight.dtype)

    @classmethod
    def peft_config_fields(cls, options: Any) -> dict[str, Any]:
        opts = options if isinstance(options, BoraOptions) else BoraOptions()
        bora = {"order": opts.order, "detach_norms": opts.detach_norms}
        return {**super().peft_config_fields(opts), "bora_config": bora}

    @classmethod
    def options_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        bora = config.get("bora_config") or {}
        out = super().options_from_peft(config)
        out.update({k: bora[k] for k in ("order", "detach_norms") if k in bora})
        return out
