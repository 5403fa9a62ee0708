"""A synthetic run directory shaped like the ones run.py writes."""

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
                }
            )
        )
    return d


@pytest.fixture
def make_run():
    """Factory: make_run(root, name, task=..., devices=..., sim_time=..., summary=..., scale=...)."""
    return _make_run


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return _make_run(tmp_path, "fedavg-lora", sim_time=True)
