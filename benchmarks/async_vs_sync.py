"""Asynchronous vs synchronous federated fine-tuning on the demo's heterogeneous fleet: simulated
time to a target accuracy and final accuracy, the same device work for each.

The demo task (MiniLM, `fortunes`, 8 devices: 2 phone-low, 4 phone-mid, 2 Jetson; Dirichlet
alpha=0.5): fedavg with every device every round (configs/demo/fedavg.yaml with fraction 1.0)
against fedbuff (buffer 4) and fedasync (alpha 0.6), each taking --tasks device tasks of 5
local steps; evaluation every 10 equivalent steps; target accuracy --target. Over --seeds seeds.

Run: .venv/bin/python benchmarks/async_vs_sync.py [--tasks 48 --seeds 3 --target 0.6]
Reference (issue 17): FedScale's published FedBuff run saved ~32% virtual time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from cotune.config import config_from_dict, read_yaml
from cotune.report.seeds import mean_ci
from cotune.run import run_experiment

ROOT = Path(__file__).resolve().parents[1]


def config(paradigm: str, seed: int, tasks: int, target: float, out: str):
    d = read_yaml(ROOT / "configs/demo/fedavg.yaml")
    d.update(name=f"{paradigm}_s{seed}", seed=seed)
    local = 5
    steps = tasks * local // d["devices"]["count"]  # per-device steps if all work equally
    d["train"].update(steps=steps, warmup_steps=0)
    d["eval"].update(every=10, max_examples=200, target_accuracy=target)
    d["output"] = {"dir": out, "save_adapter": False}
    if paradigm == "fedavg":
        d["paradigm"] = {"name": "fedavg", "options": {"local_steps": local, "fraction": 1.0}}
    else:
        extra = {"buffer_size": 4} if paradigm == "fedbuff" else {"alpha": 0.6}
        d["paradigm"] = {
            "name": paradigm,
            "options": {"local_steps": local, "updates": tasks, **extra},
        }
    return config_from_dict(d)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=48)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--target", type=float, default=0.6)
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = tempfile.mkdtemp(prefix="async_")
    rows = []
    for paradigm in ("fedavg", "fedbuff", "fedasync"):
        hit, acc, total = [], [], []
        for seed in range(args.seeds):
            run_dir = run_experiment(config(paradigm, seed, args.tasks, args.target, out),
                                     quiet=True, report=False)  # fmt: skip
            s = json.loads((run_dir / "summary.json").read_text())
            acc.append(s["final"]["accuracy"])
            total.append(s["sim_time_s"])
            t = (s.get("time_to_target") or {}).get("sim_time_s")
            hit.append(t)
        reached = [t for t in hit if t is not None]
        row = {"paradigm": paradigm, "accuracy": acc, "sim_time_s": total, "time_to_target_s": hit}
        rows.append(row)
        m, ci = mean_ci(acc)
        tt = (f"{statistics.fmean(reached):.1f} s ({len(reached)}/{len(hit)} reached)"
              if reached else "not reached")  # fmt: skip
        print(f"{paradigm:<9} accuracy {m:.3f} ± {ci or 0:.3f}   time to {args.target}: {tt}   "
              f"whole run {statistics.fmean(total):.1f} s")  # fmt: skip
    base = [t for t in rows[0]["time_to_target_s"] if t is not None]
    for r in rows[1:]:
        got = [t for t in r["time_to_target_s"] if t is not None]
        if base and got:
            print(
                f"{r['paradigm']} / fedavg time to target: {statistics.fmean(got) / statistics.fmean(base):.3f}"
            )
    path = ROOT / "runs" / "bench" / "async_vs_sync.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
