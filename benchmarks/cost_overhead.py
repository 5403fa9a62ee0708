"""Cost accounting's overhead on a training step: FLOP counting + charging the clock.

MiniLM (LoRA r=8, q/v), real `fortunes` batches of varying length (dynamic padding, so shapes
vary). Interleaved blocks: plain steps vs. steps with a FlopCounter and a clock charge.
"warm": one counter for the whole run (each new shape is counted once, later steps hit the
cache), the steady state of a real run. "cold": a fresh counter every block, so every shape
in the block is counted once: the worst case at the very start of a run.

Run: .venv/bin/python benchmarks/cost_overhead.py [--blocks 6 --steps 20]
Target: warm overhead <= 3%.
"""

from __future__ import annotations

import argparse
import statistics
import time

from cotune.config import DataSection, ModelSection, PeftSection, TrainSection
from cotune.data import BatchSampler, build_tokenizer, encode_dataset, load_task_data
from cotune.models import load_model
from cotune.peft import inject_adapters
from cotune.sim.clock import VirtualClock
from cotune.sim.costs import FlopCounter
from cotune.sim.profiles import get_profile
from cotune.train import Trainer, full_model_loss, train_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    data = load_task_data(
        DataSection(labels=["computers", "politics", "science", "love", "food"]),
        "classification",
        0,
    )
    loaded = load_model(ModelSection(name_or_path="minilm", max_length=40), num_labels=5)
    tok = build_tokenizer(loaded.tokenizer, [], 0)
    ds = encode_dataset(data.train, tok, 40, "classification")
    adapters = inject_adapters(
        loaded.model, PeftSection(), anatomy=loaded.anatomy, head_paths=loaded.anatomy.head_paths()
    )
    loaded.model.train()
    trainer = Trainer(adapters.named_trainable(), TrainSection(), 10_000)
    state = trainer.new_state(0)
    loss_fn = full_model_loss(loaded.anatomy.full(), "classification", adapters.regularization_loss)
    sampler = BatchSampler(len(ds), 16, 0)
    clock = VirtualClock({"device-0": get_profile("phone-mid")})
    warm = FlopCounter()

    def block(counter: FlopCounter | None, batches: list) -> float:
        t = time.perf_counter()
        with trainer.activate(state):
            for batch in batches:
                r = train_step(trainer, state, loss_fn, [batch], counter=counter, key="full")
                if counter is not None:
                    clock.compute("device-0", r.flops)
        return (time.perf_counter() - t) / args.steps

    def draw() -> list:
        return [ds.batch(sampler.next_indices()) for _ in range(args.steps)]

    block(None, draw())
    block(warm, draw())  # the run's first shapes
    times: dict[str, list[float]] = {"plain": [], "warm": [], "cold": []}
    variants = ["plain", "warm", "cold"]
    for i in range(args.blocks):
        batches = draw()  # the same batches for all three, so only the accounting differs
        for name in variants[i % 3 :] + variants[: i % 3]:  # rotate: no variant always goes first
            counter = None if name == "plain" else warm if name == "warm" else FlopCounter()
            times[name].append(block(counter, batches))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:<6} {v * 1000:7.1f} ms/step")
    print(f"distinct shapes counted (warm counter): {warm.cached_shapes}")
    w = med["warm"] / med["plain"] - 1
    c = med["cold"] / med["plain"] - 1
    print(f"overhead warm: {w * 100:+.1f}%  (target <= 3%: {'met' if w <= 0.03 else 'NOT met'})")
    print(f"overhead cold (every shape new): {c * 100:+.1f}%")


if __name__ == "__main__":
    main()
