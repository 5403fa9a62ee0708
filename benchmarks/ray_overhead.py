"""The Ray engine's overhead: the demo's fedavg (MiniLM, 8 devices, 4 per round, 5 local steps)
on `engine.kind: ray` with one host actor vs the `local` engine, host seconds per round
(between the first and last round records, so start-up is apart), alternating A B A B.
Start-up (Ray and the host actor building its node) is reported beside it.

Run: .venv/bin/python benchmarks/ray_overhead.py [--repeats 2] [--steps 30]
Target (issue 14): ray (1 host) / local <= 1.15 per round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import ray

from cotune.config import config_from_dict, read_yaml
from cotune.run import run_experiment

ROOT = Path(__file__).resolve().parents[1]


def per_round(run_dir: Path) -> float:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in recs if r["event"] == "round"]
    return (rounds[-1]["host_time_s"] - rounds[0]["host_time_s"]) / (len(rounds) - 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    d = read_yaml(ROOT / "configs/demo/fedavg.yaml")
    d["train"]["steps"] = args.steps
    d["eval"] = {"every": 10_000, "max_examples": 16}
    d["output"] = {"dir": tempfile.mkdtemp(prefix="ray_overhead_"), "checkpoint_every": 0,
                   "save_adapter": False}  # fmt: skip
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    local, remote, start_local, start_ray = [], [], [], []
    for i in range(args.repeats):
        for kind, out, starts in (("local", local, start_local), ("ray", remote, start_ray)):
            # The host may use both cores, as the local engine does (Ray gives an actor as
            # many torch threads as the CPUs it asks for). A fresh host per run, so the
            # start-up column keeps meaning a host's start (ray_kept_hosts.py measures reuse).
            ray_cfg = {"hosts": 1, "num_cpus_per_host": 2, "keep_hosts": False}
            engine = {"kind": kind, "ray": ray_cfg}
            cfg = config_from_dict({**d, "name": f"{kind}-{i}", "engine": engine})
            t = time.perf_counter()
            run_dir = run_experiment(cfg, quiet=True, report=False)
            total = time.perf_counter() - t
            out.append(per_round(run_dir))
            recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            starts.append(total - (recs[-1]["host_time_s"] - recs[0]["host_time_s"]))
    ray.shutdown()
    a, b = statistics.median(local), statistics.median(remote)
    print(f"fedavg round: local {a:.3f} s, ray (1 host) {b:.3f} s, ratio {b / a:.3f} "
          f"(target <= 1.15: {'met' if b / a <= 1.15 else 'NOT met'}); start-up and tail: "
          f"local {statistics.median(start_local):.1f} s, ray "
          f"{statistics.median(start_ray):.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
