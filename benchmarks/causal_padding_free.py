"""Causal-LM training step: padded vs padding-free blocks vs padding-free blocks and head.

A LoRA step (r=8 on the attention projections, AdamW) on a random decoder with a real
vocabulary, batches of unequal lengths (uniform in [--min-len, --max-len], right padded), the
three arms timed in interleaved blocks so machine noise hits them alike:

- padded: every position through the blocks and the head;
- blocks only: ``train.padding_free`` as it was before the causal-LM head packed (the blocks on
  the real tokens, the head and its softmax over every position);
- blocks and head: the head projects only the real tokens onto the vocabulary and the loss
  runs on them (``Segment.packed_logits``).

``--task classification`` times a decoder's sequence classification instead (5 labels, read at
each row's last real token): padded; padding-free blocks with the last block on every token (as
before it kept only the tokens the head reads); the last block's queries, attention output and
MLP on each row's last token only (keys and values still from every token).

Run: .venv/bin/python benchmarks/causal_padding_free.py [--family qwen2] [--task classification]
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch

FAMILIES = {  # small bodies with the family's real vocabulary: where the head's share shows
    "gpt2": {"n_layer": 4, "n_embd": 256, "n_head": 4, "vocab_size": 50257, "n_positions": 512},
    "qwen2": {
        "num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 704,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 151936,
        "max_position_embeddings": 512,
    },
}  # fmt: skip


def build(family: str, task: str = "causal_lm"):
    from cotune.config import ModelSection, PeftSection
    from cotune.models import load_model
    from cotune.peft import inject_adapters

    torch.manual_seed(0)
    loaded = load_model(
        ModelSection(name_or_path=f"random:{family}", task=task, max_length=512,
                     random_config=FAMILIES[family]),
        vocab_size=FAMILIES[family]["vocab_size"],
        num_labels=LABELS if task == "classification" else None,
    )  # fmt: skip
    targets = ["c_attn"] if family == "gpt2" else ["q_proj", "v_proj"]
    adapters = inject_adapters(
        loaded.model, PeftSection(r=8, alpha=16, target_modules=targets), anatomy=loaded.anatomy,
        head_paths=loaded.anatomy.head_paths(),
    )  # fmt: skip
    loaded.model.train()
    opt = torch.optim.AdamW(list(adapters.named_trainable().values()), lr=1e-4)
    return loaded, opt


LABELS = 5  # --task classification


def batch(vocab: int, rows: int, lo: int, hi: int, g: torch.Generator, task: str = "causal_lm"):
    lengths = torch.randint(lo, hi + 1, (rows,), generator=g)
    width = int(lengths.max())
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = torch.randint(3, vocab, (rows, width), generator=g).masked_fill(mask == 0, 0)
    if task == "classification":
        return ids, mask, torch.randint(0, LABELS, (rows,), generator=g)
    return ids, mask, ids.masked_fill(mask == 0, -100)


def main() -> None:
    from cotune.models import Segment, segment_loss
    from cotune.models.packing import padding_free

    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=sorted(FAMILIES), default="gpt2")
    ap.add_argument("--task", choices=["causal_lm", "classification"], default="causal_lm")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=5, help="interleaved timing blocks")
    ap.add_argument("--steps", type=int, default=3, help="steps per arm per block")
    args = ap.parse_args()
    task = args.task
    loaded, opt = build(args.family, task)
    forward = loaded.anatomy.full()
    vocab = FAMILIES[args.family]["vocab_size"]
    g = torch.Generator().manual_seed(0)
    batches = [batch(vocab, args.rows, args.min_len, args.max_len, g, task)
               for _ in range(args.steps)]  # fmt: skip
    fill = sum(int(m.sum()) for _, m, _ in batches) / sum(m.numel() for _, m, _ in batches)

    def step(ids, mask, labels, packed: bool) -> None:
        with padding_free(packed):
            segment_loss(forward, ids, mask, labels, task).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def padded() -> None:
        for b in batches:
            step(*b, packed=False)

    def blocks_only() -> None:
        with mock.patch.object(Segment, "packs_logits", lambda self: False):
            for b in batches:
                step(*b, packed=True)

    def blocks_and_head() -> None:
        for b in batches:
            step(*b, packed=True)

    def every_token() -> None:  # the last block on every real token (before it kept B)
        anatomy = type(loaded.anatomy)
        with mock.patch.object(anatomy, "head_reads_last", property(lambda self: False)):
            for b in batches:
                step(*b, packed=True)

    arms = {"padded": padded, "blocks only": blocks_only, "blocks and head": blocks_and_head}
    if task == "classification":
        arms = {"padded": padded, "every token": every_token, "last token": blocks_and_head}
    for fn in arms.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(args.blocks):
        for name, fn in arms.items():
            started = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - started) / args.steps)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"{args.family} {task}, vocab {vocab}, {args.rows} rows of {args.min_len}-"
          f"{args.max_len} tokens (real tokens {fill:.0%} of the padded slots), LoRA r=8, AdamW")  # fmt: skip
    for k, v in ms.items():
        print(f"  {k:16s} {v:8.1f} ms/step  {v / ms['padded']:.3f}x padded")
    if task == "classification":
        print(f"  last block on the last tokens: {ms['last token'] / ms['every token']:.3f}x "
              "on every token")  # fmt: skip
    else:
        print(f"  head packing: {ms['blocks and head'] / ms['blocks only']:.3f}x blocks only")


if __name__ == "__main__":
    main()
