"""APCA-GGM (Zheng & Cao, arXiv 2412.08592): principal components chosen by a Gaussian graphical model.

Each targeted weight `W = U S Vᵀ` gives `r` rank-1 principal components (graph nodes):
`B_i = U[:, i]`, `A_i = S_i V[:, i]ᵀ / s` (`s = alpha / r`; the authors' code has no scaling,
i.e. alpha = r). Before the allocation every component is trainable on the residual base
`W − s·Σ_i B_i A_i` (PiSSA-like, with the authors' split of `S`). A warm-up collects the
components' AdaLoRA-style importance scores every step (`ImportanceTracker`); the graph step
(`cotune.peft.ggm_graph`) keeps `kept_nodes` of them. Then the layer is rebuilt with only the kept
components (`options.allocation`: module → component indices; a per-module rank), the others
frozen at their SVD values inside the base — so the result is a PiSSA-style LoRA with a
`rank_pattern`, saved as a plain LoRA of rank 2k on the unmodified base (PEFT loads it).
The setup (warm-up, federated score reports, re-injection) is `cotune.peft.ggm_setup`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from cotune.errors import AdapterError
from cotune.peft.lora import LoraOptions
from cotune.peft.pissa import PissaLayer

SOURCES = ("server", "federated")
OMEGA_STEPS = ("authors", "exact")
SELECTIONS = ("graph", "score")


@dataclass(frozen=True)
class GgmOptions(LoraOptions):
    # Optimizer steps of the warm-up whose importance scores (one sample per step) feed the graph.
    warmup_steps: int = 20
    # server: the warm-up runs at the server on a sample of the pooled training data (the
    # authors' single-process setting); federated: every device warms up on its own data and
    # sends only its score samples (counted bytes); training then starts from the SVD values.
    source: str = "server"
    important_nodes: int | float = 30  # a count, or a fraction (< 1) of all component nodes
    kept_nodes: int | float = 60  # trainable after the allocation (important ones included)
    # graph: the GGM (the paper); score: the top kept_nodes by mean importance alone (an
    # AdaLoRA-like one-shot allocation, the ablation without the graph)
    selection: str = "graph"
    lam: float = 1000.0  # λ of λ‖Ω − Δ‖²
    tau: float = 20.0  # τ of the ℓ2,p group penalty
    p: float = 0.9
    max_iter: int = 50  # BCD sweeps
    omega_step: str = "authors"  # authors: their gradient step; exact: the closed form
    eta: float = 1e-4  # the authors' Ω-step size
    omega_iters: int = 100
    beta1: float = 0.85  # EMA of the sensitivity |p·∇p|
    beta2: float = 0.85  # EMA of its uncertainty
    # Filled in by the setup: module path → kept component indices. Given, the warm-up is skipped.
    allocation: Mapping[str, list[int]] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {list(SOURCES)}, got {self.source!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {list(SELECTIONS)}, got {self.selection!r}")
        if self.omega_step not in OMEGA_STEPS:
            raise ValueError(
                f"omega_step must be one of {list(OMEGA_STEPS)}, got {self.omega_step!r}"
            )
        if self.warmup_steps < 2:
            raise ValueError(
                f"warmup_steps must be >= 2 (a covariance needs 2 samples), got {self.warmup_steps}"
            )
        for name in ("important_nodes", "kept_nodes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (
                (isinstance(v, int) and v >= 1) or (isinstance(v, float) and 0 < v < 1)
            ):
                raise ValueError(f"{name} must be a count >= 1 or a fraction in (0, 1), got {v!r}")
        if not 0 < self.p < 1:
            raise ValueError(f"p must be in (0, 1), got {self.p}")
        if self.lam <= 0 or self.tau < 0:
            raise ValueError(f"lam must be > 0 and tau >= 0, got lam={self.lam}, tau={self.tau}")
        if self.max_iter < 1 or self.omega_iters < 1 or self.eta <= 0:
            raise ValueError("max_iter and omega_iters must be >= 1 and eta > 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1, beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.allocation is not None:
            if not isinstance(self.allocation, Mapping):
                raise ValueError("allocation must map module paths to component index lists")
            clean = {}
            for path, idx in self.allocation.items():
                if not idx or any(not isinstance(i, int) or i < 0 for i in idx):
                    raise ValueError(
                        f"allocation[{path!r}] must be a non-empty list of component indices >= 0"
                    )
                clean[str(path)] = [int(i) for i in idx]
            object.__setattr__(self, "allocation", clean)


class GgmLayer(PissaLayer):
    """`lora_A.weight` [k, in], `lora_B.weight` [out, k]: the module's trainable components."""

    peft_init: ClassVar[str] = "cotune_ggm"  # never claims a file: it reloads as plain LoRA

    def components(self) -> list[int]:
        """Which of W's principal components this layer trains (all r before the allocation)."""
        opts = self.spec.options
        allocation = opts.allocation if isinstance(opts, GgmOptions) else None
        if allocation is None:
            return list(range(self.r))
        idx = allocation.get(self.path)
        if idx is None:
            raise AdapterError(
                f"{self.path}: peft.options.allocation names no components for this module"
            )
        if len(idx) != self.r:
            raise AdapterError(
                f"{self.path}: allocation lists {len(idx)} components but the layer's rank is "
                f"{self.r} (rank_pattern must give each module its component count)"
            )
        return idx

    def principal_factors(self, w: torch.Tensor, options: Any) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.components()
        if max(idx) >= min(w.shape):
            raise AdapterError(
                f"{self.path}: component {max(idx)} does not exist in a {tuple(w.shape)} weight"
            )
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        pick = torch.tensor(idx, device=w.device)
        return u[:, pick], (s[pick, None] * vh[pick]) / self.scaling


def component_nodes(layers: Mapping[str, Any]) -> list[tuple[str, int]]:
    """The graph's nodes in order: (module path, component index) for every adapted module."""
    return [(path, i) for path, layer in layers.items() for i in range(layer.r)]


class ImportanceTracker:
    """AdaLoRA-style importance per component node, one sample per call (after a backward).

    Per entry: sensitivity ``I = |p ⊙ ∇p|``, ``Ī ← β₁Ī + (1−β₁)I``, uncertainty
    ``Ū ← β₂Ū + (1−β₂)|I − Ī|``, score ``Ī ⊙ Ū``; a node's score is the mean of its A-row's
    and its B-column's mean scores (the authors' code)."""

    def __init__(self, layers: Mapping[str, Any], beta1: float, beta2: float) -> None:
        self.layers = dict(layers)
        self.beta1, self.beta2 = beta1, beta2
        self.ema: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.samples: list[torch.Tensor] = []

    @torch.no_grad()
    def _score(self, p: torch.Tensor) -> torch.Tensor:
        ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
        ema, unc = self.ema.get(id(p), (torch.zeros_like(p), torch.zeros_like(p)))
        ema = self.beta1 * ema + (1 - self.beta1) * ipt
        unc = self.beta2 * unc + (1 - self.beta2) * (ipt - ema).abs()
        self.ema[id(p)] = (ema, unc)
        return ema * unc

    @torch.no_grad()
    def update(self) -> None:
        row = []
        for layer in self.layers.values():
            a = self._score(layer.lora_A.weight).mean(1)  # [k]: A_i is row i
            b = self._score(layer.lora_B.weight).mean(0)  # [k]: B_i is column i
            row.append(((a + b) / 2).to(torch.float64).cpu())
        self.samples.append(torch.cat(row))

    def matrix(self) -> torch.Tensor:
        return torch.stack(self.samples)
