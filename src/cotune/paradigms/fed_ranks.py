"""Heterogeneous LoRA ranks in fedavg (``devices.ranks``): each device trains the first ``r_i``
rank components of the global rank-``r`` adapter, and the server combines reports of different
ranks in one of two ways (``paradigm.options.rank_aggregation``):

- ``zero_pad`` (HetLoRA, Cho et al. 2024): every report's A and B are padded with zeros to rank
  r and averaged separately. Cheap, but the product of the averages is not the average of the
  products: the aggregate delta is not the weighted sum of the devices' deltas.
- ``stack`` (FLoRA, Wang et al. 2024): the weighted devices' A's are stacked row-wise and their
  B's column-wise, so ``B_stack A_stack = Σ wᵢ Bᵢ Aᵢ`` exactly; the server then re-factors that
  sum by truncated SVD to rank r (ordering the components by singular value, so a device's first
  r_i components are the sum's strongest).

On the device, the padded components are zeros and stay zero under training (their gradients
are zero: each multiplies the other), so a rank-r_i device is a rank-r adapter with zeros, and
only its r_i components travel. Compute is charged at the global rank (the zeros multiply too).
HetLoRA's self-pruning (``rank_prune``): after a round a device drops trailing components whose
norm ``‖B[:, j]‖·‖A[j]‖`` is below ``rank_prune`` × its largest, and keeps the smaller rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from cotune.errors import ConfigError, ProtocolError

A_SUFFIX, B_SUFFIX = "lora_A.weight", "lora_B.weight"
#: Methods whose adapter is exactly A and B per layer (plus per-row extras, untouched).
METHODS = ("lora", "dora")


def device_ranks(cfg: Any, devices: list[str], info: Any) -> dict[str, int]:
    """Each device's rank from ``devices.ranks``: per device id, per profile, or ``memory``
    (the global rank scaled by the device's memory over the largest, down to a power of two)."""
    spec, full = cfg.devices.ranks, cfg.peft.r
    if cfg.peft.method not in METHODS:
        raise ConfigError(
            f"devices.ranks: heterogeneous ranks need an A/B adapter ({', '.join(METHODS)}), "
            f"not {cfg.peft.method}"
        )
    if spec == "memory":
        mems = {d: float(info(d).get("memory_bytes") or 0.0) for d in devices}
        top = max(mems.values()) or 1.0
        out = {}
        for d, m in mems.items():
            r = max(1, int(full * m / top))
            out[d] = 1 << (r.bit_length() - 1)  # the power of two at or below
        return out
    out = {}
    for d in devices:
        r = spec.get(d, spec.get(str(info(d).get("profile")), full))
        if not 1 <= r <= full:
            raise ConfigError(f"devices.ranks: {d} gets rank {r}, outside 1..peft.r ({full})")
        out[d] = int(r)
    return out


def is_a(name: str) -> bool:
    return name.endswith(A_SUFFIX)


def is_b(name: str) -> bool:
    return name.endswith(B_SUFFIX)


def truncate(tensors: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
    """The first ``r`` rank components: A's rows, B's columns; other tensors as they are."""
    return {k: v[:r] if is_a(k) else v[:, :r] if is_b(k) else v for k, v in tensors.items()}


def pad(
    tensors: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Zero-pad truncated A/B to the shapes of ``like`` (the full-rank adapter)."""
    out = {}
    for k, v in tensors.items():
        full = like[k]
        if v.shape == full.shape:
            out[k] = v
            continue
        if not (is_a(k) or is_b(k)) or v.dim() != 2:
            raise ProtocolError(
                f"{k}: shape {tuple(v.shape)} where {tuple(full.shape)} is expected"
            )
        z = torch.zeros_like(full)
        if is_a(k):
            z[: v.shape[0]] = v
        else:
            z[:, : v.shape[1]] = v
        out[k] = z
    return out


def for_device(
    tensors: Mapping[str, torch.Tensor], rank: int, prune: float
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A round message's tensors and meta for a device of ``rank``."""
    return truncate(tensors, rank), {"rank": rank, "prune": prune}


def expected(full: Mapping[str, torch.Tensor], claimed: Any, given: int) -> dict[str, torch.Tensor]:
    """What a report of rank ``claimed`` must hold; nothing (so it is rejected as malformed)
    when the device claims a rank it was not given."""
    if not isinstance(claimed, int) or isinstance(claimed, bool) or not 1 <= claimed <= given:
        return {}
    return truncate(full, claimed)


def pruned_rank(tensors: Mapping[str, torch.Tensor], r: int, ratio: float) -> int:
    """The rank after dropping trailing components under ``ratio`` × the strongest (over all
    layers: a component index is kept if it matters in any layer)."""
    if ratio <= 0:
        return r
    strength = torch.zeros(r)
    for k, a in tensors.items():
        if not is_a(k):
            continue
        b = tensors[k[: -len(A_SUFFIX)] + B_SUFFIX]
        s = a[:r].float().norm(dim=1).cpu() * b[:, :r].float().norm(dim=0).cpu()
        strength = torch.maximum(strength, s)
    keep = strength >= ratio * float(strength.max()) if float(strength.max()) > 0 else None
    if keep is None:
        return r
    return max(1, int(torch.nonzero(keep).max()) + 1)


def stack_and_refactor(
    glob: Mapping[str, torch.Tensor],
    reports: list[Mapping[str, torch.Tensor]],
    weights: list[float],
) -> dict[str, torch.Tensor]:
    """FLoRA's aggregate: per layer ``Σ wᵢ Bᵢ Aᵢ`` by stacking, re-factored to the global rank
    by truncated SVD (split evenly: B = U√S, A = √S Vᵀ); other tensors weighted means."""
    total = float(sum(weights))
    w = [x / total for x in weights]
    out: dict[str, torch.Tensor] = {}
    for k, g in glob.items():
        if is_b(k):
            continue
        if not is_a(k):
            out[k] = sum(wi * rep[k].to(g.dtype) for wi, rep in zip(w, reports))  # type: ignore[assignment]
            continue
        kb = k[: -len(A_SUFFIX)] + B_SUFFIX
        a_stack = torch.cat([wi * rep[k].float() for wi, rep in zip(w, reports)], dim=0)
        b_stack = torch.cat([rep[kb].float() for rep in reports], dim=1)
        u, s, vh = torch.linalg.svd(b_stack @ a_stack, full_matrices=False)
        n = min(g.shape[0], s.numel())  # a thin layer has fewer components than the rank
        root = s[:n].sqrt()
        a_new, b_new = (
            torch.zeros_like(g, dtype=torch.float32),
            torch.zeros_like(glob[kb], dtype=torch.float32),
        )
        a_new[:n] = root[:, None] * vh[:n]
        b_new[:, :n] = u[:, :n] * root[None, :]
        out[k], out[kb] = a_new.to(g.dtype), b_new.to(glob[kb].dtype)
    return out


def stacked_delta(
    reports: list[Mapping[str, torch.Tensor]], weights: list[float], key_a: str
) -> torch.Tensor:
    """``B_stack A_stack`` of one layer (the exact weighted sum of the reports' products)."""
    total = float(sum(weights))
    kb = key_a[: -len(A_SUFFIX)] + B_SUFFIX
    a = torch.cat([(wi / total) * rep[key_a].float() for wi, rep in zip(weights, reports)], dim=0)
    b = torch.cat([rep[kb].float() for rep in reports], dim=1)
    return b @ a
