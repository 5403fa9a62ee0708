"""A synthetic run directory shaped like the ones run.py writes."""

import csv
import json
import math
from pathlib import Path

import pytest

from cotune.report import MetricsLog


def _make_run(
    root: Path,
    name: str,
    *,
    task: str = "classification",
    devices: int = 3,
    sim_time: bool = False,
    summary: bool = True,
    scale: float = 1.0,
    costs: bool = False,
    target: float | None = None,
) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(
        f"name: {name}\nparadigm:\n  name: fedavg\ntrain:\n  lr: 0.001\n"
    )
    t = 0.0
    with MetricsLog(d / "metrics.jsonl") as log:
        for rnd in range(5):
            for k in range(devices):
                step = rnd * 10 + 10
                t += 0.1
                log.log(
                    {
                        "event": "train",
                        "step": step,
                        "round": rnd,
                        "role": f"device-{k}",
                        "loss": scale * (2.0 - 0.3 * rnd + 0.05 * k),
                        "lr": 1e-3,
                        "host_time_s": t,
                    }
                )
            rec = {
                "event": "eval",
                "step": rnd * 10 + 10,
                "round": rnd,
                "role": "server",
                "loss": scale * (2.1 - 0.3 * rnd),
                "host_time_s": t,
            }
            if task == "classification":
                rec["accuracy"] = 0.4 + 0.1 * rnd
            else:
                rec["perplexity"] = math.exp(6.0 - rnd)
            if sim_time:
                rec["sim_time_s"] = 3.0 * (rnd + 1)
                rec["bytes_up"] = 1000 * devices
            if costs:  # what run.py logs for a federated run: one round record per round
                log.log(
                    {
                        "event": "round",
                        "step": rnd * 10 + 10,
                        "role": "server",
                        "round": rnd + 1,
                        "participants": devices,
                        "reported": devices - (rnd == 2),
                        "dropped": int(rnd == 2),
                        "bytes_up": 30_000 * devices,
                        "bytes_down": 20_000 * devices,
                        "sim_time_s": 3.0 * (rnd + 1),
                        "host_time_s": t,
                    }
                )
            log.log(rec)
    if summary:
        final = {
            "loss": scale * 0.9,
            ("accuracy" if task == "classification" else "perplexity"): 0.8,
        }
        (d / "summary.json").write_text(
            json.dumps(
                {
                    "name": name,
                    "paradigm": "fedavg",
                    "peft_method": "lora",
                    "model": "random:gpt2",
                    "dataset": "fortunes",
                    "task": task,
                    "devices": devices,
                    "steps": 50,
                    "final": final,
                    "best": final,
                    "host_time_s": 12.5,
                    "bytes": {"up": 123456, "down": 654321, "total": 777777},
                    "trainable_params": 4096,
                    "partition": {"kind": "dirichlet", "alpha": 0.5},
                    **(_cost_summary(devices, target) if costs else {}),
                }
            )
        )
    if costs:
        write_costs_csv(d / "costs.csv", _role_costs(devices))
    return d


def _role_costs(devices: int) -> dict[str, dict]:
    roles = {
        "server": {
            "profile": "a100", "flops": 8.0e4, "bytes_up": 100_000 * devices,
            "bytes_down": 150_000 * devices, "compute_s": 1e-8, "comm_s": 1.0, "busy_s": 1e-8,
            "energy_j": 0.003, "memory_bytes": None, "memory_fits": None,
        }
    }  # fmt: skip
    for k in range(devices):
        compute = 0.5 if k % 2 == 0 else 0.02
        roles[f"device-{k}"] = {
            "profile": "phone-low" if k % 2 == 0 else "jetson",
            "flops": 1.5e9 * (k + 1), "bytes_up": 150_000, "bytes_down": 100_000,
            "compute_s": compute, "comm_s": 0.25, "busy_s": compute + 0.25,
            "energy_j": 2.5 + k, "memory_bytes": 512_000_000, "memory_fits": k != 3,
        }  # fmt: skip
    return roles


def _cost_summary(devices: int, target: float | None) -> dict:
    roles = _role_costs(devices)
    devs = [c for r, c in roles.items() if r != "server"]
    return {
        "sim_time_s": 15.0,
        "target_accuracy": target,
        "time_to_target": (
            {"step": 30, "round": 3, "sim_time_s": 9.0, "host_time_s": 4.5} if target else None
        ),
        "costs": {
            "total": {"flops": 1.0, "energy_j": 1.0, "compute_s": 1.0, "comm_s": 1.0},
            "devices": {
                k: sum(c[k] for c in devs) for k in ("flops", "bytes_up", "bytes_down", "energy_j")
            },
            "device_peak_memory_bytes": 512_000_000,
            "server": roles["server"],
            "roles": roles,
        },
    }


def write_costs_csv(path: Path, roles: dict[str, dict]) -> None:
    """As run.py writes it: one row per role, empty cells for None."""
    fields = ["role", "profile", "flops", "bytes_up", "bytes_down", "compute_s", "comm_s",
              "busy_s", "energy_j", "memory_bytes", "memory_fits"]  # fmt: skip
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for role, c in roles.items():
            w.writerow({"role": role, **{k: "" if c[k] is None else c[k] for k in fields[1:]}})


@pytest.fixture
def make_run():
    """Factory: make_run(root, name, task=..., devices=..., sim_time=..., summary=..., scale=...,
    costs=... (summary costs, costs.csv, round records), target=... (time to target))."""
    return _make_run


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return _make_run(tmp_path, "fedavg-lora", sim_time=True)
