"""DoRA (Liu et al. 2024): `W' = m ⊙ V / ‖V‖_row`, `V = W + s·BA`, with the norm detached.

`m ∈ R^out` is one magnitude per output row (the paper's "column-wise" norm in its `xW` layout).
Saved as PEFT 0.21 does: `use_dora: true` and a `<module>.lora_magnitude_vector` tensor.
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


@dataclass(frozen=True)
class DoraOptions(LoraOptions):
    """Same init choices as LoRA; the magnitude always starts at the row norms of `W + s·BA`."""


class DoraLayer(LoraLayer):
    """Parameters: `lora_A.weight`, `lora_B.weight` and `lora_magnitude_vector` [out]."""

    peft_variant: ClassVar[str | None] = "use_dora"

    def __init__(self, base_layer: nn.Module, spec: LayerSpec) -> None:
        super().__init__(base_layer, spec)
        # m = ‖W + s·BA‖_row makes W' = W + s·BA at init (= W with the default B = 0).
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm())
        self._merge_scale: torch.Tensor | None = None

    def lora_delta_weight(self) -> torch.Tensor:
        """`s·BA` as [out, in] (the direction update, before the magnitude rescaling)."""
        return super().delta_weight()

    @torch.no_grad()
    def weight_norm(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Row norms of `V = W + s·BA`, without gradient (paper §4.3: treated as a constant)."""
        w = self.base_weight_oi() if weight is None else weight
        v = w.to(self.lora_A.weight.dtype) + self.lora_delta_weight()
        return torch.linalg.norm(v, dim=1)

    def magnitude_scale(self) -> torch.Tensor:
        """`m / ‖V‖_row` per output row; differentiable in `m` only."""
        return self.lora_magnitude_vector / self.weight_norm()

    def _dora_term(self, x: torch.Tensor, base_out: torch.Tensor | None) -> torch.Tensor:
        """`W'x − Wx` = `(m/‖V‖ − 1)·Wx + (m/‖V‖)·s·BAx`, reusing the base output when given."""
        dtype = self.lora_A.weight.dtype
        xa = x.to(dtype)
        scale = self.magnitude_scale()
        dropout_on = self.training and not isinstance(self.lora_dropout, nn.Identity)
        if base_out is None or dropout_on:
            # As PEFT: with dropout, both DoRA terms see the dropped-out input (the base keeps x).
            xa = self.lora_dropout(xa)
            wx = F.linear(xa, self.base_weight_oi().to(dtype))
        else:
            bias = self.base_layer.bias
            wx = base_out.to(dtype) if bias is None else base_out.to(dtype) - bias.to(dtype)
        lora = self.lora_B(self.lora_A(xa)) * self.scaling
        return (scale - 1) * wx + scale * lora

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self._dora_term(x, None)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        if self.merged:
            return y
        # Not in place: the gradient of m needs the base product.
        return y + self._dora_term(x, y).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """`W' − W` (full rank in general)."""
        w = self.base_weight_oi().to(self.lora_A.weight.dtype)
        scale = self.magnitude_scale()[:, None]
        return (scale - 1) * w + scale * self.lora_delta_weight()

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        scale = (self.lora_magnitude_vector / self.weight_norm(weight)).detach()
        # Kept for unmerge: the norm belongs to the unmerged weight and cannot be read back after.
        self._merge_scale = scale
        v = weight + self.lora_delta_weight().to(weight.dtype)
        return scale.to(weight.dtype)[:, None] * v

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        scale = self._merge_scale
        if scale is None or bool((scale == 0).any()):
            raise AdapterError(
                f"{self.path}: cannot unmerge DoRA (no merge scale, or a zero magnitude)"
            )
        self._merge_scale = None
        return weight / scale.to(weight.dtype)[:, None] - self.lora_delta_weight().to(weight.dtype)

    @classmethod
    def peft_config_fields(cls, options: Any) -> dict[str, Any]:
        return {**super().peft_config_fields(options), "use_dora": True}
