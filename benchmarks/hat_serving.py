"""HAT serving many devices at once: per-device TTFT / TBT and cloud utilisation with 8-32
devices generating concurrently, the cloud serving them one request at a time (FIFO) or with
continuous batching across devices (`cotune.infer.serving`).

The base and drafter of `hat_inference.py` (6 blocks x 256 GPT-2, BPE 2000, trained here on
`austen`; the drafter distilled centrally), cut 1 + 1. Each device generates 32 tokens from its
own held-out 24-token prompt with HAT (gamma 4, greedy): real generations, FLOPs counted and
messages encoded, so every device has its own trace (its own acceptance pattern). Devices
alternate phone-mid and jetson; the cloud is the a100 profile. A cloud pass costs
max(FLOPs / FLOP/s, weight bytes / memory bandwidth):

- "this model": the middle's real weights (4 blocks, 12.6 MB fp32) — the cloud is nearly idle;
- "7B-class middle (what-if)": the same counted FLOPs, but each pass reads 13 GB of weights (a
  7B model's middle in bf16), the regime continuous batching exists for. This row changes only
  the memory term of the cost model; it is a sensitivity case, not a measurement of a 7B model.

Run: .venv/bin/python benchmarks/hat_serving.py [--devices 8 16 32 --base-steps 600]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from hat_inference import austen_corpus, trained_base

from cotune.infer.drafter import DrafterTraining, train_drafter
from cotune.infer.generate import UGenerator
from cotune.infer.serving import MEMORY_BPS, Cloud, middle_weight_bytes, serve
from cotune.infer.split import UCut
from cotune.infer.timeline import Timeline
from cotune.sim.profiles import get_profile


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--base-steps", type=int, default=600)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/hat_serving.json"))
    args = ap.parse_args()

    torch.manual_seed(0)
    data, texts, tok, stream = austen_corpus()
    big, loss = trained_base(tok, stream, args.base_steps)
    drafter, _ = train_drafter(big.anatomy, UCut(1, 1), tok.encode(texts, 64),
                               DrafterTraining(steps=args.base_steps))  # fmt: skip
    prompts = [s[:24] for s in tok.encode([e.text for e in data.test], 64) if len(s) >= 24]
    n_max = max(args.devices)
    if len(prompts) < n_max:
        raise SystemExit(f"only {len(prompts)} held-out prompts for {n_max} devices")
    phone, jetson, a100 = get_profile("phone-mid"), get_profile("jetson"), get_profile("a100")
    gen = UGenerator(big.anatomy, UCut(1, 1), drafter=drafter, gamma=4)
    traces, acceptance = {}, []
    for i in range(n_max):
        out = gen.generate(prompts[i], args.new, timeline=Timeline(phone, a100))
        traces[f"device-{i}"] = out.trace
        acceptance.append(out.acceptance_rate)
    print(f"base loss {loss:.3f}; {n_max} generations, drafter acceptance "
          f"{min(acceptance):.2f}-{max(acceptance):.2f}", flush=True)  # fmt: skip
    weights = {"this model": float(middle_weight_bytes(big.anatomy, 1, 1)),
               "7B-class middle (what-if)": 13e9}  # fmt: skip
    rows = []
    print(f"\n{'middle weights':<27}{'devices':>8} {'cloud':<9}{'TTFT mean':>10}{'TBT mean':>10}"
          f"{'TBT max':>10}{'cloud util':>11}{'batch':>7}")  # fmt: skip
    for label, wb in weights.items():
        for n in args.devices:
            names = [f"device-{i}" for i in range(n)]
            profiles = {d: (phone if i % 2 == 0 else jetson) for i, d in enumerate(names)}
            for batching in (False, True):
                cloud = Cloud(a100, weight_bytes=wb, mem_bps=MEMORY_BPS["a100"],
                              batching=batching, max_batch=32)  # fmt: skip
                res = serve({d: traces[d] for d in names}, profiles, cloud)
                row = {"weights": label, "weight_bytes": wb, "devices": n,
                       "cloud": "batched" if batching else "FIFO",
                       **{k: v for k, v in res.items() if k != "devices"},
                       "per_device": {d: {k: v[k] for k in ("profile", "ttft_s", "tbt_s")}
                                      for d, v in res["devices"].items()}}  # fmt: skip
                rows.append(row)
                print(f"{label:<27}{n:>8} {row['cloud']:<9}{res['ttft_s_mean'] * 1e3:>8.1f}ms"
                      f"{res['tbt_s_mean'] * 1e3:>8.1f}ms{res['tbt_s_max'] * 1e3:>8.1f}ms"
                      f"{res['cloud_utilisation']:>10.1%}{res['mean_batch']:>7.1f}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"base_loss": loss, "acceptance": acceptance, "rows": rows},
                                   indent=2))  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
