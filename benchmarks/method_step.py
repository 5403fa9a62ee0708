"""Training-step time of every PEFT method relative to LoRA, interleaved in one process.

MiniLM (all-MiniLM-L6-v2) sequence classification on the demo config (configs/demo/central.yaml),
every method on the same targets (query, value) with the same rank 8 / alpha 16 (+ classification
head), batch 16 x 40 tokens (the demo's shape), AdamW (the demo's lr) over the method's trainable set,
loss = task loss + the method's regularizer (KaSA). Each method is built by cotune's own
`build_experiment`, so its setup runs first and is NOT timed: GeLoRA's TwoNN rank computation
(its default: equal parameter budget to LoRA r=8), D²LoRA's warm-up on `austen` (default 20
steps), KaSA's/PiSSA's SVD and OLoRA's QR of the base. Staged methods are timed in a named
stage: MoSLD `joint` (its default: shared A, 4 experts' B, router, top-2), MoDULA `universal`
(its default, = a plain LoRA) and MoDULA `router` (all 2+1 experts forwarded, router trains).
The methods are timed in interleaved blocks (round-robin) so machine noise hits all alike.

Run: .venv/bin/python benchmarks/method_step.py [--blocks 4 --steps 3]
Target: none set by the issue; reported as ms/step and ratio to LoRA (lower is better).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cotune.build import build_experiment
from cotune.config import config_from_dict, read_yaml
from cotune.models import task_loss

ROOT = Path(__file__).resolve().parents[1]

VARIANTS: dict[str, tuple[str, dict]] = {
    "lora": ("lora", {}),
    "dora": ("dora", {}),
    "bora": ("bora", {}),
    "kasa": ("kasa", {}),
    "pissa": ("pissa", {}),
    "olora": ("olora", {}),
    "gelora": ("gelora", {}),
    "d2lora": ("d2lora", {}),
    "mosld (joint)": ("mosld", {}),
    "modula (universal)": ("modula", {"stage": "universal"}),
    "modula (router)": ("modula", {"stage": "router"}),
}


def build(method: str, options: dict, run_dir: str):
    d = read_yaml(ROOT / "configs/demo/central.yaml")
    d["peft"].update(method=method, r=8, alpha=16, target_modules=["query", "value"],
                     options=options)  # fmt: skip
    cfg = config_from_dict(d)
    t = time.perf_counter()
    exp, _ = build_experiment(cfg, Path(run_dir), quiet=True)
    setup = time.perf_counter() - t
    forward, adapters = exp.forward, exp.adapters
    params = [p for p in adapters.named_trainable().values() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3)
    exp.loaded.model.train()

    def step(ids, mask, labels):
        loss = task_loss(forward(ids, mask), labels, "classification")
        reg = adapters.regularization_loss()
        if reg is not None:
            loss = loss + reg
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, sum(p.numel() for p in params), setup


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 5, (args.batch,), generator=g)

    tmp = tempfile.mkdtemp(prefix="method_step_")
    runners = {}
    for name, (method, opts) in VARIANTS.items():
        runners[name] = build(method, opts, tmp)
        step, n, setup = runners[name]
        step(ids, mask, labels)  # warm-up
        print(f"{name:<19} {n:>8} trainable parameters, setup {setup:5.1f} s (untimed)")
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.blocks):
        for name, (step, _, _) in runners.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                step(ids, mask, labels)
            times[name].append((time.perf_counter() - t) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["lora"]
    print(f"\nbatch {args.batch} x {args.seq}, median of {args.blocks} blocks x {args.steps} steps")
    print("| method | trainable params | ms/step | ratio to LoRA |")
    print("|---|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {runners[k][1]} | {v * 1000:.1f} | {v / base:.2f} |")


if __name__ == "__main__":
    main()
