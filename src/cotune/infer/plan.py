"""The prefill chunk size, chosen per device (HAT's chunked prefill; the chooser is cotune's).

A prompt's chunks pipeline: the cloud works on chunk i while chunk i+1 is computed and sent.
Which size gives the first token soonest depends on the device's speed and link and on the
cloud's speed, so the size is chosen per device: the prefill is run at every candidate (the
whole prompt, halves, quarters, ... down to 8 positions), its counted FLOPs and encoded bytes
put on the simulated clock of that device and cloud, and the fastest taken. The profiles are
the simulator's, a calibrated deployment's (``cotune.deploy.calibrate``: measured), or what a
node declared when it joined (``declared_profile``).
"""

from __future__ import annotations

from typing import Any

from cotune.errors import ConfigError


def choose_prefill_chunk(gen: Any, prompt: list[int], device: Any, cloud: Any) -> tuple[int, dict]:
    """The prompt chunk size with the shortest simulated time to the first token, measured by
    running the prefill at each candidate (whole prompt, halves, quarters, ... down to 8)."""
    from cotune.infer.timeline import Timeline

    n, sizes = len(prompt), []
    size = n
    while size >= 8 or not sizes:
        sizes.append(size)
        size //= 2
    ttft = {}
    saved = gen.prefill_chunk
    try:
        for size in sizes:
            gen.prefill_chunk = size
            tl = Timeline(device, cloud)
            gen.generate(prompt, 1, timeline=tl)
            ttft[size] = tl.token_times[0]
    finally:
        gen.prefill_chunk = saved
    return min(ttft, key=ttft.__getitem__), ttft


CAPABILITIES = ("flops", "up_bps", "down_bps", "latency_s")


def declared_profile(node: str, info: dict[str, Any]) -> Any:
    """A profile from the speeds node ``node`` declared (``Grid.node_info``)."""
    from cotune.sim.profiles import DeviceProfile

    missing = [k for k in CAPABILITIES if not isinstance(info.get(k), int | float)]
    if missing:
        raise ConfigError(
            f"paradigm.options.prefill_chunk: auto chooses from the nodes' declared speeds, but "
            f"{node} declared no {', '.join(missing)}; give a fixed size"
        )
    return DeviceProfile(
        name=str(info.get("profile", node)), description=f"as {node} declared",
        flops=float(info["flops"]), memory_bytes=float(info.get("memory_bytes") or 1e15),
        up_bps=float(info["up_bps"]), down_bps=float(info["down_bps"]),
        latency_s=float(info["latency_s"]), energy_per_flop_j=0.0, energy_per_byte_j=0.0,
    )  # fmt: skip


def plan_prefill_chunk(
    anatomy: Any, cut: Any, prompt_len: int, device: Any, cloud: Any, codec: str = "fp32"
) -> tuple[int, dict[int, float]]:
    """The chunk size for ``prompt_len``-token prompts on ``device`` ↔ ``cloud`` (profiles),
    and the simulated TTFT of each candidate. The prompt's content does not change the work,
    so a stand-in prompt of that length is used."""
    from cotune.infer.generate import UGenerator

    gen = UGenerator(anatomy, cut, gamma=0, codec=codec)
    prompt = [i % int(anatomy.config.vocab_size) for i in range(2, 2 + prompt_len)]
    return choose_prefill_chunk(gen, prompt, device, cloud)
