"""A generation's real work on the simulator's clock: when each token would appear on a given
device profile talking to a given cloud profile.

The work is measured, not modelled: FLOPs are counted on the operations the generator really
ran (``counted``) and bytes are the encoded messages' sizes. ``cotune.sim.clock.VirtualClock``
turns them into time with its usual rules (the device is serial: it computes or transfers; the
cloud is a hub whose network does not queue), so the same profiles as a training run apply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cotune.flops import flop_counter
from cotune.sim.clock import VirtualClock
from cotune.sim.profiles import DeviceProfile

T = TypeVar("T")
DEVICE, CLOUD = "device-0", "server"


def counted(on: bool, fn: Callable[..., T], *args: Any) -> tuple[T, int]:
    """``fn(*args)`` and the FLOPs it ran (0 when counting is off: the host-speed path)."""
    if not on:
        return fn(*args), 0
    with flop_counter() as mode:
        out = fn(*args)
    return out, int(mode.get_total_flops())


class FlopMemo:
    """FLOPs of cached-decoding operations, counted until known exactly, then predicted.

    With ``q`` new positions fixed, an operation's counted FLOPs are linear in the cache
    length ``pos`` (projections and MLPs cost the same; attention scores and values grow by
    one key per position). So per ``(op, q)`` two counted positions give the line and a third
    verifies it; from then on the line answers without counting, and host time measured
    around the operation is the operation's own (``FlopCounterMode`` slows small ops many
    times). A line that fails its check is dropped and that key is always counted."""

    def __init__(self) -> None:
        self.samples: dict[tuple, dict[int, int]] = {}
        self.lines: dict[tuple, tuple[int, int] | None] = {}  # (flops at 0, per position)

    def known(self, key: tuple, pos: int) -> int | None:
        line = self.lines.get(key)
        if line is not None:
            return line[0] + line[1] * pos
        return self.samples.get(key, {}).get(pos)

    def learn(self, key: tuple, pos: int, flops: int) -> None:
        seen = self.samples.setdefault(key, {})
        seen[pos] = flops
        if key in self.lines or len(seen) < 3:
            return
        (p0, f0), (p1, f1), (p2, f2) = sorted(seen.items())[:3]
        slope, rem = divmod(f1 - f0, p1 - p0)
        base = f0 - slope * p0
        ok = rem == 0 and base + slope * p2 == f2
        self.lines[key] = (base, slope) if ok else None

    def run(
        self, on: bool, key: tuple, pos: int, fn: Callable[..., T], *args: Any
    ) -> tuple[T, int]:
        """``fn(*args)`` and its FLOPs (0 when counting is off)."""
        if not on:
            return fn(*args), 0
        flops = self.known(key, pos)
        if flops is not None:
            return fn(*args), flops
        out, flops = counted(True, fn, *args)
        self.learn(key, pos, flops)
        return out, flops


@dataclass
class Step:
    """One prefill chunk or decode round of a U-shaped generation: device work before the
    upload, the bytes each way, the cloud's work, device work after the reply, tokens shown."""

    kind: str  # "prefill" | "plain" | "speculative"
    device_before: int
    up: int
    cloud: int
    down: int
    device_after: int
    tokens: int
    #: Speculative rounds: every draft was kept and the drafter guessed the bonus token, so
    #: drafts made while this round was verified (parallel drafting) stand.
    guessed: bool = False
    #: Prefill: the drafter's pass over the chunk, done once the first token is out.
    after_token: int = 0


@dataclass
class Timeline:
    """Simulated seconds of a generation on ``device`` ↔ ``cloud``."""

    device: DeviceProfile
    cloud: DeviceProfile
    #: HAT's parallel drafting: the device drafts the next round while this one is verified;
    #: the drafts stand when every draft was kept and the bonus token was the one guessed.
    parallel_drafting: bool = False
    clock: VirtualClock = field(init=False)
    token_times: list[float] = field(default_factory=list)
    device_flops: float = 0.0
    cloud_flops: float = 0.0

    def __post_init__(self) -> None:
        self.clock = VirtualClock({DEVICE: self.device, CLOUD: self.cloud})

    def on_device(self, flops: float, after: float = 0.0, label: str = "") -> float:
        self.device_flops += flops
        return self.clock.compute(DEVICE, flops, after=after, label=label).end

    def on_cloud(self, flops: float, after: float = 0.0, label: str = "") -> float:
        self.cloud_flops += flops
        return self.clock.compute(CLOUD, flops, after=after, label=label).end

    def up(self, nbytes: int, after: float) -> float:
        return self.clock.transfer(DEVICE, CLOUD, nbytes, after=after, label="up").end

    def down(self, nbytes: int, after: float) -> float:
        return self.clock.transfer(CLOUD, DEVICE, nbytes, after=after, label="down").end

    def emit(self, n: int, at: float) -> None:
        self.token_times.extend([at] * n)

    def replay(self, trace: list[Step]) -> None:
        """Put a U-shaped generation's recorded work on the clock. Prefill chunks pipeline:
        every chunk's input blocks and upload first, so the cloud works on chunk i while chunk
        i+1 is computed and sent; replies are then taken in order."""
        pre = [s for s in trace if s.kind == "prefill"]
        sent = []
        for s in pre:
            sent.append(self.up(s.up, self.on_device(s.device_before, 0.0, "input")))
        t = 0.0
        for s, arrived in zip(pre, sent):
            back = self.down(s.down, self.on_cloud(s.cloud, arrived, "middle"))
            t = self.on_device(s.device_after, back, "output")
        if pre:
            self.emit(pre[-1].tokens, t)
            for s in pre:
                t = self.on_device(s.after_token, t, "draft")
        drafted_ahead = False
        rounds = trace[len(pre) :]
        for i, s in enumerate(rounds):
            if not drafted_ahead:  # else its drafting ran while the last round was verified
                t = self.on_device(s.device_before, t, "draft" if s.kind != "plain" else "input")
            arrived = self.up(s.up, t)
            drafted_ahead = False
            if self.parallel_drafting and s.guessed and i + 1 < len(rounds):
                # The next round's drafts, made while this one is in flight, are valid.
                self.on_device(rounds[i + 1].device_before, arrived, "draft (parallel)")
                drafted_ahead = True
            back = self.down(s.down, self.on_cloud(s.cloud, arrived, "middle"))
            t = self.on_device(s.device_after, back, "verify" if s.kind != "plain" else "output")
            self.emit(s.tokens, t)

    def summary(self) -> dict[str, Any]:
        t = self.token_times
        stats = self.clock.stats()
        return {
            "device_profile": self.device.name,
            "cloud_profile": self.cloud.name,
            "ttft_s": t[0] if t else None,
            "tbt_s": (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None,
            "total_s": t[-1] if t else None,
            "device_flops": self.device_flops,
            "cloud_flops": self.cloud_flops,
            "device_energy_j": stats[DEVICE].energy_j,
            "bytes_up": stats[DEVICE].bytes_up,
            "bytes_down": stats[DEVICE].bytes_down,
        }
