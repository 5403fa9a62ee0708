"""Device profiles (compute, memory, links, energy) and fleets built from them.

Every figure is an *effective* rate: vendor peak × a utilisation factor for fp32,
training-like work (small-batch matmuls plus the memory-bound rest of a transformer step).
The factor and its reason are in each profile's ``source``. Bandwidths are application-level
goodput in bits/s converted to bytes/s; latencies are one-way access latencies to the cloud.
``memory_bytes`` is what a training process may use, not the installed RAM (the OS and other
apps keep the rest on phones; shared CPU/GPU memory on Jetson).

This module imports neither torch nor transformers (``cotune devices`` uses it at start-up).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cotune.errors import ConfigError

GB = 1024**3
MBIT = 1e6 / 8  # bytes/s in one Mbit/s


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    flops: float  # effective FLOP/s for fp32 training-like work
    memory_bytes: float  # memory a training process may use
    up_bps: float  # uplink goodput, bytes/s
    down_bps: float  # downlink goodput, bytes/s
    latency_s: float  # one-way access latency
    energy_per_flop_j: float
    energy_per_byte_j: float
    source: str = ""


_POSITIVE = ("flops", "memory_bytes", "up_bps", "down_bps")
_NON_NEGATIVE = ("latency_s", "energy_per_flop_j", "energy_per_byte_j")

# Link energy: Huang et al., "A Close Examination of Performance and Power Characteristics of
# 4G LTE Networks", MobiSys 2012: LTE uplink ≈ 0.44 W per Mbit/s (≈ 3.5 µJ/byte), Wi-Fi uplink
# ≈ 0.28 W per Mbit/s (≈ 2.3 µJ/byte); newer modems are more efficient, so phones use 1–3 µJ/B.
# Compute energy: sustained SoC/board power under load ÷ the effective FLOP/s below.
# Networks: Ookla Speedtest Global Index (2024 medians: mobile ≈ 50 Mbit/s down / 10 up,
# fixed broadband ≈ 90 down / 45 up); Opensignal 5G reports (≈ 200 down / 30 up).
_BUILTIN: tuple[DeviceProfile, ...] = (
    DeviceProfile(
        "phone-low",
        "budget Android phone, CPU training, LTE",
        15e9,
        1.5 * GB,
        5 * MBIT,
        20 * MBIT,
        0.060,
        3e-10,
        3e-6,
        "CPU 2xCortex-A75@2.0GHz + 6xA55@1.8GHz: peak (2*16*2.0+6*8*1.8) GFLOP/s ≈ 150; x0.10 "
        "(in-order little cores, small-batch training, thermal throttling). 4 GB RAM, ~1.5 GB for "
        "one foreground app. LTE 20/5 Mbit/s, 60 ms (Ookla, low quartile). ~4.5 W / 15 GFLOP/s.",
    ),
    DeviceProfile(
        "phone-mid",
        "mid-range phone (Snapdragon 7-class), CPU training, LTE",
        40e9,
        3 * GB,
        10 * MBIT,
        50 * MBIT,
        0.040,
        1e-10,
        2.5e-6,
        "CPU 4xCortex-A78@2.4GHz (2x128-bit FMA: 16 FLOP/cycle) + 4xA55@1.8GHz: peak ≈ 210 "
        "GFLOP/s; x0.20 (NEON GEMM kernels reach ~50% on big cores, the rest of a step is memory "
        "bound). 8 GB RAM, ~3 GB usable. Ookla global mobile median 50/10 Mbit/s, 40 ms. ~4 W.",
    ),
    DeviceProfile(
        "phone-high",
        "flagship phone (Snapdragon 8 Gen 3-class), 5G",
        150e9,
        6 * GB,
        30 * MBIT,
        200 * MBIT,
        0.025,
        4e-11,
        1.5e-6,
        "CPU X4@3.3GHz (32 FLOP/cycle) + 5xA720@3.1 + 2xA520: peak ≈ 390 GFLOP/s, Adreno 750 "
        "GPU ≈ 2.8 TFLOPS fp32 (vendor-reported) but mobile training stacks use it poorly; "
        "150 GFLOP/s ≈ 0.4x CPU peak ≈ 0.05x GPU peak. 12-16 GB RAM, ~6 GB usable. Opensignal 5G "
        "≈ 200/30 Mbit/s, 25 ms. ~6 W sustained.",
    ),
    DeviceProfile(
        "jetson",
        "edge board, NVIDIA Jetson AGX Orin 64GB, wired broadband",
        1.6e12,
        48 * GB,
        45 * MBIT,
        90 * MBIT,
        0.015,
        3.8e-11,
        5e-7,
        "NVIDIA Jetson AGX Orin datasheet: 2048 CUDA cores @1.3 GHz = 5.3 TFLOPS fp32; x0.30 "
        "(fp32 without tensor cores, small batches, LPDDR5 204.8 GB/s shared). 64 GB shared "
        "memory, ~48 GB for training. Ookla fixed-broadband median 90/45 Mbit/s, 15 ms. 60 W "
        "max power mode / 1.6 TFLOP/s. Ethernet NIC + home network ≈ 0.5 µJ/byte.",
    ),
    DeviceProfile(
        "laptop-cpu",
        "laptop, 8-core x86 CPU (AVX2), Wi-Fi",
        150e9,
        8 * GB,
        40 * MBIT,
        90 * MBIT,
        0.020,
        3e-10,
        2e-6,
        "8 cores x 2 AVX2 FMA units x 8 fp32 lanes x 2 FLOP x 3.0 GHz = 768 GFLOP/s peak; x0.20 "
        "(PyTorch CPU training of small models: GEMMs ~50-60%, layer norm/softmax/optimizer "
        "memory bound, turbo not sustained). 16 GB RAM, ~8 GB usable. Wi-Fi on fixed broadband "
        "(Ookla median 90/45), 20 ms. 45 W package power. Wi-Fi ≈ 2 µJ/byte (Huang 2012).",
    ),
    DeviceProfile(
        "a100",
        "datacenter GPU, NVIDIA A100 SXM 80GB",
        11.7e12,
        80 * GB,
        10e9 / 8,
        10e9 / 8,
        0.001,
        3.4e-11,
        1e-8,
        "NVIDIA A100 datasheet: 19.5 TFLOPS fp32 (non-tensor; PyTorch keeps TF32 matmuls off by "
        "default); x0.60 (large-batch fp32 GEMMs reach ~80%, elementwise ops memory bound). bf16 "
        "tensor cores would be ~10x faster. 80 GB HBM2e. 10 Gbit/s datacenter NIC, 1 ms. 400 W "
        "TDP / 11.7 TFLOP/s. Wired datacenter network ≈ 10 nJ/byte (order of magnitude).",
    ),
    DeviceProfile(
        "h100",
        "datacenter GPU, NVIDIA H100 SXM5 80GB",
        33.5e12,
        80 * GB,
        25e9 / 8,
        25e9 / 8,
        0.001,
        2.1e-11,
        1e-8,
        "NVIDIA H100 SXM5 datasheet: 67 TFLOPS fp32 (non-tensor); x0.50 (fp32 CUDA-core GEMMs "
        "on Hopper rarely exceed ~70% and the memory-bound share grows with faster math). 80 GB "
        "HBM3. 25 Gbit/s NIC, 1 ms. 700 W TDP / 33.5 TFLOP/s ≈ 21 pJ/FLOP.",
    ),
)

BUILTIN_PROFILES: dict[str, DeviceProfile] = {p.name: p for p in _BUILTIN}


def _check(profile: DeviceProfile, where: str) -> DeviceProfile:
    for f in _POSITIVE:
        v = getattr(profile, f)
        if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
            raise ConfigError(f"{where}: profile {profile.name!r}: {f} must be > 0, got {v!r}")
    for f in _NON_NEGATIVE:
        v = getattr(profile, f)
        if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
            raise ConfigError(f"{where}: profile {profile.name!r}: {f} must be >= 0, got {v!r}")
    return profile


def profile_from_dict(name: str, data: Mapping[str, Any], where: str = "<dict>") -> DeviceProfile:
    """Build a validated profile; ``base: <known profile>`` copies its figures first."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: profile {name!r} must be a mapping of fields")
    allowed = {f.name for f in fields(DeviceProfile)} - {"name"}
    values: dict[str, Any] = {}
    data = dict(data)
    base = data.pop("base", None)
    if base is not None:
        if base not in BUILTIN_PROFILES:
            raise ConfigError(
                f"{where}: profile {name!r}: base {base!r} is not a built-in profile "
                f"(known: {', '.join(BUILTIN_PROFILES)})"
            )
        values = {k: getattr(BUILTIN_PROFILES[base], k) for k in allowed}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(
            f"{where}: profile {name!r}: unknown field(s) {', '.join(unknown)} "
            f"(allowed: base, {', '.join(sorted(allowed))})"
        )
    values.update(data)
    missing = sorted(allowed - set(values) - {"description", "source"})
    if missing:
        raise ConfigError(f"{where}: profile {name!r}: missing field(s) {', '.join(missing)}")
    values.setdefault("description", "")
    values.setdefault("source", f"user profile from {where}")
    for f in _POSITIVE + _NON_NEGATIVE:
        if isinstance(values[f], str):  # YAML 1.1 reads "2.0e11" (no sign) as a string
            with contextlib.suppress(ValueError):
                values[f] = float(values[f])
        if isinstance(values[f], bool) or not isinstance(values[f], int | float):
            raise ConfigError(f"{where}: profile {name!r}: {f} must be a number, got {values[f]!r}")
    return _check(DeviceProfile(name=name, **values), where)


def load_profiles(path: str | Path) -> dict[str, DeviceProfile]:
    """Read user profiles from YAML: ``{profiles: {name: {field: value, ...}}}`` or the mapping alone."""
    from cotune.config.loading import load_yaml_file  # torch-free, like this module

    p = Path(path)
    data = load_yaml_file(p, "device profile file")
    if isinstance(data, dict) and set(data) == {"profiles"}:
        data = data["profiles"]
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{p}: expected a mapping of profile name -> fields")
    return {str(n): profile_from_dict(str(n), d, str(p)) for n, d in data.items()}


def all_profiles(profile_file: str | Path | None = None) -> dict[str, DeviceProfile]:
    """Built-ins, overridden/extended by the user's file."""
    out = dict(BUILTIN_PROFILES)
    if profile_file is not None:
        out.update(load_profiles(profile_file))
    return out


def get_profile(name: str, profiles: Mapping[str, DeviceProfile] | None = None) -> DeviceProfile:
    known = BUILTIN_PROFILES if profiles is None else profiles
    try:
        return known[name]
    except KeyError:
        raise ConfigError(f"unknown device profile {name!r} (known: {', '.join(known)})") from None


def mix_counts(count: int, mix: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder rounding of fractions to counts; ties go to the earlier name."""
    raw = {n: round(f * count, 9) for n, f in mix.items()}  # 0.29*100 is 28.999...
    counts = {n: math.floor(v) for n, v in raw.items()}
    order = sorted(mix, key=lambda n: (-(raw[n] - counts[n]), list(mix).index(n)))
    for n in order[: count - sum(counts.values())]:
        counts[n] += 1
    return counts


def build_fleet(
    count: int,
    mix: Mapping[str, float] | None = None,
    devices: list[str] | None = None,
    seed: int = 0,
    profiles: Mapping[str, DeviceProfile] | None = None,
) -> list[DeviceProfile]:
    """One profile per device. ``devices`` names each one; ``mix`` gives fractions per profile
    (rounded deterministically, then shuffled with ``seed`` so device index is not tier);
    neither: every device is ``phone-mid``."""
    known = BUILTIN_PROFILES if profiles is None else profiles
    names = ", ".join(known)
    if count < 1:
        raise ConfigError(f"devices.count must be >= 1, got {count}")
    if mix is not None and devices is not None:
        raise ConfigError("devices.mix and devices.profiles are exclusive: give one of them")
    if devices is not None:
        if len(devices) != count:
            raise ConfigError(
                f"devices.profiles lists {len(devices)} profiles but devices.count is {count}"
            )
        for i, n in enumerate(devices):
            if n not in known:
                raise ConfigError(f"devices.profiles[{i}]: unknown profile {n!r} (known: {names})")
        return [known[n] for n in devices]
    if not mix:
        return [get_profile("phone-mid", known)] * count
    for n, f in mix.items():
        if n not in known:
            raise ConfigError(f"devices.mix: unknown profile {n!r} (known: {names})")
        if not (isinstance(f, int | float) and f >= 0):
            raise ConfigError(f"devices.mix.{n}: fraction must be >= 0, got {f!r}")
    total = sum(mix.values())
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"devices.mix: fractions must sum to 1, got {total:g} ({dict(mix)})")
    fleet = [known[n] for n, c in mix_counts(count, mix).items() for _ in range(c)]
    import random  # local: only fleets need it

    random.Random(seed).shuffle(fleet)
    return fleet


def _human(v: float, unit: str) -> str:
    for k, p in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= p:
            return f"{v / p:.3g} {k}{unit}"
    return f"{v:.3g} {unit}"


def format_profiles_table(profiles: Mapping[str, DeviceProfile] | None = None) -> str:
    """Plain-text table for ``cotune devices``."""
    profs = BUILTIN_PROFILES if profiles is None else profiles
    head = ("name", "FLOP/s", "memory", "up", "down", "latency", "J/GFLOP", "uJ/byte")
    rows = [head] + [
        (
            p.name,
            _human(p.flops, "FLOP/s"),
            f"{p.memory_bytes / GB:.3g} GiB",
            _human(p.up_bps * 8, "bit/s"),
            _human(p.down_bps * 8, "bit/s"),
            f"{p.latency_s * 1e3:.3g} ms",
            f"{p.energy_per_flop_j * 1e9:.3g}",
            f"{p.energy_per_byte_j * 1e6:.3g}",
        )
        for p in profs.values()
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines += [f"{p.name}: {p.description}. {p.source}" for p in profs.values()]
    return "\n".join(lines)


def fleet_from_config(cfg: Any, seed: int = 0) -> tuple[list[DeviceProfile], DeviceProfile]:
    """``(device profiles, server profile)`` from a ``devices`` config section."""
    known = all_profiles(cfg.profile_file)
    fleet = build_fleet(cfg.count, cfg.mix, cfg.profiles, seed, known)
    if cfg.server not in known:
        raise ConfigError(
            f"devices.server: unknown profile {cfg.server!r} (known: {', '.join(known)})"
        )
    return fleet, known[cfg.server]
