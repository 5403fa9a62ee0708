"""Issue 17's accuracy tables on the demo task: DP-FedAvg accuracy against epsilon, and
heterogeneous LoRA ranks (zero-pad vs stacking vs one rank for all) at equal device memory.

DP: configs/fedavg_dp.yaml (MiniLM, 16 devices, 4 per round, 5 local steps, clip 0.5, central
DP, RDP accountant, delta 1e-3) for --rounds rounds, with no DP and with target epsilon in
--epsilons; each over --seeds seeds (mean ± 95% CI, Student's t).

Ranks: configs/fedavg_hetero_ranks.yaml (8 devices: phone-low rank 2, phone-mid 4, jetson 8;
half per round) with stack and zero_pad, against one rank for every device: 2 (what the smallest
device can hold: equal device memory) and 8 (the largest, ignoring memory).

Secure aggregation: configs/fedavg_secagg.yaml (8 devices, 6 per round, SecAgg+ with 4
neighbours, and with everyone) against the same run without it: bytes per round, simulated and
host time (one seed).

Run: .venv/bin/python benchmarks/fed_privacy_ranks.py [--rounds 10 --seeds 3] [--only dp|ranks|secagg]
Targets (issue 17): the tables themselves (no figure set).
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


def run(yaml: str, name: str, seed: int, rounds: int, out: str, edit) -> dict:
    d = read_yaml(ROOT / yaml)
    d["name"], d["seed"] = f"{name}_s{seed}", seed
    local = d["paradigm"]["options"]["local_steps"]
    d["train"].update(steps=rounds * local, warmup_steps=0)
    d["eval"].update(every=rounds * local, max_examples=200)
    d["output"] = {"dir": out, "save_adapter": False}
    edit(d)
    run_dir = run_experiment(config_from_dict(d), quiet=True, report=False)
    return json.loads((run_dir / "summary.json").read_text())


def fmt(values: list[float]) -> str:
    m, ci = mean_ci(values)
    return f"{m:.3f}" + (f" ± {ci:.3f}" if ci is not None else "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 4.0, 16.0, 64.0])
    ap.add_argument("--only", choices=["dp", "ranks", "secagg"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = tempfile.mkdtemp(prefix="fed_dp_ranks_")
    result: dict = {"dp": [], "ranks": []}

    if args.only in (None, "dp"):
        print(f"DP-FedAvg, {args.rounds} rounds, {args.seeds} seeds")
        for eps in [None, *args.epsilons]:
            accs, spent, sigma = [], [], None
            for seed in range(args.seeds):

                def edit(d, eps=eps):
                    if eps is None:
                        d["train"]["dp"] = {"mode": "off"}
                    else:
                        d["train"]["dp"]["target_epsilon"] = eps

                s = run("configs/fedavg_dp.yaml", f"dp_{eps}", seed, args.rounds, out, edit)
                accs.append(s["final"]["accuracy"])
                dp = s.get("extra", {}).get("dp")
                if dp:
                    spent.append(dp["epsilon"])
                    sigma = dp["noise_multiplier"]
            row = {"target_epsilon": eps, "accuracy": accs, "spent": spent, "sigma": sigma}
            result["dp"].append(row)
            label = (
                "no DP"
                if eps is None
                else f"ε ≤ {eps:g} (σ = {sigma:.3f}, spent {statistics.fmean(spent):.2f})"
            )
            print(f"  {label:<40} accuracy {fmt(accs)}")

    if args.only in (None, "ranks"):
        print(f"heterogeneous ranks, {args.rounds} rounds, {args.seeds} seeds")
        setups = {
            "stack (2/4/8)": lambda d: d["paradigm"]["options"].update(rank_aggregation="stack"),
            "zero_pad (2/4/8)": lambda d: d["paradigm"]["options"].update(rank_aggregation="zero_pad"),
            "rank 2 for all (equal memory)": lambda d: (d["devices"].pop("ranks"), d["peft"].update(r=2, alpha=4)),
            "rank 8 for all (ignores memory)": lambda d: d["devices"].pop("ranks"),
        }  # fmt: skip
        for name, edit in setups.items():
            accs, up = [], []
            for seed in range(args.seeds):
                s = run(
                    "configs/fedavg_hetero_ranks.yaml",
                    "".join(c if c.isalnum() else "_" for c in name),
                    seed,
                    args.rounds,
                    out,
                    edit,
                )
                accs.append(s["final"]["accuracy"])
                up.append(s["costs"]["devices"]["bytes_up"])
            result["ranks"].append({"setup": name, "accuracy": accs, "device_bytes_up": up})
            print(
                f"  {name:<34} accuracy {fmt(accs)}   device bytes up {statistics.fmean(up) / 1e6:.2f} MB"
            )
    if args.only in (None, "secagg"):
        print(f"secure aggregation overhead, {args.rounds} rounds")
        result["secagg"] = []
        for name, edit in {
            "plain": lambda d: d["paradigm"]["options"].pop("secure_aggregation"),
            "secagg (4 neighbours)": lambda d: None,
            "secagg (everyone)": lambda d: d["paradigm"]["options"]["secure_aggregation"].update(neighbors=None),
        }.items():  # fmt: skip
            slug = "".join(c if c.isalnum() else "_" for c in name)
            s = run("configs/fedavg_secagg.yaml", slug, 0, args.rounds, out, edit)
            per_round = (
                s["costs"]["devices"]["bytes_up"] + s["costs"]["devices"]["bytes_down"]
            ) / args.rounds
            row = {"setup": name, "bytes_per_round": per_round, "sim_time_s": s["sim_time_s"],
                   "host_time_s": s["host_time_s"], "accuracy": s["final"]["accuracy"]}  # fmt: skip
            result["secagg"].append(row)
            print(f"  {name:<24} device bytes/round {per_round / 1e6:.3f} MB, simulated "
                  f"{s['sim_time_s']:.1f} s, host {s['host_time_s']:.1f} s, accuracy {row['accuracy']:.3f}")  # fmt: skip
    path = ROOT / "runs" / "bench" / "fed_privacy_ranks.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
