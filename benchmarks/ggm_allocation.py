"""GGM's principal-component allocation vs LoRA and an AdaLoRA-like allocation, equal budget.

The demo's central task (MiniLM, 5 `fortunes` categories, query/value + head, batch 16 × 40,
lr 1e-2 linear). Three arms with the same trainable parameters (96 rank-1 components of the 12
query/value matrices, 73,728 adapter parameters + the head):
- `lora`: r = 8 everywhere (12 × 8 = 96 components), trained warm-up + steps optimizer steps;
- `ggm`: r = 16 SVD candidates per module (192 nodes), a `--warmup`-step warm-up collecting
  importance scores, the graph keeps 96 (48 important), then `--steps` more steps;
- `ggm-score`: the same warm-up, the top 96 components by mean importance alone (AdaLoRA-like
  one-shot allocation: the ablation without the graph);
- with --low-lr X: `ggm` and `lora` again at learning rate X.
Every arm gets the same number of optimizer steps (GGM's warm-up trains all its candidates, and
keeps the kept ones' values). Accuracy on the first --eval-examples test examples, mean ± 95% CI
over --seeds; step time interleaved in one process after the allocation (medians).

Run: .venv/bin/python benchmarks/ggm_allocation.py [--seeds 0 1 2 --warmup 20 --steps 40]
Target: none set by the issue; a table arm → accuracy (CI) → ms/step ratio to LoRA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cotune.build import build_experiment
from cotune.config import config_from_dict, read_yaml
from cotune.models import task_loss
from cotune.run import run_experiment

ROOT = Path(__file__).resolve().parents[1]
T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571}  # two-sided t, n − 1 dof


def arms(warmup: int, low_lr: float | None) -> dict[str, dict]:
    ggm = {"warmup_steps": warmup, "important_nodes": 48, "kept_nodes": 96}
    out = {
        "lora": {"method": "lora", "r": 8, "alpha": 8},
        "ggm": {"method": "ggm", "r": 16, "alpha": 16, "options": ggm},
        "ggm-score": {"method": "ggm", "r": 16, "alpha": 16, "options": {**ggm, "selection": "score"}},
    }  # fmt: skip
    if low_lr is not None:  # principal components hold W's scale: a smaller step may suit them
        out[f"ggm lr {low_lr:g}"] = {**out["ggm"], "lr": low_lr}
        out[f"lora lr {low_lr:g}"] = {**out["lora"], "lr": low_lr}
    return out


def make_cfg(peft: dict, steps: int, seed: int, out: str, n_eval: int):
    d = read_yaml(ROOT / "configs/demo/central.yaml")
    d["name"] = f"ggm_bench_{peft['method']}_{peft.get('options', {}).get('selection', 'x')}_{seed}"
    d["seed"] = seed
    peft = dict(peft)
    lr = peft.pop("lr", None)
    d["peft"] = {"target_modules": ["query", "value"], **peft}
    d["train"].update(steps=steps, warmup_steps=max(1, steps // 10))
    if lr is not None:
        d["train"]["lr"] = lr
        d["name"] += f"_lr{lr:g}"
    d["eval"].update(every=steps, max_examples=n_eval)
    d["output"] = {"dir": out, "save_adapter": False}
    return config_from_dict(d)


def ci(values: list[float]) -> tuple[float, float]:
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, float("nan")
    return m, T95.get(len(values), 2.0) * statistics.stdev(values) / len(values) ** 0.5


def step_times(specs: dict[str, dict], blocks: int, steps: int, out: str) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (16, 40), generator=g)
    mask, labels = torch.ones_like(ids), torch.randint(0, 5, (16,), generator=g)
    runners = {}
    for name, peft in specs.items():
        exp, _ = build_experiment(make_cfg(peft, 10, 0, out, 10), Path(out), quiet=True)
        params = list(exp.trainer.params.values())
        opt = torch.optim.AdamW(params, lr=1e-3)
        exp.loaded.model.train()

        def step(exp=exp, opt=opt):
            task_loss(exp.forward(ids, mask), labels, "classification").backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        runners[name] = (step, sum(p.numel() for p in params))
        exp.grid.close()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(blocks):
        for name, (step, _) in runners.items():
            t = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append((time.perf_counter() - t) / steps)
    return {k: statistics.median(v) for k, v in times.items()} | {
        f"{k}/params": n for k, (_, n) in runners.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-examples", type=int, default=200)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--low-lr", type=float, default=None,
                    help="also run GGM and LoRA at this learning rate (default: only the demo's)")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = tempfile.mkdtemp(prefix="ggm_bench_")
    specs = arms(args.warmup, args.low_lr)
    acc: dict[str, list[float]] = {k: [] for k in specs}
    for seed in args.seeds:
        for name, peft in specs.items():
            steps = args.steps + (args.warmup if peft["method"] == "lora" else 0)
            t = time.perf_counter()
            run = run_experiment(make_cfg(peft, steps, seed, out, args.eval_examples),
                                 overwrite=True, quiet=True, report=False)  # fmt: skip
            a = json.loads((run / "summary.json").read_text())["final"]["accuracy"]
            acc[name].append(a)
            print(f"seed {seed} {name:<10} accuracy {a:.3f} ({time.perf_counter() - t:.0f} s)",
                  flush=True)  # fmt: skip
    timing = step_times(specs, args.blocks, 3, out)
    base_acc, base_t = ci(acc["lora"])[0], timing["lora"]
    print(f"\n{len(args.seeds)} seeds; warm-up {args.warmup} + {args.steps} steps (LoRA: "
          f"{args.warmup + args.steps} steps); {args.eval_examples} test examples")  # fmt: skip
    print(
        "| arm | trainable params | accuracy (mean ± 95% CI) | Δ vs LoRA (points) | ms/step | ratio to LoRA |"
    )
    print("|---|---|---|---|---|---|")
    rows = {}
    for name in specs:
        m, h = ci(acc[name])
        rows[name] = {"accuracy": acc[name], "mean": m, "ci95": h,
                      "ms_per_step": timing[name] * 1000, "params": timing[f"{name}/params"]}  # fmt: skip
        print(f"| {name} | {timing[f'{name}/params']:,} | {m:.3f} ± {h:.3f} | "
              f"{(m - base_acc) * 100:+.1f} | {timing[name] * 1000:.1f} | {timing[name] / base_t:.2f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
