"""Split learning's costs on the demo task, all runs in one script (one process, in turn).

MiniLM (LoRA r=8 on q/v), 5 `fortunes` classes, max_length 40, the demo fleet's mix
(phone-low/phone-mid/jetson, A100 server) with 8 devices (`--devices`), Dirichlet alpha=0.5, batch 8 per device.
  * device FLOPs per step: `splitfrozen` (frozen bottom, forward only) vs `splitfed` at the same
    cut (every device cut 2 of 6 blocks); expect <= 0.35 (no backward, no optimizer on devices);
  * device trainable parameters: `splitfed` (cut 2) vs `fedavg` (whole adapter); expect cut/L;
  * bytes per step and accuracy after an equal budget (15 steps) for each activation codec;
  * simulated time to a target accuracy: `splitfed` (fp32) vs `fedavg` (half of the devices
    per round, 5 local steps) at the same number of training examples (steps x devices x 8);
    the target is 0.5 when both reach it, else the highest level both reach (printed).

Run: .venv/bin/python benchmarks/split_costs.py [--steps 15 --devices 8 --lr 1e-2]
Targets: device FLOPs splitfrozen/splitfed <= 0.35; device params splitfed/fedavg ~ cut/L;
         sim time to target splitfed/fedavg < 1 (SplitLoRA: split-federated reaches it sooner).
"""

from __future__ import annotations

import argparse
import json
import tempfile

N_DEV = 8
LR = 1e-2
CODECS = ["fp32", "fp16", "bf16", "int8", "topk0.1"]
COMMON = [
    "model.max_length=40", "train.batch_size=8", "eval.max_examples=64",
    "output.save_adapter=false",
]  # fmt: skip


def run(config: str, sets: list[str], out: str) -> tuple[dict, list[dict]]:
    from cotune.config import load_config
    from cotune.run import run_experiment

    cfg = load_config(config, [*COMMON, *sets, f"output.dir={out}", f"devices.count={N_DEV}",
                                      f"train.lr={LR}"])  # fmt: skip
    run_dir = run_experiment(cfg, overwrite=True, quiet=True, report=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, [r for r in recs if r["event"] == "eval" and r["role"] in ("server", "mean")]


def first_hit(evals: list[dict], target: float) -> float | None:
    return next((r["sim_time_s"] for r in evals if r["accuracy"] >= target), None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--devices", type=int, default=8, help="the demo fleet has 8")
    ap.add_argument("--lr", type=float, default=1e-2, help="the same for every run")
    args = ap.parse_args()
    global N_DEV, LR
    s, cut, n_dev = args.steps, 2, args.devices
    N_DEV, LR = n_dev, args.lr
    every = max(1, s // 4)
    split = [f"train.steps={s}", f"eval.every={every}", f"paradigm.options.cut={cut}",
             f"paradigm.options.aggregate_every={every}", "train.warmup_steps=2"]  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        sf = {c: run("configs/splitfed.yaml", [*split, f"engine.activation_codec={c}", f"name=sf-{c}"], out)
              for c in CODECS}  # fmt: skip
        frozen, _ = run(
            "configs/splitfrozen.yaml",
            [f"train.steps={s}", f"eval.every={every}", "name=frozen", "train.warmup_steps=2",
             f"paradigm.options.cuts=[{','.join([str(cut)] * n_dev)}]"],
            out,
        )  # fmt: skip
        # fedavg: n/2 devices x 5 local steps per round, 2s/5 rounds: n*s device batches,
        # the same number of training examples as splitfed's s steps x n devices.
        fed, fed_evals = run(
            "configs/demo/fedavg.yaml",
            [f"train.steps={2 * s}", "eval.every=5", "name=fedavg", "train.warmup_steps=2",
             "paradigm.options.local_steps=5", "paradigm.options.fraction=0.5"],
            out,
        )  # fmt: skip

    base, _ = sf["fp32"]
    dev_flops = {
        "splitfed": base["costs"]["devices"]["flops"] / (s * n_dev),
        "splitfrozen": frozen["costs"]["devices"]["flops"] / (s * n_dev),
    }
    r = dev_flops["splitfrozen"] / dev_flops["splitfed"]
    print(f"device GFLOPs per device-step (cut {cut}): splitfed {dev_flops['splitfed'] / 1e9:.3f}"
          f"  splitfrozen {dev_flops['splitfrozen'] / 1e9:.3f}  ratio {r:.3f}"
          f"  (expect <= 0.35: {'met' if r <= 0.35 else 'NOT met'})")  # fmt: skip
    p_sf, p_fed = base["extra"]["device_trainable_params"], fed["trainable_params"]
    print(f"device trainable params: splitfed {p_sf}  fedavg {p_fed}  ratio {p_sf / p_fed:.3f}"
          f"  (cut/L = {cut}/6 = {cut / 6:.3f}; fedavg's count includes the classifier head)")  # fmt: skip
    print(f"\n| codec | bytes/step | vs fp32 | accuracy after {s} steps | best |")
    print("|---|---|---|---|---|")
    for c in CODECS:
        summ, _ = sf[c]
        b = summ["bytes"]["total"] / s
        acc, best = summ["final"]["accuracy"], summ["best"].get("accuracy", float("nan"))
        print(
            f"| {c} | {b / 1e3:.1f} kB | {b / (base['bytes']['total'] / s):.3f} | {acc:.3f} | {best:.3f} |"
        )
    sf_evals = sf["fp32"][1]
    best_sf = max(e["accuracy"] for e in sf_evals)
    best_fed = max(e["accuracy"] for e in fed_evals)
    target = 0.5 if min(best_sf, best_fed) >= 0.5 else min(best_sf, best_fed)
    t_sf, t_fed = first_hit(sf_evals, target), first_hit(fed_evals, target)
    print(
        f"\nbest accuracy: splitfed {best_sf:.3f} ({s} steps)  fedavg {best_fed:.3f} ({2 * s} local steps/device)"
    )
    print(f"sim time to accuracy {target:.3f}: splitfed {t_sf:.1f} s  fedavg {t_fed:.1f} s  "
          f"ratio splitfed/fedavg {t_sf / t_fed:.3f}  (< 1: {'met' if t_sf < t_fed else 'NOT met'})"
          + ("" if target == 0.5 else "  [0.5 not reached by both]"))  # fmt: skip
    print(f"total sim time: splitfed {base['sim_time_s']:.1f} s  fedavg {fed['sim_time_s']:.1f} s;"
          f"  bytes: splitfed {base['bytes']['total'] / 1e6:.2f} MB  fedavg {fed['bytes']['total'] / 1e6:.2f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
