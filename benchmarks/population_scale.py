"""Population scale: what a fedavg run costs as the population grows from 100 to 100,000 devices.

Every run trains the same job (MiniLM + LoRA r=8 q/v, 10 devices per round, 2 local steps x
batch 4) on the same data: a JSONL file of ``--examples`` short texts drawn from the built-in
`fortunes` (5 labels), split IID over the population. Only the number of devices differs, so
peak memory and start-up should not move with it: a device's state exists only once it has
been sampled, and with ``optimizer_state: reset`` only its RNG and sampler position stay
between its rounds. With kept optimizer state the growth should be the states of the devices
sampled so far. Each run is its own process (peak RSS is its own); the runs alternate A B A B.

Run: .venv/bin/python benchmarks/population_scale.py [--rounds 20] [--repeats 2]
Targets (issue 14): reset, 100,000 vs 100 devices: peak memory <= 1.05x, start-up <= 1.2x;
kept state: peak <= base + 1.2 x (states of the devices sampled so far).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: A child run's first lines: ``first[0]`` becomes the seconds from the process start to
#: the first round's start (its start-up).
STARTUP_MARK = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from cotune.config import load_config
from cotune.paradigms import federated
from cotune.run import run_experiment
first = []
_init = federated.RoundTraffic.__init__
def mark(self, grid):  # the first round begins: everything before it is start-up
    if not first:
        first.append(time.perf_counter() - t0)
    _init(self, grid)
federated.RoundTraffic.__init__ = mark
"""

CHILD = (
    STARTUP_MARK
    + r"""
from cotune.report import read_metrics
data, devices, rounds, state, out = sys.argv[1:6]
cfg = load_config("configs/demo/fedavg.yaml", [
    f"data.dataset={data}", "data.test_fraction=0.01",
    f"devices.count={devices}", "devices.mix=null", "partition.scheme=iid",
    "partition.min_size=1", "paradigm.options.clients_per_round=10",
    "paradigm.options.fraction=1.0", "paradigm.options.local_steps=2",
    f"paradigm.options.optimizer_state={state}", f"train.steps={2 * int(rounds)}",
    f"eval.every={2 * int(rounds)}", "train.batch_size=4", "train.warmup_steps=0",
    "eval.max_examples=64", f"output.dir={out}", f"name=pop{devices}{state}",
])
run_dir = run_experiment(cfg, overwrite=True, quiet=True, report=False)
recs = read_metrics(run_dir / "metrics.jsonl")
summary = json.loads((run_dir / "summary.json").read_text())
print(json.dumps({
    "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "startup_s": first[0],
    "wall_s": time.perf_counter() - t0,
    "sampled": sum(1 for r, c in summary["costs"]["roles"].items()
                   if r.startswith("device-") and c["flops"]),
    "trainable": summary["trainable_params"],
    "accuracy": summary["final"].get("accuracy"),
}))
"""
)


def write_data(path: Path, n: int) -> None:
    """``n`` short labelled texts drawn (seeded) from the built-in fortunes, 5 labels."""
    src = ROOT / "src/cotune/data/builtin/fortunes.jsonl.gz"
    keep = {"computers", "politics", "science", "love", "food"}
    with gzip.open(src, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    rows = [r for r in rows if r.get("label") in keep]
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as out:
        for _ in range(n):
            r = rng.choice(rows)
            out.write(json.dumps({"text": r["text"][:120], "label": r["label"]}) + "\n")


def measure(data: Path, devices: int, rounds: int, state: str, out: str) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(data), str(devices), str(rounds), state, out],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    if res.returncode != 0:
        sys.exit(f"run with {devices} devices failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--population", type=int, default=100_000)
    ap.add_argument("--examples", type=int, default=250_000)
    args = ap.parse_args()
    cases = [(100, "reset"), (args.population, "reset"), (args.population, "keep")]
    runs: dict[tuple[int, str], list[dict]] = {c: [] for c in cases}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "population.jsonl"
        write_data(data, args.examples)
        for rep in range(args.repeats):
            for devices, state in cases if rep % 2 == 0 else cases[::-1]:
                m = measure(data, devices, args.rounds, state, tmp)
                runs[(devices, state)].append(m)
                print(f"  {devices:>7} devices, {state:<5}: peak RSS {m['maxrss_mb']:7.1f} MB,"
                      f" start-up {m['startup_s']:5.1f} s, wall {m['wall_s']:5.1f} s,"
                      f" {m['sampled']} devices sampled", flush=True)  # fmt: skip

    def med(case: tuple[int, str], key: str) -> float:
        return statistics.median(m[key] for m in runs[case])

    small, large, kept = cases
    mem = med(large, "maxrss_mb") / med(small, "maxrss_mb")
    start = med(large, "startup_s") / med(small, "startup_s")
    sampled = runs[kept][0]["sampled"]
    # A kept state: the adapter, AdamW's two moments (fp32), the RNG (5 KB) and the sampler.
    state_mb = sampled * (runs[kept][0]["trainable"] * 4 * 3 + 5056) / 2**20
    grown = med(kept, "maxrss_mb") - med(large, "maxrss_mb")
    print(f"reset, {args.population} vs 100 devices: peak memory {mem:.3f} (target <= 1.05: "
          f"{'met' if mem <= 1.05 else 'NOT met'}), start-up {start:.3f} (target <= 1.2: "
          f"{'met' if start <= 1.2 else 'NOT met'})")  # fmt: skip
    print(f"kept state, {sampled} devices sampled ({state_mb:.1f} MB of states): peak grew "
          f"{grown:.1f} MB over reset = {grown / state_mb:.2f} x the states (target <= 1.2: "
          f"{'met' if grown <= 1.2 * state_mb else 'NOT met'})")  # fmt: skip


if __name__ == "__main__":
    main()
