"""HAT (device-cloud collaborative inference): time to first token (TTFT) and time between tokens
(TBT) of HAT against its baselines, on the simulator's clock, and the host cost of the split.

1. A small GPT-2 (6 blocks x 256, BPE 2000) and a 1-block draft model are trained here with
   plain PyTorch on `austen` (random bases draft nothing useful); HAT's drafter is distilled on
   the same text with ``cotune.infer.drafter.train_drafter``.
2. On held-out prompts, greedy generation by: cloud-only, device-only, U-shaped (no drafting),
   plain speculative decoding with the small draft model, and HAT (U-shaped + drafter,
   chunked prefill chosen by simulated TTFT, parallel drafting; also without it). Every design yields the same tokens (checked);
   FLOPs are counted and messages encoded for real, then timed by ``VirtualClock`` for
   phone-mid and jetson devices with an a100 cloud.
3. The same designs that need no drafter at GPT-2-small size (12 x 768, vocab 50257, random
   weights: FLOPs and bytes are what matter there), prompt 128 tokens.
4. Host tokens/s of U-shaped decoding (messages encoded and decoded every token) against the
   unsplit model's ``generate`` and against cotune's own unsplit cached decoder, side by side.

Run: .venv/bin/python benchmarks/hat_inference.py [--quick]
Targets (issue 16): report TTFT/TBT vs the paper's -41..-54% / -41..-77%; host overhead of the
U-shaped decode vs generate <= 1.2x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from cotune.config import config_from_dict
from cotune.data import build_tokenizer, load_task_data
from cotune.infer.baselines import FullDecoder, cloud_only, device_only, small_draft_speculative
from cotune.infer.command import choose_prefill_chunk
from cotune.infer.drafter import DrafterTraining, train_drafter
from cotune.infer.generate import UGenerator
from cotune.infer.split import UCut
from cotune.infer.timeline import Timeline
from cotune.models import load_model
from cotune.sim.profiles import get_profile


def lm(vocab: int, layers: int, width: int, heads: int, seed: int):
    cfg = config_from_dict({
        "model": {"name_or_path": "random:gpt2", "task": "causal_lm",
                  "random_config": {"n_layer": layers, "n_embd": width, "n_head": heads}},
    }).model  # fmt: skip
    return load_model(cfg, vocab_size=vocab, seed=seed)


def austen_corpus():
    """The HAT benchmarks' text: `austen` (3,000 texts), a 2,000-token BPE trained on it, and
    its training texts as one token stream: ``(data, texts, tokenizer, stream)``."""
    cfg = config_from_dict({"data": {"dataset": "austen", "view": "text", "max_examples": 3000}})
    data = load_task_data(cfg.data, "causal_lm", 0)
    texts = [e.text for e in data.train]
    tok = build_tokenizer(None, texts, 2000)
    stream = torch.tensor([t for s in tok.encode(texts, 256) for t in s])
    return data, texts, tok, stream


def trained_base(tok, stream: torch.Tensor, steps: int):
    """The HAT benchmarks' base: a 6-block x 256 GPT-2 trained ``steps`` plain steps on
    ``stream``: ``(model, last loss)``."""
    big = lm(tok.vocab_size, 6, 256, 8, 0)
    return big, train_lm(big, stream, steps)


def train_lm(loaded, stream: torch.Tensor, steps: int, seq: int = 64, batch: int = 16) -> float:
    """Plain next-token training of every weight (a base that has learned something)."""
    model = loaded.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        starts = torch.randint(len(stream) - seq - 1, (batch,), generator=gen)
        ids = torch.stack([stream[s : s + seq] for s in starts.tolist()])
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


def designs(big, small, drafter, prompt, new, chunk):
    return {
        "cloud-only": lambda tl: cloud_only(big.anatomy, prompt, new, timeline=tl),
        "device-only": lambda tl: device_only(big.anatomy, prompt, new, timeline=tl),
        "U-shaped": lambda tl: UGenerator(big.anatomy, UCut(1, 1), gamma=0).generate(
            prompt, new, timeline=tl),
        "speculative (small draft)": lambda tl: small_draft_speculative(
            big.anatomy, small.anatomy, prompt, new, gamma=4, timeline=tl),
        "HAT (serial drafting)": lambda tl: UGenerator(
            big.anatomy, UCut(1, 1), drafter=drafter, gamma=4, prefill_chunk=chunk
        ).generate(prompt, new, timeline=tl),
        "HAT": lambda tl: UGenerator(big.anatomy, UCut(1, 1), drafter=drafter, gamma=4,
                                     prefill_chunk=chunk).generate(prompt, new, timeline=tl),
    }  # fmt: skip


def simulate(big, small, drafter, prompts, new, profiles):
    rows = []
    for dev_name in profiles:
        device, cloud = get_profile(dev_name), get_profile("a100")
        chunk, _ = choose_prefill_chunk(
            UGenerator(big.anatomy, UCut(1, 1), drafter=drafter, gamma=4), prompts[0], device, cloud
        )
        per: dict[str, list] = {}
        for prompt in prompts:
            ref = None
            for name, fn in designs(big, small, drafter, prompt, new, chunk).items():
                tl = Timeline(device, cloud, parallel_drafting=name == "HAT")
                out = fn(tl)
                ref = ref or out.tokens
                assert out.tokens == ref, f"{name} generated other tokens"
                s = tl.summary()
                per.setdefault(name, []).append(
                    (
                        s["ttft_s"],
                        s["tbt_s"],
                        out.acceptance_rate,
                        out.bytes_per_token,
                        s["device_flops"] / len(out.tokens),
                    )  # fmt: skip
                )
        for name, vals in per.items():
            acc = [v[2] for v in vals if v[2] is not None]
            rows.append({
                "device": dev_name, "design": name,
                "ttft_s": statistics.fmean(v[0] for v in vals),
                "tbt_s": statistics.fmean(v[1] for v in vals),
                "acceptance": statistics.fmean(acc) if acc else None,
                "bytes_per_token": statistics.fmean(v[3] for v in vals),
                "device_flops_per_token": statistics.fmean(v[4] for v in vals),
                "prefill_chunk": chunk if name == "HAT" else None,
            })  # fmt: skip
    return rows


def host_overhead(big, prompt, new, repeats):
    """Seconds per generated token: HF generate, cotune's unsplit cached decoder, U-shaped."""

    def hf():
        big.model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                           pad_token_id=0, eos_token_id=None)  # fmt: skip

    def own():
        dec, ids, pos = FullDecoder(big.anatomy), torch.tensor([prompt]), 0
        for _ in range(new):
            logits = dec.logits(ids, pos)
            pos += ids.size(1)
            ids = logits[-1].argmax().view(1, 1)

    def ushape():
        UGenerator(big.anatomy, UCut(1, 1), gamma=0).generate(prompt, new)

    times: dict[str, list[float]] = {"generate": [], "unsplit (cotune)": [], "U-shaped": []}
    for _ in range(repeats):  # side by side, alternating
        for name, fn in zip(times, (hf, own, ushape)):
            t0 = time.perf_counter()
            with torch.no_grad():
                fn()
            times[name].append((time.perf_counter() - t0) / new)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer steps and prompts (a smoke run)")
    ap.add_argument(
        "--host-only",
        action="store_true",
        help="only part 4 (host speed does not depend on the weights: random ones)",
    )
    ap.add_argument("--out", type=Path, default=Path("runs/bench/hat_inference.json"))
    args = ap.parse_args()
    if args.host_only:
        big = lm(2000, 6, 256, 8, 0)
        host = host_overhead(big, list(range(2, 26)), 32, 9)
        print(
            "host seconds per token: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in host.items())
        )
        print(f"U-shaped / generate = {host['U-shaped'] / host['generate']:.3f}  (target <= 1.2)")
        print(
            f"U-shaped / unsplit cotune decoder = {host['U-shaped'] / host['unsplit (cotune)']:.3f}"
        )
        return
    steps, n_prompts, new = (60, 2, 12) if args.quick else (600, 8, 32)
    torch.manual_seed(0)
    data, texts, tok, stream = austen_corpus()
    t0 = time.perf_counter()
    big, loss_big = trained_base(tok, stream, steps)
    small = lm(tok.vocab_size, 1, 128, 4, 1)
    loss_small = train_lm(small, stream, steps)
    seqs = tok.encode(texts, 64)
    drafter, dl = train_drafter(big.anatomy, UCut(1, 1), seqs, DrafterTraining(steps=steps))
    print(f"trained: base loss {loss_big:.3f}, draft model {loss_small:.3f}, drafter distillation "
          f"{dl[0]:.4f} -> {dl[-1]:.4f} ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    prompts = [s[:24] for s in tok.encode([e.text for e in data.test], 64) if len(s) >= 24]
    prompts = prompts[:n_prompts]
    rows = simulate(big, small, drafter, prompts, new, ["phone-mid", "jetson"])
    print(f"\n{'device':<10} {'design':<26} {'TTFT':>9} {'TBT':>9} {'accept':>7} {'B/token':>9}")
    for r in rows:
        acc = "—" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        print(f"{r['device']:<10} {r['design']:<26} {r['ttft_s'] * 1e3:>7.1f}ms "
              f"{r['tbt_s'] * 1e3:>7.1f}ms {acc:>7} {r['bytes_per_token']:>9.0f}")  # fmt: skip
    for dev in ("phone-mid", "jetson"):
        by = {r["design"]: r for r in rows if r["device"] == dev}
        for base in ("cloud-only", "U-shaped", "speculative (small draft)"):
            d_ttft = by["HAT"]["ttft_s"] / by[base]["ttft_s"] - 1
            d_tbt = by["HAT"]["tbt_s"] / by[base]["tbt_s"] - 1
            print(f"{dev}: HAT vs {base}: TTFT {d_ttft:+.0%}, TBT {d_tbt:+.0%}")

    scale_rows = []
    if not args.quick:
        gpt2s = lm(50257, 12, 768, 12, 2)
        prompt = list(range(100, 228))
        for dev_name in ("phone-mid", "jetson"):
            device, cloud = get_profile(dev_name), get_profile("a100")
            for name, fn in {
                "cloud-only": lambda tl: cloud_only(gpt2s.anatomy, prompt, 16, timeline=tl),
                "device-only": lambda tl: device_only(gpt2s.anatomy, prompt, 16, timeline=tl),
                "U-shaped": lambda tl: UGenerator(gpt2s.anatomy, UCut(1, 1), gamma=0).generate(
                    prompt, 16, timeline=tl),
            }.items():  # fmt: skip
                tl = Timeline(device, cloud)
                fn(tl)
                s = tl.summary()
                scale_rows.append({"device": dev_name, "design": name, "ttft_s": s["ttft_s"],
                                   "tbt_s": s["tbt_s"]})  # fmt: skip
        print("\nGPT-2-small size (random weights), prompt 128, 16 new tokens:")
        for r in scale_rows:
            print(f"{r['device']:<10} {r['design']:<12} TTFT {r['ttft_s'] * 1e3:8.1f}ms "
                  f"TBT {r['tbt_s'] * 1e3:7.1f}ms")  # fmt: skip

    host = host_overhead(big, prompts[0], new, 3 if args.quick else 7)
    print(
        "\nhost seconds per token: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in host.items())
    )
    print(f"U-shaped / generate = {host['U-shaped'] / host['generate']:.3f}  (target <= 1.2)")
    print(f"U-shaped / unsplit cotune decoder = {host['U-shaped'] / host['unsplit (cotune)']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"simulated": rows, "scale": scale_rows, "host": host,
                                    "losses": [loss_big, loss_small, dl[-1]]}, indent=2) + "\n")  # fmt: skip
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
