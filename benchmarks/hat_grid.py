"""HAT serving for real: `hat_serve` in-process, over gRPC on loopback, and over shaped links.

1. The base: `hat_inference.py`'s 6-block x 256 GPT-2 (BPE 2000) trained on `austen`, and a
   drafter distilled centrally for cut 1 + 1 (`train_drafter`): random weights draft nothing
   worth measuring.
2. `cotune run` / `cotune launch` of `hat_serve` (2 devices, 4 requests each, 24-token prompts,
   32 new tokens, greedy), each with gamma 4 (HAT: drafting) and gamma 0 (plain U-shaped: one
   cloud round trip per token), on
   - `local`: device and cloud roles in this process (the host cost of the protocol alone);
   - `grpc` on loopback: the server and each device in its own process, TLS, per-device tokens;
   - `grpc` over shaped links (root only): each device process in its own network namespace,
     tbf-shaped 8/16 Mbit/s, one-way latency 20 ms (device-0) and 40 ms (device-1) through a
     delaying proxy (`cotune.deploy.netlab`).
3. Per setting: host TTFT and TBT measured on the devices (mean over requests), acceptance,
   bytes per token. Every setting must yield the same tokens (checked).

Run: .venv/bin/python benchmarks/hat_grid.py [--base-steps 600 --drafter-steps 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hat_drafter_fed import DATA, save_base
from hat_inference import austen_corpus, trained_base

from cotune.config import config_from_dict
from cotune.deploy.launch import launch
from cotune.deploy.netlab import Link, ShapedLinks, netlab_unavailable
from cotune.infer.drafter import DrafterTraining, save_drafter, train_drafter
from cotune.infer.split import UCut
from cotune.run import run_experiment

LINKS = {
    "device-0": Link(up_mbit=8, down_mbit=16, latency_s=0.020),
    "device-1": Link(up_mbit=8, down_mbit=16, latency_s=0.040),
}
DEVICE_ENV = {"OMP_NUM_THREADS": "1"}


def job(model_dir: Path, drafter: Path, out: Path, gamma: int, name: str, requests: int) -> dict:
    return {
        "name": name, "seed": 0,
        "model": {"name_or_path": str(model_dir), "task": "causal_lm", "max_length": 64},
        "data": {**DATA, "max_examples": 400}, "partition": {"scheme": "iid"},
        "devices": {"count": 2, "server": "a100"},
        "peft": {"target_modules": ["c_attn"]},
        "paradigm": {"name": "hat_serve", "options": {
            "gamma": gamma, "drafter": str(drafter) if gamma else None, "prompt_tokens": 24,
            "max_new_tokens": 32}},
        "train": {"steps": requests},
        "eval": {"max_examples": 16},
        "engine": {"request_timeout_s": 300},
        "output": {"dir": str(out), "checkpoint_every": 0},
    }  # fmt: skip


def figures(run_dir: Path) -> dict:
    s = json.loads((run_dir / "serving.json").read_text())
    ok = [r for r in s["requests"] if r["ok"]]
    assert len(ok) == len(s["requests"]), "a request failed"
    return {
        "host_ttft_s": statistics.fmean(r["host_ttft_s"] for r in ok),
        "host_tbt_s": statistics.fmean(r["host_tbt_s"] for r in ok),
        "by_device_tbt_s": {
            d: statistics.fmean(r["host_tbt_s"] for r in ok if r["device"] == d)
            for d in sorted({r["device"] for r in ok})
        },  # fmt: skip
        "acceptance": s["acceptance_rate"],
        "bytes_per_token": s["bytes_per_token"],
        "tokens": [r["tokens"] for r in ok],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-steps", type=int, default=600)
    ap.add_argument("--drafter-steps", type=int, default=300)
    ap.add_argument("--requests", type=int, default=4, help="per device")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/hat_grid.json"))
    args = ap.parse_args()

    torch.manual_seed(0)
    data, texts, tok, stream = austen_corpus()
    t0 = time.perf_counter()
    big, loss = trained_base(tok, stream, args.base_steps)
    print(f"base trained: loss {loss:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    drafter, _ = train_drafter(big.anatomy, UCut(1, 1), tok.encode(texts, 64),
                               DrafterTraining(steps=args.drafter_steps, batch_size=8))  # fmt: skip

    why = netlab_unavailable()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="hat_grid_") as tmp:
        root = Path(tmp)
        save_base(big, tok, root / "base")
        where = save_drafter(drafter, UCut(1, 1), root / "drafter", {"steps": args.drafter_steps})
        for gamma in (4, 0):
            label = "HAT (gamma 4)" if gamma else "U-shaped (gamma 0)"

            def cfg(engine: str, g: int = gamma) -> object:
                raw = job(root / "base", where, root / "runs", g, f"{engine}-{g}", args.requests)
                return config_from_dict(raw)

            results[f"local, {label}"] = figures(run_experiment(cfg("local"), quiet=True,
                                                                report=False))  # fmt: skip
            results[f"grpc loopback, {label}"] = figures(
                launch(cfg("loop"), quiet=True, device_env=DEVICE_ENV)
            )
            if why is None:
                with ShapedLinks(LINKS) as lab:
                    run_dir = launch(cfg("shaped"), quiet=True, wrap=lab.wrap,
                                     server_hosts=lab.hosts, device_env=DEVICE_ENV)  # fmt: skip
                results[f"grpc shaped 20/40 ms, {label}"] = figures(run_dir)
            print(f"{label}: done", flush=True)
    ref = next(iter(results.values()))["tokens"]
    for name, r in results.items():
        assert r.pop("tokens") == ref, f"{name}: other tokens"
    print(f"\n{'setting':<36} {'TTFT':>9} {'TBT':>9} {'accept':>7} {'B/token':>8}")
    for name, r in results.items():
        print(f"{name:<36} {r['host_ttft_s'] * 1e3:>7.1f}ms {r['host_tbt_s'] * 1e3:>7.1f}ms "
              f"{r['acceptance'] or 0:>7.3f} {r['bytes_per_token']:>8.0f}")  # fmt: skip
    for where_ in ("grpc loopback", "grpc shaped 20/40 ms"):
        hat, plain = (
            results.get(f"{where_}, HAT (gamma 4)"),
            results.get(f"{where_}, U-shaped (gamma 0)"),
        )
        if hat and plain:
            print(f"{where_}: HAT TBT / U-shaped TBT = {hat['host_tbt_s'] / plain['host_tbt_s']:.3f}, "
                  f"TTFT ratio {hat['host_ttft_s'] / plain['host_ttft_s']:.3f}")  # fmt: skip
    loc, loop = results["local, HAT (gamma 4)"], results["grpc loopback, HAT (gamma 4)"]
    print(f"gRPC loopback / in-process TBT (HAT): {loop['host_tbt_s'] / loc['host_tbt_s']:.3f}")
    if why is not None:
        print(f"(shaped links skipped: {why})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                    "results": results}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
