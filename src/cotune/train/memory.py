"""Memory measurement for roles: what a node reports through its meter (``ctx.meter.memory``).

The probes live with the simulator's cost models (``cotune.sim.costs``); roles reach them here so
a paradigm never imports the simulator.
"""

from cotune.sim.costs import (  # noqa: F401 - re-exported
    MemoryEstimate,
    MemoryProbe,
    estimate_memory,
    saved_activation_bytes,
)
