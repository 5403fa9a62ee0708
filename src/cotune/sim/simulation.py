"""The simulator as a paradigm sees it: one object holding the fleet, the clock and the meters.

Built once per run from the ``devices`` config section. Paradigms charge the FLOPs they really
ran (counted by ``FlopCounter``) to a role's timeline; the engine's listener charges every
encoded message; memory is estimated once per role kind from a probe at the largest batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cotune.runtime.ids import SERVER, device_id, device_index  # noqa: F401 - re-exported
from cotune.sim.availability import Behaviour, DispatchShaper, behaviour_from_config
from cotune.sim.clock import Interval, RoleStats, VirtualClock
from cotune.sim.costs import FlopCounter, MemoryEstimate
from cotune.sim.profiles import DeviceProfile, fleet_from_config


@dataclass
class Simulation:
    profiles: dict[str, DeviceProfile]  # role id → profile (server and every device)
    clock: VirtualClock
    behaviour: Behaviour
    shaper: DispatchShaper | None = None
    flops: FlopCounter = field(default_factory=FlopCounter)
    memory: dict[str, MemoryEstimate] = field(default_factory=dict)

    @classmethod
    def from_config(cls, devices_cfg: Any, seed: int) -> Simulation:
        fleet, server = fleet_from_config(devices_cfg, seed)
        profiles = {SERVER: server, **{device_id(i): p for i, p in enumerate(fleet)}}
        behaviour, shaper = behaviour_from_config(devices_cfg.availability, seed)
        return cls(profiles, VirtualClock(profiles, hubs=frozenset({SERVER})), behaviour, shaper)

    @property
    def now(self) -> float:
        return self.clock.now

    def charge(
        self, role: str, flops: float, *, round: int = 0, after: float = 0.0, label: str = ""
    ) -> Interval:
        """Put ``flops`` on ``role``'s timeline; devices run slower when they straggle."""
        idx = device_index(role)
        slowdown = self.behaviour.slowdown(idx, round) if idx is not None else 1.0
        return self.clock.compute(role, flops, after=after, slowdown=slowdown, label=label)

    def online(self, role: str, round: int, time: float) -> bool:
        idx = device_index(role)
        return True if idx is None else self.behaviour.available(idx, round, time)

    def cost_table(self, *, idle: bool = True) -> dict[str, dict[str, Any]]:
        """Per role: profile, FLOPs, bytes, busy/compute/comm seconds, energy, memory estimate
        (``idle=False``: not the roles that did nothing and hold no memory estimate)."""
        out: dict[str, dict[str, Any]] = {}
        stats = self.clock.stats(idle=idle)
        for role in self.memory:
            if role not in stats:
                stats[role] = RoleStats()
        for role, st in stats.items():
            prof = self.profiles[role]
            mem = self.memory.get(role)
            out[role] = {
                "profile": prof.name,
                "flops": st.flops,
                "bytes_up": st.bytes_up,
                "bytes_down": st.bytes_down,
                "compute_s": st.compute_s,
                "comm_s": st.comm_s,
                "busy_s": st.busy_s,
                "energy_j": st.energy_j,
                "memory_bytes": mem.total if mem else None,
                "memory_fits": (mem.total <= prof.memory_bytes) if mem else None,
            }
            if mem is not None and mem.measured is not None:  # a CUDA node's allocator peak
                out[role]["memory_measured_bytes"] = mem.measured
        return out
