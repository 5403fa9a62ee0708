"""Memory measurement for roles: what a node reports through its meter (``ctx.meter.memory``).

The probes live with the simulator's cost models (``cotune.sim.memory``); roles reach them here so
a paradigm never imports the simulator.
"""

from typing import Any

import torch

from cotune.sim.memory import (  # noqa: F401 - re-exported
    MemoryEstimate,
    MemoryProbe,
    estimate_memory,
    model_param_bytes,
    saved_activation_bytes,
)


def probe_ids(cfg: Any, module: torch.nn.Module) -> torch.Tensor:
    """A largest-batch dummy input (``[batch_size, max_length]`` ones) on ``module``'s device,
    for memory and FLOP probes."""
    device = next((p.device for p in module.parameters() if not p.is_meta), None)
    return torch.ones(cfg.train.batch_size, cfg.model.max_length, dtype=torch.long, device=device)
