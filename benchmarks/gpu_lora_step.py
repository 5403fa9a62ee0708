"""LoRA training throughput: cotune vs stock Hugging Face PEFT on the same ~0.5B model and batch.

The model is Qwen2.5-0.5B's architecture (24 blocks, hidden 896, 14 heads / 2 KV heads, MLP
4864, vocab 151936), randomly initialised (throughput does not depend on the weights; pass
`--model <dir or hub id>` for real ones). Both sides: bf16 base, LoRA r=16 / alpha 32 on every
attention and MLP projection with fp32 adapter weights, AdamW, causal-LM loss on the same
`[batch, seq]` token batch, one forward + backward + step per iteration. cotune's side is its own
model loading and injection (`load_model`, `inject_adapters`, a `Segment` forward); PEFT's is
`get_peft_model` on a `transformers` model. Timed in interleaved blocks (CUDA synchronised).

Target (issue 12): cotune tokens/s / PEFT tokens/s >= 1.0, aim 1.15.

Run on a GPU: python benchmarks/gpu_lora_step.py [--batch 8 --seq 512 --blocks 5 --steps 5]
Smoke run on a CPU: python benchmarks/gpu_lora_step.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

QWEN25_05B = {
    "num_hidden_layers": 24, "hidden_size": 896, "intermediate_size": 4864,
    "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
    "vocab_size": 151936, "tie_word_embeddings": True,
}  # fmt: skip
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000}  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def models(args):
    """(cotune's LoadedModel, a separate HF model with identical weights)."""
    from cotune.config import ModelSection
    from cotune.models import load_model

    dtype = "bfloat16" if args.device != "cpu" else "float32"
    if args.model:
        section = ModelSection(name_or_path=args.model, task="causal_lm", dtype=dtype,
                               max_length=args.seq)  # fmt: skip
    else:
        arch = TINY if args.tiny else QWEN25_05B
        extra = {k: v for k, v in arch.items() if k != "vocab_size"}
        section = ModelSection(name_or_path="random:qwen2", task="causal_lm", dtype=dtype,
                               random_config=extra, max_length=args.seq)  # fmt: skip
    vocab = None if args.model else (TINY if args.tiny else QWEN25_05B)["vocab_size"]
    lm = load_model(section, vocab_size=vocab, seed=0)
    hf = copy.deepcopy(lm.model)  # the same weights, untouched by cotune
    return lm, hf


def cotune_step(lm, args, device):
    from cotune.accel.placement import move_to
    from cotune.config import PeftSection
    from cotune.models import task_loss
    from cotune.peft import inject_adapters

    move_to(lm.model, device)
    peft = PeftSection(r=16, alpha=32, target_modules=TARGETS)
    adapters = inject_adapters(lm.model, peft, anatomy=lm.anatomy, head_paths=[])
    params = [p for p in adapters.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    forward = lm.anatomy.full()
    lm.model.train()

    def step(ids, mask):
        loss = task_loss(forward(ids, mask), ids, "causal_lm")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def peft_step(hf, args, device):
    from peft import LoraConfig, get_peft_model

    hf.to(device)
    model = get_peft_model(hf, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                          lora_dropout=0.0, task_type="CAUSAL_LM"))  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    model.train()

    def step(ids, mask):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default=None, help="a local directory or hub id (default: random)")
    ap.add_argument("--tiny", action="store_true", help="a 2-block model (smoke test)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    device = torch.device(args.device)
    lm, hf = models(args)
    vocab = lm.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)
    mask = torch.ones_like(ids)
    runs = {"cotune": cotune_step(lm, args, device), "peft": peft_step(hf, args, device)}
    for step, _ in runs.values():
        step(ids, mask)  # warm-up (kernels, allocator)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.blocks):
        for name, (step, _) in runs.items():
            sync(device)
            t = time.perf_counter()
            for _ in range(args.steps):
                step(ids, mask)
            sync(device)
            times[name].append((time.perf_counter() - t) / args.steps)
    tokens = args.batch * args.seq
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {'random Qwen2.5-0.5B shape' if not args.model else args.model}"
          f"{' (tiny)' if args.tiny else ''} on {device}, batch {args.batch} x {args.seq}, "
          f"median of {args.blocks} blocks x {args.steps} steps")  # fmt: skip
    for k, v in med.items():
        print(f"  {k:<7} {tokens / v:10.0f} tokens/s  ({v * 1000:.1f} ms/step, "
              f"{runs[k][1]} trainable)")  # fmt: skip
    ratio = med["peft"] / med["cotune"]
    verdict = "met" if ratio >= 1.15 else ("floor met, aim missed" if ratio >= 1.0 else "NOT met")
    print(f"cotune / PEFT throughput: {ratio:.3f}  (floor 1.0, aim 1.15: {verdict})")


if __name__ == "__main__":
    main()
