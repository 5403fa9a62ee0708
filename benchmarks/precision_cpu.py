"""bf16 vs fp32 on this CPU: step time (side by side) and accuracy of MiniLM fine-tuning.

Three variants of the demo's central MiniLM run (configs/demo/central.yaml, LoRA r=8 on
query/value + head): the fp32 base; a bf16 base (`model.dtype: bfloat16`, adapters and AdamW
state fp32); the fp32 base under bf16 autocast (`train.autocast: bf16`). Step time: each built
by cotune's `build_experiment`, one forward + backward + AdamW step on the demo's batch shape,
timed in interleaved blocks (round-robin, so machine noise hits all alike). Accuracy: the full
demo run of each variant (`run_experiment`), final test accuracy.

Whether bf16 is faster here depends on the CPU: with AVX512-BF16 / AMX, oneDNN runs bf16
matmuls natively; without them, bf16 is emulated and slower than fp32. The script prints what
this CPU has.

Run: .venv/bin/python benchmarks/precision_cpu.py [--blocks 5 --steps 3] [--no-accuracy]
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
VARIANTS = {
    "fp32 base": {},
    "bf16 base": {"model": {"dtype": "bfloat16"}},
    "fp32 base + bf16 autocast": {"train": {"autocast": "bf16"}},
}


def config(overrides: dict, name: str, out: str):
    d = read_yaml(ROOT / "configs/demo/central.yaml")
    for section, values in overrides.items():
        d.setdefault(section, {}).update(values)
    d["name"] = name
    d.setdefault("output", {})["dir"] = out
    d.setdefault("train", {})["device"] = "cpu"
    return config_from_dict(d)


def stepper(cfg, run_dir: str):
    exp, _ = build_experiment(cfg, Path(run_dir), quiet=True)
    forward, adapters = exp.forward, exp.adapters
    params = [p for p in adapters.named_trainable().values() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3)
    exp.loaded.model.train()

    def step(ids, mask, labels):
        loss = task_loss(forward(ids, mask), labels, "classification")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def cpu_flags() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n")[0].split()
    except (OSError, IndexError):
        return "unknown"
    wanted = ["avx512f", "avx512_bf16", "amx_bf16", "avx2"]
    return ", ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=40)
    ap.add_argument("--no-accuracy", action="store_true", help="skip the full demo runs")
    args = ap.parse_args()
    print(f"CPU flags: {cpu_flags()}; torch threads {torch.get_num_threads()}")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch, args.seq), generator=g)
    mask, labels = torch.ones_like(ids), torch.randint(0, 5, (args.batch,), generator=g)
    tmp = tempfile.mkdtemp(prefix="precision_cpu_")
    steps = {k: stepper(config(v, k.replace(" ", "-"), tmp), tmp) for k, v in VARIANTS.items()}
    for step in steps.values():
        step(ids, mask, labels)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.blocks):
        for name, step in steps.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                step(ids, mask, labels)
            times[name].append((time.perf_counter() - t) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    acc = {}
    if not args.no_accuracy:
        for name, over in VARIANTS.items():
            run_dir = run_experiment(
                config(over, "acc-" + name.replace(" ", "-").replace("+", "p"), tmp),
                quiet=True,
                report=False,
            )
            acc[name] = json.loads((run_dir / "summary.json").read_text())["final"]["accuracy"]
    base = med["fp32 base"]
    print(f"\nbatch {args.batch} x {args.seq}, median of {args.blocks} blocks x {args.steps} steps")
    print("| variant | ms/step | ratio to fp32 | final accuracy (demo run) |")
    print("|---|---|---|---|")
    for k, v in med.items():
        a = f"{acc[k]:.3f}" if k in acc else "-"
        print(f"| {k} | {v * 1000:.1f} | {v / base:.2f} | {a} |")


if __name__ == "__main__":
    main()
