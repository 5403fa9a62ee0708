"""LoRA (Hu et al. 2021): `y = W x + s · B A dropout(x)`, `s = alpha / r` (rsLoRA: `alpha / sqrt(r)`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from cotune.errors import AdapterError
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


#: Module names that are fused projections (several outputs in one matrix): GPT-2, Phi,
#: Falcon/BLOOM, MPT, Baichuan.
FUSED_MODULES = ("c_attn", "qkv_proj", "query_key_value", "Wqkv", "W_pack")


@dataclass(frozen=True)
class PlainLoraOptions(LoraOptions):
    """`lora`'s options: LoRA's, plus loralib's MergedLinear form for fused projections."""

    # loralib's enable_lora, e.g. [true, false, true]: on a fused projection (fused_modules) the
    # output splits into len(enable_lora) equal parts and only the enabled ones get an adapter,
    # each its own rank r (SplitLoRA's GPT-2 code: q and v of c_attn, not k). Null: the whole
    # projection gets one rank-r adapter.
    enable_lora: tuple[bool, ...] | None = None
    fused_modules: tuple[str, ...] = FUSED_MODULES

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.enable_lora is not None:
            parts = tuple(bool(x) for x in self.enable_lora)
            if len(parts) < 2 or not any(parts):
                raise ValueError(
                    f"enable_lora needs 2+ parts with one enabled, got {self.enable_lora!r}"
                )
            object.__setattr__(self, "enable_lora", parts)
        object.__setattr__(self, "fused_modules", tuple(self.fused_modules))


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
        # Fused form (enable_lora): k enabled parts of `out / n` rows, each its own rank-r pair.
        self.fused: tuple[int, int, list[int]] | None = None
        enable = getattr(spec.options, "enable_lora", None)
        if enable is not None and spec.path.rsplit(".", 1)[-1] in spec.options.fused_modules:
            if type(self) is not LoraLayer:
                raise AdapterError(f"{spec.path}: enable_lora is an option of method lora only")
            n = len(enable)
            if self.out_features % n:
                raise AdapterError(
                    f"{spec.path}: enable_lora has {n} parts but the projection's {self.out_features} outputs do not split evenly"
                )
            self.fused = (n, self.out_features // n, [j for j, on in enumerate(enable) if on])
        k = len(self.fused[2]) if self.fused else 1
        b_out = self.fused[1] * k if self.fused else self.out_features
        # Built in the same order as PEFT (A, B, then re-init of A) so a shared seed gives the same init.
        self.lora_A = nn.Linear(
            self.in_features, spec.r * k, bias=False, device=w.device, dtype=dtype
        )
        self.lora_B = nn.Linear(spec.r, b_out, bias=False, device=w.device, dtype=dtype)
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
        h = self.lora_A(self.lora_dropout(x)) * self.scaling
        if self.fused is None:
            return self.lora_B(h)
        n, part, on = self.fused
        k = len(on)
        b = self.lora_B.weight.reshape(k, part, self.r)
        y = torch.einsum("...kr,kpr->...kp", h.reshape(*h.shape[:-1], k, self.r), b)
        out = h.new_zeros(*h.shape[:-1], n, part)
        out[..., on, :] = y
        return out.reshape(*h.shape[:-1], n * part)

    def delta_weight(self) -> torch.Tensor:
        if self.fused is None:
            return (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return (self._full_b() @ self.lora_A.weight) * self.scaling

    def _full_b(self) -> torch.Tensor:
        """The fused form's B as one [out, r·k] matrix (zeros outside each part's block)."""
        assert self.fused is not None
        n, part, on = self.fused
        r, w = self.r, self.lora_B.weight
        full = w.new_zeros(n * part, r * len(on))
        for e, j in enumerate(on):
            full[j * part : (j + 1) * part, e * r : (e + 1) * r] = w[e * part : (e + 1) * part]
        return full

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """The fused form is saved as the plain LoRA of rank r·k it equals (PEFT has no
        enable_lora): A as it is, B with zeros outside each part's block."""
        if self.fused is None:
            return super().peft_tensors()
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self._full_b()}

    def peft_rank_scale(self) -> int:
        """How many times r this layer's saved rank is (the fused form: its enabled parts)."""
        return len(self.fused[2]) if self.fused is not None else 1

    def grouped_delta(
        self, x: torch.Tensor, rows: list[int], tensors: list[Mapping[str, torch.Tensor]]
    ) -> torch.Tensor | None:
        """A cohort's deltas in two batched matmuls over stacked per-group A and B (equal
        groups, no dropout, plain LoRA): 2 kernels and 2 backward nodes instead of 2 per group,
        which is most of a small cohort's overhead on a CPU."""
        if (
            type(self).delta is not LoraLayer.delta
            or self.fused is not None
            or not isinstance(self.lora_dropout, nn.Identity)
            or any(set(t) != {"lora_A.weight", "lora_B.weight"} for t in tensors)
        ):
            return None
        if len(set(rows)) != 1:
            return self._masked_delta(x, rows, tensors)
        a = torch.stack([t["lora_A.weight"] for t in tensors])  # [G, r, in]
        b = torch.stack([t["lora_B.weight"] for t in tensors])  # [G, out, r]
        xs = x.to(a.dtype).reshape(len(rows), -1, x.shape[-1])  # group i's rows, flattened
        h = torch.bmm(xs, a.transpose(1, 2)) * self.scaling
        return torch.bmm(h, b.transpose(1, 2)).reshape(*x.shape[:-1], -1)

    def _masked_delta(
        self, x: torch.Tensor, rows: list[int], tensors: list[Mapping[str, torch.Tensor]]
    ) -> torch.Tensor | None:
        """Unequal groups (a padding-free cohort's tokens): every row through every group's A
        at once (``G·r`` columns), each row's own group kept by a mask, then every B at once.
        Four kernels instead of four per group; the extra rank columns cost ``G`` times the
        adapter's own FLOPs, so only while they stay a small part of the layer's."""
        g, r = len(rows), self.r
        if g * r * 2 > x.shape[-1] or x.shape[0] != sum(rows):
            return None
        a = torch.cat([t["lora_A.weight"] for t in tensors])  # [G·r, in]
        b = torch.cat([t["lora_B.weight"] for t in tensors], dim=1)  # [out, G·r]
        h = torch.nn.functional.linear(x.to(a.dtype), a)
        own = _group_mask(rows, r, h.dtype, h.device) * self.scaling
        own = own.view(own.shape[0], *([1] * (h.dim() - 2)), own.shape[1])  # rows along dim 0
        return torch.nn.functional.linear(h * own, b)

    @classmethod
    def peft_config_fields(cls, options: Any) -> dict[str, Any]:
        opts = options if isinstance(options, LoraOptions) else LoraOptions()
        return {"init_lora_weights": opts.init_lora_weights}

    @classmethod
    def options_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        # The init only matters before training; saved weights overwrite it on load.
        init = config.get("init_lora_weights", True)
        return {"init_lora_weights": init} if init in (True, False, "gaussian") else {}


_MASKS: dict[tuple, torch.Tensor] = {}


def _group_mask(rows: list[int], r: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[sum(rows), G·r]``: 1 where row i's group owns the rank column (cached per layout:
    every adapted layer of a forward shares it)."""
    key = (tuple(rows), r, dtype, device)
    mask = _MASKS.get(key)
    if mask is None:
        if len(_MASKS) > 64:
            _MASKS.clear()
        g = len(rows)
        owner = torch.repeat_interleave(
            torch.arange(g, device=device), torch.tensor(rows, device=device)
        )
        cols = torch.arange(g * r, device=device) // r
        mask = _MASKS[key] = (owner[:, None] == cols[None, :]).to(dtype)
    return mask
