"""FedAvg at scale: memory of 100 devices vs 2, and the protocol's host-time overhead.

Both runs train MiniLM (LoRA r=8, q/v) with 2 clients per round, so the compute is the same;
only the number of simulated devices differs. Each run is its own process so peak RSS is its own.

Run: .venv/bin/python benchmarks/fedavg_scale.py [--rounds 3]
Targets: peak RSS(100 devices) / peak RSS(2 devices) <= 1.2;
         round host time / devices' own training host time <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys
from cotune.config import load_config
from cotune.report import read_metrics
from cotune.run import run_experiment
devices, rounds, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
cfg = load_config("configs/demo/fedavg.yaml", [
    f"devices.count={devices}", "devices.mix=null", "partition.scheme=iid", "partition.min_size=1",
    "paradigm.options.clients_per_round=2", "paradigm.options.fraction=1.0",
    "paradigm.options.local_steps=4", f"train.steps={4 * rounds}", f"eval.every={4 * rounds}",
    "eval.max_examples=64", f"output.dir={out}", f"name=scale{devices}",
])
run_dir = run_experiment(cfg, overwrite=True, quiet=True, report=False)
rounds_ = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["event"] == "round"]
print(json.dumps({
    "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "round_host_s": sum(r["round_host_s"] for r in rounds_),
    "device_train_host_s": sum(r["device_train_host_s"] for r in rounds_),
}))
"""


def measure(devices: int, rounds: int, out: str) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(devices), str(rounds), out],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as out:
        small = measure(2, args.rounds, out)
        large = measure(100, args.rounds, out)
    for name, m in (("2 devices", small), ("100 devices", large)):
        overhead = m["round_host_s"] / m["device_train_host_s"]
        print(
            f"{name:<12} peak RSS {m['maxrss_mb']:7.1f} MB   round/train host time {overhead:.3f}"
        )
    ratio = large["maxrss_mb"] / small["maxrss_mb"]
    overhead = large["round_host_s"] / large["device_train_host_s"]
    print(
        f"peak RSS ratio 100/2 devices: {ratio:.3f}  (target <= 1.2: {'met' if ratio <= 1.2 else 'NOT met'})"
    )
    print(
        f"round overhead (100 devices): {overhead:.3f}  (target <= 1.05: {'met' if overhead <= 1.05 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
