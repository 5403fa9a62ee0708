"""Serving many devices at once: HAT's cloud batches concurrent devices' middle-segment work
(continuous batching across devices), on the simulator's clock.

Each device replays the work its own generation really did (``Generation.trace``: FLOPs counted
on what ran, bytes of the encoded messages). The devices run concurrently and share one cloud,
which either serves one request at a time in arrival order (``batching=False``) or, whenever it
is free, runs every request that has arrived, up to ``max_batch``, as one pass (iteration-level
scheduling across devices, as Orca and vLLM do across requests). A pass costs the roofline of
its work: its FLOPs at the cloud profile's FLOP/s, but never less than one read of the middle's
weights from memory (``weight_bytes / mem_bps``). A small decode batch is memory-bound, so
batching amortises the weight reads; a compute-bound cloud gains nothing from batching, and the
model says so. What batching costs is modelled too: a request waits for its whole batch.

Device rules are the single-device ``Timeline``'s (``VirtualClock``'s): a device computes or
transfers, one thing at a time; a link takes both ends' latency plus the bytes at the slower
end's rate; prompt chunks pipeline (every chunk's input blocks and upload first, replies taken
in order). Drafting is serial here (no parallel drafting). With one device, no batching and no
memory bound, the token times equal ``Timeline.replay``'s (tested).
"""

from __future__ import annotations

import heapq
import statistics
from dataclasses import dataclass, field
from typing import Any

from cotune.infer.timeline import CLOUD, Step
from cotune.sim.clock import VirtualClock
from cotune.sim.profiles import DeviceProfile

#: Memory bandwidth of the built-in cloud profiles, bytes/s (NVIDIA datasheets: A100 SXM 80GB
#: HBM2e 2,039 GB/s; H100 SXM5 HBM3 3.35 TB/s). Other clouds: pass ``mem_bps``.
MEMORY_BPS = {"a100": 2.039e12, "h100": 3.35e12}


@dataclass(frozen=True)
class Cloud:
    """The serving cloud: its profile, the middle's weight bytes, how it schedules."""

    profile: DeviceProfile
    weight_bytes: float = 0.0  # read once per pass (the middle segment's parameters)
    mem_bps: float | None = None  # None: compute-only passes (no memory bound)
    batching: bool = True
    max_batch: int = 32

    def pass_time(self, flops: list[float]) -> float:
        t = sum(flops) / self.profile.flops
        if self.mem_bps:
            t = max(t, self.weight_bytes / self.mem_bps)
        return t


@dataclass
class _Device:
    name: str
    profile: DeviceProfile
    trace: list[Step]
    cursor: int = 0  # the next step to issue
    free: float = 0.0  # when the device is next idle (it computes or transfers, serially)
    token_times: list[float] = field(default_factory=list)


def serve(
    traces: dict[str, list[Step]], profiles: dict[str, DeviceProfile], cloud: Cloud
) -> dict[str, Any]:
    """Simulate the devices' generations together; per-device TTFT/TBT, cloud utilisation."""
    if cloud.max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {cloud.max_batch}")
    devices = {d: _Device(d, profiles[d], list(t)) for d, t in traces.items() if t}
    # Link times by the simulator's own rule (this loop keeps its own timelines: the cloud
    # batches, which VirtualClock's one-job-at-a-time compute does not model).
    link = VirtualClock({**{d: profiles[d] for d in devices}, CLOUD: cloud.profile}).link_time
    arrivals: list[tuple[float, int, str, int]] = []  # (time at the cloud, seq, device, step)
    seq = 0

    def issue(dev: _Device) -> None:
        """The device's next request(s): every prompt chunk at once, else one decode round."""
        nonlocal seq
        first = dev.trace[dev.cursor]
        n = 1
        if first.kind == "prefill":
            while dev.cursor + n < len(dev.trace) and dev.trace[dev.cursor + n].kind == "prefill":
                n += 1
        for i in range(dev.cursor, dev.cursor + n):
            s = dev.trace[i]
            t = dev.free + s.device_before / dev.profile.flops
            dev.free = t + link(dev.name, CLOUD, s.up)
            heapq.heappush(arrivals, (dev.free, seq, dev.name, i))
            seq += 1
        dev.cursor += n

    def reply(dev: _Device, i: int, done: float) -> None:
        s = dev.trace[i]
        start = max(done, dev.free)
        dev.free = start + link(CLOUD, dev.name, s.down)
        dev.free += s.device_after / dev.profile.flops
        last_prefill = s.kind == "prefill" and (
            i + 1 == len(dev.trace) or dev.trace[i + 1].kind != "prefill"
        )
        if s.kind == "prefill" and not last_prefill:
            return  # the next chunk's request is out already
        dev.token_times.extend([dev.free] * s.tokens)
        if last_prefill:  # the drafter's pass over the prompt, once the first token is out
            j = i
            while j >= 0 and dev.trace[j].kind == "prefill":
                dev.free += dev.trace[j].after_token / dev.profile.flops
                j -= 1
        if dev.cursor < len(dev.trace):
            issue(dev)

    for dev in devices.values():
        issue(dev)
    queue: list[tuple[float, int, str, int]] = []
    now = busy = 0.0
    batches: list[int] = []
    while arrivals or queue:
        while arrivals and arrivals[0][0] <= now:
            queue.append(heapq.heappop(arrivals))
        if not queue:  # idle until the next request arrives
            now = arrivals[0][0]
            continue
        queue.sort()
        take = cloud.max_batch if cloud.batching else 1
        batch, queue = queue[:take], queue[take:]
        flops = [float(devices[d].trace[i].cloud) for _, _, d, i in batch]
        duration = cloud.pass_time(flops)
        now += duration
        busy += duration
        batches.append(len(batch))
        for _, _, d, i in batch:
            reply(devices[d], i, now)

    per_device = {}
    for d, dev in devices.items():
        t = dev.token_times
        per_device[d] = {
            "profile": dev.profile.name,
            "ttft_s": t[0] if t else None,
            "tbt_s": (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None,
            "tokens": len(t),
            "token_times_s": t,
        }
    makespan = max((dev.free for dev in devices.values()), default=0.0)
    ttfts = [v["ttft_s"] for v in per_device.values() if v["ttft_s"] is not None]
    tbts = [v["tbt_s"] for v in per_device.values() if v["tbt_s"] is not None]
    return {
        "devices": per_device,
        "ttft_s_mean": statistics.fmean(ttfts) if ttfts else None,
        "ttft_s_max": max(ttfts, default=None),
        "tbt_s_mean": statistics.fmean(tbts) if tbts else None,
        "tbt_s_max": max(tbts, default=None),
        "cloud_busy_s": busy,
        "makespan_s": makespan,
        "cloud_utilisation": busy / makespan if makespan > 0 else 0.0,
        "passes": len(batches),
        "mean_batch": statistics.fmean(batches) if batches else 0.0,
        "max_batch_seen": max(batches, default=0),
    }


def middle_weight_bytes(anatomy: Any, n_in: int, n_out: int) -> int:
    """Bytes of the middle blocks' parameters (what one cloud pass reads from memory)."""
    L = anatomy.num_layers
    return sum(
        p.numel() * p.element_size()
        for i in range(n_in, L - n_out)
        for p in anatomy.blocks[i].parameters()
    )
