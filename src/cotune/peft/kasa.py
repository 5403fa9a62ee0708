"""KaSA (Wang et al. 2024, arXiv 2412.06071): SVD-truncated base + `ΔW = s·B diag(σ) A`.

At injection the `r` smallest singular components of `W` are dropped (`W_world`, the new frozen base;
`k = min(in, out)` as PEFT 0.21 does). The update has learnable singular values `lora_diag` (σ).
`regularization_loss() = β·Σσ² + γ·(‖BᵀB − I‖_F + ‖AAᵀ − I‖_F)` (paper Eq. 9-11 in PEFT's form).
Saved as PEFT 0.21's KaSA variant: `kasa_config: {beta, gamma}` and a `<module>.lora_diag` tensor;
PEFT repeats the (deterministic) truncation on load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from cotune.errors import AdapterError
from cotune.peft.base import LayerSpec
from cotune.peft.lora import LoraLayer, LoraOptions


@dataclass(frozen=True)
class KasaOptions(LoraOptions):
    beta: float = 1e-4  # weight of Σσ² (PEFT's KasaConfig default, the reference GLUE value)
    gamma: float = 1e-3  # weight of the orthogonality terms

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 0 or self.gamma < 0:
            raise ValueError(
                f"beta and gamma must be >= 0, got beta={self.beta}, gamma={self.gamma}"
            )


@torch.no_grad()
def truncate_smallest(weight: torch.Tensor, r: int) -> torch.Tensor:
    """`weight` [out, in] without its `r` smallest singular components (fp32 SVD, as PEFT)."""
    k = min(weight.shape)
    if r >= k:
        raise AdapterError(
            f"KaSA needs r < min(in, out) = {k} to keep a singular component, got r = {r}"
        )
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    kept = k - r
    return ((u[:, :kept] * s[:kept]) @ vh[:kept]).to(weight.dtype)


class KasaLayer(LoraLayer):
    """Parameters: `lora_A.weight`, `lora_B.weight`, `lora_diag` [r]. Rewrites the base weight at init."""

    peft_variant: ClassVar[str | None] = "kasa_config"

    def __init__(self, base_layer: nn.Module, spec: LayerSpec) -> None:
        super().__init__(base_layer, spec)  # A, B first: the same RNG order as PEFT
        opts = spec.options if isinstance(spec.options, KasaOptions) else KasaOptions()
        self.beta, self.gamma = opts.beta, opts.gamma
        a = self.lora_A.weight
        # σ ~ N(0, 1) as the reference and PEFT; ΔW = 0 at init anyway since B = 0.
        self.lora_diag = nn.Parameter(torch.randn(self.r, device=a.device, dtype=a.dtype))
        # Destructive and deterministic: every device truncates the shared base the same way.
        self._write_base(truncate_smallest(self.base_weight_oi(), self.r))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.weight.dtype)
        # diag(σ) is an elementwise scale of the rank-r intermediate.
        return self.lora_B(self.lora_A(self.lora_dropout(x)) * (self.lora_diag * self.scaling))

    def delta_weight(self) -> torch.Tensor:
        return ((self.lora_B.weight * self.lora_diag) @ self.lora_A.weight) * self.scaling

    def regularization_loss(self) -> torch.Tensor | None:
        if self.beta == 0 and self.gamma == 0:
            return None
        a, b, d = self.lora_A.weight.float(), self.lora_B.weight.float(), self.lora_diag.float()
        eye = torch.eye(self.r, device=d.device)
        # r×r Gram matrices (paper / PEFT); the reference code's in×in / out×out form has the same minimiser.
        orth = torch.linalg.norm(b.T @ b - eye) + torch.linalg.norm(a @ a.T - eye)
        return self.beta * (d**2).sum() + self.gamma * orth

    @classmethod
    def peft_config_fields(cls, options: Any) -> dict[str, Any]:
        opts = options if isinstance(options, KasaOptions) else KasaOptions()
        return {
            **super().peft_config_fields(opts),
            "kasa_config": {"beta": opts.beta, "gamma": opts.gamma},
        }

    @classmethod
    def options_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        kasa = config.get("kasa_config") or {}
        out = super().options_from_peft(config)
        out.update({k: float(kasa[k]) for k in ("beta", "gamma") if k in kasa})
        return out
