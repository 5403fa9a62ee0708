"""HAT's drafter distilled where the text is (`hat_drafter`) vs distilled centrally, on a trained base.

1. The base: the 6-block x 256 GPT-2 (BPE 2000) of `hat_inference.py`, trained here with plain
   PyTorch on `austen` (random bases draft nothing worth measuring), saved as a local model.
2. Federated: `cotune run`'s `hat_drafter` on it: 4 devices (phone-mid, jetson; a100 cloud),
   cut 1 + 1, `--steps` drafter steps per device of batch 8, FedAvg every 10; the run's own
   counted costs (device FLOPs, bytes, simulated time) and its eval curve (greedy acceptance:
   the drafter's top token equals the full model's on held-out text).
3. Central: `train_drafter` on all the training text in one place, the same number of windows
   (4 x --steps steps of 8) — what the federated run is measured against.
4. Both drafters (and the untrained one: the identity, which skips the middle) drive HAT's
   speculative decoding (gamma 4, greedy) on held-out prompts: acceptance rate and simulated
   time between tokens on phone-mid <-> a100 (every design yields the full model's tokens).

Run: .venv/bin/python benchmarks/hat_drafter_fed.py [--steps 150 --base-steps 600]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hat_inference import austen_corpus, trained_base

from cotune.config import config_from_dict
from cotune.infer.drafter import DrafterTraining, load_drafter, train_drafter
from cotune.infer.generate import UGenerator
from cotune.infer.speculative import MiddleAdapter
from cotune.infer.split import UCut
from cotune.infer.timeline import Timeline
from cotune.run import run_experiment
from cotune.sim.profiles import get_profile

DATA = {"dataset": "austen", "view": "text", "max_examples": 3000}
DEVICES, BATCH = 4, 8


def save_base(big, tok, where: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    big.model.save_pretrained(where)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.bpe, pad_token="<pad>", eos_token="<eos>")
    hf.save_pretrained(where)


def federated(model_dir: Path, out: Path, steps: int) -> Path:
    cfg = config_from_dict({
        "name": "hat-drafter-fed", "seed": 0,
        "model": {"name_or_path": str(model_dir), "task": "causal_lm", "max_length": 64},
        "data": DATA, "partition": {"scheme": "iid"},
        "devices": {"count": DEVICES, "mix": {"phone-mid": 0.5, "jetson": 0.5}, "server": "a100"},
        "peft": {"target_modules": ["c_attn"]},
        "paradigm": {"name": "hat_drafter", "options": {"local_steps": 10}},
        "train": {"steps": steps, "batch_size": BATCH, "lr": 1e-3, "schedule": "constant"},
        "eval": {"every": max(1, steps // 5), "max_examples": 128},
        "output": {"dir": str(out), "save_adapter": True, "checkpoint_every": 0},
    })  # fmt: skip
    return run_experiment(cfg, overwrite=True, quiet=True, report=False)


def decode(big, drafter, prompts, new):
    """Mean acceptance and simulated TBT of HAT decoding with this drafter (greedy, gamma 4)."""
    acc, tbt, tokens = [], [], []
    for p in prompts:
        tl = Timeline(get_profile("phone-mid"), get_profile("a100"), parallel_drafting=True)
        out = UGenerator(big.anatomy, UCut(1, 1), drafter=drafter, gamma=4).generate(
            p, new, timeline=tl
        )
        acc.append(out.acceptance_rate)
        tbt.append(tl.summary()["tbt_s"])
        tokens.append(out.tokens)
    return statistics.fmean(acc), statistics.fmean(tbt), tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150, help="drafter steps per device")
    ap.add_argument("--base-steps", type=int, default=600)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/hat_drafter_fed.json"))
    args = ap.parse_args()

    torch.manual_seed(0)
    data, texts, tok, stream = austen_corpus()
    t0 = time.perf_counter()
    big, base_loss = trained_base(tok, stream, args.base_steps)
    print(f"base trained: loss {base_loss:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    with tempfile.TemporaryDirectory(prefix="hat_drafter_") as tmp:
        model_dir = Path(tmp) / "base"
        save_base(big, tok, model_dir)
        t0 = time.perf_counter()
        run_dir = federated(model_dir, Path(tmp) / "runs", args.steps)
        fed_host = time.perf_counter() - t0
        summary = json.loads((run_dir / "summary.json").read_text())
        recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        curve = [(r["step"], r["drafter_acceptance"]) for r in recs if r["event"] == "eval"]
        fed = load_drafter(run_dir / "drafter" / "cut-1-1", UCut(1, 1), 256)
        assert fed is not None

    t0 = time.perf_counter()
    seqs = tok.encode(texts, 64)
    central, _ = train_drafter(big.anatomy, UCut(1, 1), seqs,
                               DrafterTraining(steps=DEVICES * args.steps, batch_size=BATCH))  # fmt: skip
    central_host = time.perf_counter() - t0
    prompts = [s[:24] for s in tok.encode([e.text for e in data.test], 64) if len(s) >= 24]
    prompts = prompts[: args.prompts]
    identity = MiddleAdapter(256).eval()
    rows = {}
    ref = None
    for name, drafter in (("untrained (identity)", identity), ("central", central),
                          ("federated (hat_drafter)", fed)):  # fmt: skip
        acc, tbt, tokens = decode(big, drafter, prompts, args.new)
        ref = ref or tokens
        assert tokens == ref, f"{name}: other tokens than the full model's"
        rows[name] = {"acceptance": acc, "tbt_s": tbt}

    roles = summary["costs"]["roles"]
    devs = [r for k, r in roles.items() if k.startswith("device-")]
    fed_costs = {
        "device_flops_mean": statistics.fmean(r["flops"] for r in devs),
        "cloud_flops": roles["server"]["flops"],
        "bytes_up_per_device": summary["bytes"]["up"] / DEVICES,
        "bytes_down_per_device": summary["bytes"]["down"] / DEVICES,
        "sim_time_s": summary["sim_time_s"],
        "host_time_s": fed_host,
    }
    print(f"\nfederated drafter ({DEVICES} devices x {args.steps} steps of {BATCH}):")
    print("  eval greedy acceptance by step: " + ", ".join(f"{s}: {a:.3f}" for s, a in curve))
    print(f"  per device: {fed_costs['device_flops_mean'] / 1e9:.2f} GFLOP, "
          f"{fed_costs['bytes_up_per_device'] / 1e6:.1f} MB up, "
          f"{fed_costs['bytes_down_per_device'] / 1e6:.1f} MB down; cloud "
          f"{fed_costs['cloud_flops'] / 1e9:.2f} GFLOP; simulated {fed_costs['sim_time_s']:.1f} s; "
          f"host {fed_host:.0f} s (central distillation: host {central_host:.0f} s)")  # fmt: skip
    print(f"\n{'drafter':<26} {'acceptance (HAT, γ=4)':>22} {'TBT phone-mid↔a100':>20}")
    for name, r in rows.items():
        print(f"{name:<26} {r['acceptance']:>22.3f} {r['tbt_s'] * 1e3:>18.1f}ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "base_loss": base_loss, "curve": curve, "federated": fed_costs,
                                    "central_host_s": central_host, "decode": rows}, indent=2))  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
