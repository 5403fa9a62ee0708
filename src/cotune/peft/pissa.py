"""PiSSA (Meng et al. 2024) and OLoRA (Büyükakyüz 2024): LoRA whose A, B start on W's principal part.

PiSSA: `W = U S Vᵀ`, `B₀ = U_r √(S_r/s)`, `A₀ = √(S_r/s) V_rᵀ` (exact SVD, or PEFT's `pissa_niter_k`
randomised SVD with `niter=k`). OLoRA: `W = QR`, `B₀ = Q[:, :r]`, `A₀ = R[:r]`. Both then train plain
LoRA on the residual base `W_res = W − s·B₀A₀`, which replaces W in memory (identical on every device,
since every device starts from the same init).

Saved as a plain rank-2r LoRA on the *unmodified* base (PEFT's `path_initial_model_for_weight_conversion`):
`W_res + s·BA = W + s·[B | −B₀][A; A₀]`, with r and alpha doubled (alpha·√2 under rsLoRA) so s is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from cotune.peft.base import LayerSpec
from cotune.peft.lora import LoraLayer


@dataclass(frozen=True)
class PissaOptions:
    # None: exact SVD ("pissa"); k: torch.svd_lowrank with k subspace iterations ("pissa_niter_k").
    niter: int | None = None

    def __post_init__(self) -> None:
        if self.niter is not None and (not isinstance(self.niter, int) or self.niter < 0):
            raise ValueError(f"niter must be null or an integer >= 0, got {self.niter!r}")


class PissaLayer(LoraLayer):
    """LoRA parameters (`lora_A.weight`, `lora_B.weight`) plus non-saved buffers holding the init A₀, B₀."""

    # PEFT files this class reads: init_lora_weights="pissa" (PEFT redoes the SVD on load, so do we).
    peft_variant: ClassVar[str | None] = "init_lora_weights"
    peft_init: ClassVar[str] = "pissa"
    peft_rank_factor: ClassVar[int] = 2

    lora_A0: torch.Tensor
    lora_B0: torch.Tensor

    def __init__(self, base_layer: nn.Module, spec: LayerSpec) -> None:
        super().__init__(
            base_layer, spec
        )  # builds A, B in PEFT's RNG order; reset_adapter is a no-op
        w = self.base_weight_oi().detach().to(torch.float32)
        b0, a0 = self.principal_factors(w, spec.options)
        dtype = self.lora_A.weight.dtype
        with torch.no_grad():
            self.lora_A.weight.copy_(a0.to(dtype))
            self.lora_B.weight.copy_(b0.to(dtype))
            self._write_base((w - self.scaling * (b0 @ a0)).to(w.dtype))
        # Not state: re-created identically by every injection, and only needed for the export.
        self.register_buffer("lora_A0", a0.to(dtype).clone(), persistent=False)
        self.register_buffer("lora_B0", b0.to(dtype).clone(), persistent=False)

    def reset_adapter(self, init: bool | str = True) -> None:
        """No random init: A and B come from the base weight."""

    def principal_factors(self, w: torch.Tensor, options: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(B₀ [out, r], A₀ [r, in]) with `s·B₀A₀` = the top-r SVD part of `w` (fp32)."""
        niter = options.niter if isinstance(options, PissaOptions) else None
        if niter is None:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            u, s, vh = u[:, : self.r], s[: self.r], vh[: self.r]
        else:
            u, s, v = torch.svd_lowrank(w, self.r, niter=niter)
            vh = v.T
        root = torch.sqrt(s / self.scaling)
        return u * root, root[:, None] * vh

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        # ΔW vs the original base = s·(BA − B₀A₀), written as one rank-2r LoRA.
        return {
            "lora_A.weight": torch.cat([self.lora_A.weight, self.lora_A0], dim=0),
            "lora_B.weight": torch.cat([self.lora_B.weight, -self.lora_B0], dim=1),
        }

    @classmethod
    def peft_claims(cls, config: dict[str, Any]) -> bool:
        return config.get("init_lora_weights") == cls.peft_init

    @classmethod
    def peft_config_fields(cls, options: Any) -> dict[str, Any]:
        return {"init_lora_weights": True}  # the export is a plain LoRA

    @classmethod
    def options_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        return {}


class OloraLayer(PissaLayer):
    """OLoRA: the same as PiSSA with a QR factorisation in place of the SVD."""

    peft_init: ClassVar[str] = "olora"

    def principal_factors(self, w: torch.Tensor, options: Any) -> tuple[torch.Tensor, torch.Tensor]:
        q, r = torch.linalg.qr(w)
        return q[:, : self.r], r[: self.r]
