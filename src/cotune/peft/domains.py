"""Domains of a multi-domain run (MoDULA's domain stage): which expert each device trains.

A device's domain is the dominant label of its shard (classification: a `fortunes` category, an
Austen novel in the `novel` view). The distinct dominant domains, in label order, are numbered
0..D-1 and domain d trains domain expert d, so `num_experts` must be at least D.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from cotune.errors import ConfigError


@dataclass(frozen=True)
class DomainPlan:
    """Domain names in expert order and the expert of each device role."""

    names: tuple[str, ...]
    by_role: dict[str, int]

    def expert_of(self, role_id: str) -> int | None:
        return self.by_role.get(role_id)

    def example_experts(self, role_id: str, n: int) -> list[int] | None:
        """Per-example experts of a role's `n` examples (None: the role has no domain)."""
        d = self.expert_of(role_id)
        return None if d is None else [d] * n

    def owns(self, role_id: str, name: str) -> bool:
        """Whether `role_id` trains parameter `name`: all but the other domains' experts."""
        from cotune.peft.modula import expert_index

        d, e = self.expert_of(role_id), expert_index(name)
        return d is None or e is None or e == d

    def describe(self) -> dict[str, Any]:
        return {"experts": dict(enumerate(self.names)), "devices": dict(self.by_role)}


def plan_domains(
    labels: Sequence[int | None],
    parts: Sequence[Sequence[int]],
    label_names: Sequence[str] | None,
    num_experts: int,
) -> DomainPlan:
    """Each device's dominant label → a domain expert; errors name the field to change."""
    if label_names is None or any(labels[i] is None for p in parts for i in p):
        raise ConfigError(
            "peft.stages.domain: the domain stage needs a domain per device, taken from its "
            "examples' labels (classification) or domains (causal LM on a labelled source: "
            "data.dataset=fortunes, or austen with data.view=novel); these examples carry none"
        )
    dominant = [Counter(labels[i] for i in p).most_common(1)[0][0] for p in parts]
    distinct = sorted(set(dominant))
    if len(distinct) > num_experts:
        names = ", ".join(label_names[d] for d in distinct)  # type: ignore[index]
        raise ConfigError(
            f"peft.options.num_experts = {num_experts}, but the devices hold {len(distinct)} "
            f"domains ({names}); MoDULA trains one domain expert per domain: set "
            f"peft.options.num_experts >= {len(distinct)}"
        )
    expert = {d: i for i, d in enumerate(distinct)}
    return DomainPlan(
        names=tuple(label_names[d] for d in distinct),  # type: ignore[index]
        by_role={f"device-{i}": expert[d] for i, d in enumerate(dominant)},
    )


@contextmanager
def route_domains(adapters: Any, experts: Sequence[int] | None) -> Iterator[None]:
    """Send each example of the next forward through its own domain expert (MoDULA layers)."""
    layers = [layer for layer in adapters.layers.values() if hasattr(layer, "domain_ids")]
    device = next((p.device for layer in layers for p in layer.parameters()), None)
    ids = None if experts is None else torch.tensor(list(experts), dtype=torch.long, device=device)
    for layer in layers:
        layer.domain_ids = ids
    try:
        yield
    finally:
        for layer in layers:
            layer.domain_ids = None
