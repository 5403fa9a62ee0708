"""Accuracy of every PEFT method on the demo task after the same SHORT budget, central and fedavg.

The demo task (MiniLM, 5 `fortunes` categories, 8 heterogeneous devices, Dirichlet alpha=0.5,
batch 16 x 40, lr 2e-3 linear): every registered method (`cotune.peft.available_methods()`) with
targets query/value, r=8, alpha=16 and its default options (MoSLD: joint stage, 4 experts top-2;
MoDULA: `universal` stage, i.e. the first of its three stages; GeLoRA: ranks at LoRA's parameter
budget; D²LoRA: 20 warm-up steps on `austen`, untimed and off the simulated clock), run twice:
`central` (configs/demo/central.yaml, --central-steps steps) and `fedavg`
(configs/demo/fedavg.yaml, --fedavg-rounds rounds of --local-steps local steps, 4 of 8 devices).
Accuracy of the final (global) adapter on the first --eval-examples (100) test examples.

These are SHORT-BUDGET numbers (a few dozen steps, sized for a shared 2-core machine): they rank
how fast each method starts to learn at lr 2e-3, not the accuracy it converges to.

Run: .venv/bin/python benchmarks/method_accuracy.py [--central-steps 20 --fedavg-rounds 4 --local-steps 2 --eval-examples 100]
Target: none set by the issue; a table method -> central accuracy -> fedavg accuracy.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from cotune.config import config_from_dict, read_yaml
from cotune.peft import available_methods
from cotune.run import run_experiment

ROOT = Path(__file__).resolve().parents[1]


def make_cfg(yaml: str, method: str, steps: int, out: str, options: dict, n_eval: int):
    d = read_yaml(ROOT / yaml)
    d["name"] = f"{d['name']}_{method}"
    d["peft"]["method"] = method
    d["paradigm"].setdefault("options", {}).update(options)
    d["train"].update(steps=steps, warmup_steps=max(1, steps // 10))
    d["eval"]["every"] = steps  # evaluate once, at the end
    d["eval"]["max_examples"] = n_eval
    d["output"] = {"dir": out, "save_adapter": False}
    return config_from_dict(d)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--central-steps", type=int, default=20)
    ap.add_argument("--fedavg-rounds", type=int, default=4)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--eval-examples", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = tempfile.mkdtemp(prefix="method_acc_")
    methods = args.methods or list(available_methods())
    rows = []
    for m in methods:
        row = [m]
        for yaml, steps, opts in (
            ("configs/demo/central.yaml", args.central_steps, {}),
            ("configs/demo/fedavg.yaml", args.fedavg_rounds * args.local_steps,
             {"local_steps": args.local_steps}),
        ):  # fmt: skip
            t = time.perf_counter()
            run = run_experiment(make_cfg(yaml, m, steps, out, opts, args.eval_examples), overwrite=True, quiet=True,
                                 report=False)  # fmt: skip
            s = json.loads((run / "summary.json").read_text())
            row += [s["final"]["accuracy"], time.perf_counter() - t]
        rows.append(row)
        print(f"{m:<8} central {row[1]:.3f} ({row[2]:.0f} s)  fedavg {row[3]:.3f} ({row[4]:.0f} s)",
              flush=True)  # fmt: skip
    lora = next((r for r in rows if r[0] == "lora"), None)
    print(f"\ncentral: {args.central_steps} steps; fedavg: {args.fedavg_rounds} rounds x "
          f"{args.local_steps} local steps, 4 of 8 devices (Dirichlet 0.5)")  # fmt: skip
    print("| method | central acc | Δ vs LoRA | fedavg acc | Δ vs LoRA |")
    print("|---|---|---|---|---|")
    for r in rows:
        dc = f"{(r[1] - lora[1]) * 100:+.1f}" if lora else "-"
        df = f"{(r[3] - lora[3]) * 100:+.1f}" if lora else "-"
        print(f"| {r[0]} | {r[1]:.3f} | {dc} | {r[3]:.3f} | {df} |")


if __name__ == "__main__":
    main()
