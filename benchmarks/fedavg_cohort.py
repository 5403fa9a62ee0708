"""FedAvg round throughput with device cohorts vs one device at a time (side by side).

The same fedavg run twice per repeat, alternating: `paradigm.options.cohort: false` (each
device's local steps run one after another over the shared base) and `cohort: true` (local
step j of all the round's devices runs as one padded batch, each device's rows through its own
LoRA tensors; see src/cotune/paradigms/fed_cohort.py). Causal LM on the austen text, LoRA r=8
on q/v. Throughput = token slots trained (devices x local steps x batch x max_length per round)
per host second of the rounds (the `round_host_s` of each round record), so the ratio is the
rounds' wall-time ratio.

Defaults fit a 2-core CPU (a 4-block random LLaMA, hidden 256, 8 devices). `--qwen05b` uses the
Qwen2.5-0.5B architecture (random weights) for a GPU (`--device cuda`).

`--minilm` runs the demo's classification task instead (MiniLM, LoRA q/v + the trained head,
which the cohort runs once per device's rows), the issue-14 setting: 8 devices x batch 4.
`--padding-free` sets `train.padding_free` on both sides (blocks on the real tokens only);
`--autocast bf16` sets `train.autocast` in every arm. `--random-base` (with `--minilm`) trains a
random BERT of MiniLM's shape, for a machine without the MiniLM package (scripts/gpu_check.sh's
cohort-cpu part: the issue-14 CPU figure on a GPU box's CPU cores).
`--floor` (with `--minilm`) also times what batching alone gives on the machine: cotune's own
(one device training on all the cohort's rows as one batch, one adapter: what the cohort would
cost if grouping were free), and without cotune, plain transformers MiniLM forward + backward,
the devices' batches one after another vs one batch of all their rows (at --seq tokens and at
half of it).

Run: .venv/bin/python benchmarks/fedavg_cohort.py [--repeats 3] [--device cuda --qwen05b]
     .venv/bin/python benchmarks/fedavg_cohort.py --minilm --seq 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

from cotune.config import config_from_dict
from cotune.run import run_experiment

SMALL = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
# all-MiniLM-L6-v2's BERT dimensions, for --random-base (a random BERT, cotune's BPE vocabulary).
MINILM_SHAPE = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
                "intermediate_size": 1536}  # fmt: skip
QWEN05B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
           "num_attention_heads": 14, "num_key_value_heads": 2}  # fmt: skip


def minilm_config(args, cohort: bool, out: str, i: int):
    """The demo's task (MiniLM, 5 `fortunes` labels, LoRA r=8 q/v and the trained head)."""
    model = {"name_or_path": "minilm", "task": "classification", "max_length": args.seq}
    if args.random_base:  # a machine without the MiniLM package (a lent GPU box's CPU)
        model.update(name_or_path="random:bert", random_config=MINILM_SHAPE)
    return config_from_dict(
        {
            "name": f"{'cohort' if cohort else 'seq'}-{i}",
            "seed": 0,
            "model": model,
            "data": {"dataset": "fortunes",
                     "labels": ["computers", "politics", "science", "love", "food"]},
            "partition": {"scheme": "iid"},
            "devices": {"count": args.devices},
            "peft": {"r": 8, "alpha": 16, "target_modules": ["query", "value"]},
            "paradigm": {"name": "fedavg",
                         "options": {"local_steps": args.local_steps, "cohort": cohort}},
            "train": {"steps": args.local_steps * args.rounds, "batch_size": args.batch,
                      "device": args.device, "lr": 1e-2, "padding_free": args.padding_free,
                      "autocast": args.autocast},
            "eval": {"every": 10_000, "max_examples": 8},
            "output": {"dir": out, "checkpoint_every": 0, "save_adapter": False},
        }
    )  # fmt: skip


def config(args, cohort: bool, out: str, i: int):
    if args.minilm:
        return minilm_config(args, cohort, out, i)
    return config_from_dict(
        {
            "name": f"{'cohort' if cohort else 'seq'}-{i}",
            "seed": 0,
            "model": {"name_or_path": "random:qwen2" if args.qwen05b else "random:llama",
                      "task": "causal_lm", "max_length": args.seq,
                      "dtype": "bfloat16" if args.device != "cpu" else "float32",
                      "random_config": QWEN05B if args.qwen05b else SMALL},
            "data": {"dataset": "austen", "view": "text", "bpe_vocab_size": 2000},
            "partition": {"scheme": "iid"},
            "devices": {"count": args.devices},
            "peft": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
            "paradigm": {"name": "fedavg",
                         "options": {"local_steps": args.local_steps, "cohort": cohort}},
            "train": {"steps": args.local_steps * args.rounds, "batch_size": args.batch,
                      "device": args.device, "padding_free": args.padding_free,
                      "autocast": args.autocast},
            "eval": {"every": 10_000, "max_examples": 8},
            "output": {"dir": out, "checkpoint_every": 0, "save_adapter": False},
        }
    )  # fmt: skip


def round_times(run_dir) -> list[float]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["round_host_s"] for r in recs if r["event"] == "round"]


def rounds_host_s(run_dir) -> float:
    return sum(round_times(run_dir))


def batching_floor(args, seq: int, repeats: int) -> float:
    """What batching alone gives on this machine, without cotune: plain transformers MiniLM,
    forward and backward with the gradients LoRA on q/v needs (input gradients through every
    block; trainable q/v biases stand in for the adapters, the head trained), ``devices``
    batches of ``batch`` x ``seq`` one after another vs one batch of ``devices x batch``.
    Returns the median time ratio one batch / one after another (A B alternating)."""
    import time

    import torch
    from transformers import AutoModelForSequenceClassification

    from cotune.models.loading import resolved_path

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        resolved_path("minilm"), num_labels=5
    ).eval()  # cotune's frozen base runs in eval mode too (no dropout)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("query.bias", "value.bias")) or "classifier" in name)

    def step(rows: int) -> None:
        ids = torch.randint(1000, 20000, (rows, seq))
        model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.sum().backward()

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    for _ in range(2):  # warm up both shapes
        step(args.batch)
        step(args.batch * args.devices)
    ratios = []
    for _ in range(repeats):
        apart = timed(lambda: [step(args.batch) for _ in range(args.devices)])
        ratios.append(timed(lambda: step(args.batch * args.devices)) / apart)
    return statistics.median(ratios)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--qwen05b", action="store_true")
    ap.add_argument("--minilm", action="store_true", help="the demo's classification task")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--padding-free", action="store_true", help="train.padding_free, both sides")
    ap.add_argument(
        "--autocast", default="none", choices=["none", "bf16"], help="train.autocast, all arms"
    )
    ap.add_argument(
        "--random-base",
        action="store_true",
        help="with --minilm: a random BERT of MiniLM's shape (no MiniLM package)",
    )
    ap.add_argument("--floor", action="store_true",
                    help="with --minilm: also time plain transformers fwd+bwd, batches of "
                    "--batch one after another vs one batch of devices x batch (no cotune)")  # fmt: skip
    args = ap.parse_args()
    out = tempfile.mkdtemp(prefix="fedavg_cohort_")
    slots = args.devices * args.local_steps * args.batch * args.seq * args.rounds
    arms = [("one by one", args, False, out), ("cohort", args, True, out)]
    if args.random_base and not args.minilm:
        ap.error("--random-base goes with --minilm (the issue-14 task on MiniLM's shape)")
    if args.floor and args.minilm:
        # cotune's own batching floor: one device training on all the cohort's rows at once
        # (one adapter, one loss): what the cohort would cost if grouping were free.
        one = argparse.Namespace(**{**vars(args), "devices": 1, "batch": args.devices * args.batch})
        arms.append(("one batch", one, False, f"{out}/one-batch"))
    times: dict[str, list[float]] = {name: [] for name, *_ in arms}
    # Rounds 2..N: the first round also counts each new batch shape's FLOPs, one by one.
    steady: dict[str, list[float]] = {name: [] for name, *_ in arms}
    for i in range(args.repeats):
        for name, arm_args, cohort, arm_out in arms:
            run_dir = run_experiment(config(arm_args, cohort, arm_out, i), quiet=True, report=False)
            rounds = round_times(run_dir)
            times[name].append(sum(rounds))
            steady[name].append(statistics.median(rounds[1:] or rounds))
    med = {k: statistics.median(v) for k, v in times.items()}
    shape = "Qwen2.5-0.5B-shaped" if args.qwen05b else "small"
    if args.minilm:
        shape = "MiniLM-shaped random BERT" if args.random_base else "MiniLM"
    print(f"fedavg on {args.device}, {shape} "
          f"model, {args.devices} devices x {args.local_steps} local steps x batch "
          f"{args.batch} x {args.seq}, {args.rounds} rounds, median of {args.repeats}")  # fmt: skip
    for k, v in med.items():
        print(f"  {k:<10} {slots / v:9.0f} token slots/s  ({v:.2f} s of rounds; runs "
              f"{[round(x, 2) for x in times[k]]})")  # fmt: skip
    still = {k: statistics.median(v) for k, v in steady.items()}
    print(f"steady round (median of rounds 2..{args.rounds}): one by one "
          f"{still['one by one']:.2f} s, cohort {still['cohort']:.2f} s, ratio "
          f"{still['cohort'] / still['one by one']:.3f}")  # fmt: skip
    if "one batch" in still:
        print(f"cotune's batching floor: one device x batch {args.devices * args.batch} (one "
              f"adapter), steady round {still['one batch']:.2f} s, ratio to one by one "
              f"{still['one batch'] / still['one by one']:.3f}; the cohort is "
              f"{still['cohort'] / still['one batch']:.3f}x it")  # fmt: skip
    if args.floor and args.minilm and not args.random_base:  # plain MiniLM needs its package
        for seq in (args.seq, args.seq // 2):
            floor = batching_floor(args, seq, repeats=7)
            print(f"batching floor, plain transformers MiniLM fwd+bwd, {args.devices} x batch "
                  f"{args.batch} x {seq} tokens one after another vs one batch: {floor:.3f}")  # fmt: skip
    ratio = med["cohort"] / med["one by one"]
    print(f"cohort / one by one throughput: {med['one by one'] / med['cohort']:.2f}; round host "
          f"time cohort / one by one: {ratio:.3f} (target <= 0.6 on CPU: "
          f"{'met' if ratio <= 0.6 else 'NOT met'})")  # fmt: skip


if __name__ == "__main__":
    main()
