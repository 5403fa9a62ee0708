"""Server-side segment MFU in splitfed: how much of the GPU's peak the server's part of a split
step uses.

The server of a splitfed run holds blocks [cut, n) and the head; per step it receives a cut
activation batch, runs its segment forward, the loss, the backward (to its adapters and the cut
gradient) and an AdamW step. This times exactly that with cotune's own pieces (`Segment`,
`task_loss`, the `FlopCounter` that the simulator uses), on the Qwen2.5-0.5B architecture
(random weights), bf16 base with fp32 LoRA r=16 on every projection. MFU = counted FLOPs per
second / the GPU's dense bf16 peak (`--peak-tflops`, default 989: H100/H200 SXM).

Run on a GPU: python benchmarks/gpu_split_mfu.py [--cut 2 --batch 16 --seq 512]
Smoke run on a CPU: python benchmarks/gpu_split_mfu.py --device cpu --tiny --cut 1 --peak-tflops 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from gpu_lora_step import QWEN25_05B, TARGETS, TINY  # this folder (run as a script)


def main() -> None:
    from cotune.accel.placement import move_to
    from cotune.config import ModelSection, PeftSection
    from cotune.models import Activations, load_model, task_loss
    from cotune.peft import inject_adapters
    from cotune.sim.costs import FlopCounter

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--cut", type=int, default=2, help="blocks on the device side")
    ap.add_argument("--batch", type=int, default=16, help="activations per server step")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args()
    device = torch.device(args.device)
    arch = TINY if args.tiny else QWEN25_05B
    dtype = "float32" if device.type == "cpu" else "bfloat16"
    section = ModelSection(
        name_or_path="random:qwen2", task="causal_lm", dtype=dtype, max_length=args.seq,
        random_config={k: v for k, v in arch.items() if k != "vocab_size"},
    )  # fmt: skip
    lm = load_model(section, vocab_size=arch["vocab_size"], seed=0)
    move_to(lm.model, device)
    adapters = inject_adapters(lm.model, PeftSection(r=16, alpha=32, target_modules=TARGETS))
    n = lm.anatomy.num_layers
    if not 0 < args.cut < n:
        ap.error(f"--cut {args.cut}: the server needs a block of the model's {n} (use 1..{n - 1})")
    server = lm.anatomy.segment(args.cut, n)
    params = [p for n_, p in adapters.named_trainable().items() if server.owns(n_)]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    lm.model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, arch["vocab_size"], (args.batch, args.seq), generator=g).to(device)
    mask = torch.ones_like(ids)
    hidden = torch.randn(args.batch, args.seq, lm.anatomy.hidden_size, generator=g).to(device)
    hidden = hidden.to(next(lm.model.parameters()).dtype)

    def step() -> float:
        acts = Activations(hidden.detach().requires_grad_(True), mask)
        loss = task_loss(server(acts), ids, "causal_lm")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    _, flops = FlopCounter().run("server", step)  # counted once, as the simulator counts it
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(args.repeats):
        sync()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        times.append((time.perf_counter() - t) / args.steps)
    sec = statistics.median(times)
    achieved = flops / sec / 1e12
    print(f"server segment: blocks [{args.cut}, {n}) + head of the "
          f"{'tiny' if args.tiny else 'Qwen2.5-0.5B-shaped'} model on {device}, "
          f"batch {args.batch} x {args.seq}")  # fmt: skip
    print(f"  {flops / 1e9:.1f} GFLOP/step counted, {sec * 1000:.1f} ms/step, "
          f"{achieved:.1f} TFLOP/s, MFU {achieved / args.peak_tflops:.1%} of "
          f"{args.peak_tflops:g} TFLOP/s")  # fmt: skip


if __name__ == "__main__":
    main()
