"""Profiles that describe a deployment's real machines: each node's compute speed as a deployed
run measured it (counted FLOPs per busy second, encoding and framing included), with the links
the user states (or measured ones). A run configured with them predicts, in simulated time,
what the deployment will take: ``benchmarks/shaped_links.py`` checks that on shaped links.

    profiles = calibrated_profiles(run_dir, links={"device-0": Link(4, 8, 0.02), ...})
    write_profiles(profiles, "measured.yaml")   # devices.profile_file; devices.profiles/server
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from cotune.deploy.netlab import Link
from cotune.errors import ConfigError

# The server of a one-machine deployment talks over loopback: a link that is never the limit.
LOOPBACK = {"up_bps": 1e10, "down_bps": 1e10, "latency_s": 0.0}


def calibrated_profiles(
    run_dir: str | Path, links: dict[str, Link] | None = None, *, device_base: str = "phone-mid",
    server_base: str = "a100",
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """``measured-<node>`` profiles from a deployed run's ``summary.json``: its measured FLOP/s,
    the given link (devices) or loopback (the server), the rest (memory, energy) from the base
    profile."""
    path = Path(run_dir) / "summary.json"
    try:
        dep = json.loads(path.read_text(encoding="utf-8"))["deployment"]
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: cannot read a run summary: {err}") from None
    except KeyError:
        raise ConfigError(f"{path}: not a deployed run (no 'deployment' section)") from None
    out: dict[str, dict[str, Any]] = {}
    for node, n in dep["nodes"].items():
        speed = n.get("measured_flops_per_s")
        if not speed:
            raise ConfigError(f"{path}: {node} has no measured speed (it computed nothing)")
        prof: dict[str, Any] = {
            "base": server_base if node == "server" else device_base,
            "flops": float(speed),
            "description": f"{node} as measured by {Path(run_dir).name}",
        }
        if node == "server":
            prof.update(LOOPBACK)
        elif links is not None and node in links:
            prof.update(links[node].profile_fields())
        out[f"measured-{node}"] = prof
    return out


def write_profiles(profiles: dict[str, dict[str, Any]], path: str | Path) -> Path:
    p = Path(path)
    p.write_text(yaml.safe_dump({"profiles": profiles}, sort_keys=False), encoding="utf-8")
    return p
