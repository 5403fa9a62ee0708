"""cotune's side of the Flower comparison (``flower_compare.py``'s job: MiniLM + LoRA r=8,
100 clients, 10 per round, 5 local steps x batch 16, 3 rounds) with the device cohort on, on
with ``paradigm.options.cohort_rows`` bounding each pass, and off: peak memory of the process
tree, steady round, whole run, accuracy. Order A B C C B A; medians of the two runs each.
With ``--padding-free``: the bounded cohort with and without ``train.padding_free`` instead.

Run: .venv/bin/python benchmarks/cohort_memory.py [--rows 48] [--seed 0] [--padding-free]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flower_compare import job, run_cotune  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--padding-free", action="store_true")
    args = ap.parse_args()
    rows = f"paradigm.options.cohort_rows={args.rows}"
    variants = {
        "cohort on": [],
        f"cohort on, cohort_rows {args.rows}": [rows],
        "cohort off": ["paradigm.options.cohort=false"],
    }
    if args.padding_free:
        variants = {
            f"cohort_rows {args.rows}": [rows],
            f"cohort_rows {args.rows}, padding-free": [rows, "train.padding_free=true"],
        }
    names = list(variants)
    got: dict[str, list[dict]] = {n: [] for n in names}
    j = job(args, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names + names[::-1]):
            m = run_cotune(j, tmp, f"v{i}", variants[name])
            got[name].append(m)
            print(f"  {name:<26} whole {m['wall_s']:6.1f} s, steady round {m['round_s']:5.2f} s, "
                  f"peak {m['peak_mb']:7.0f} MB, accuracy {m['accuracy']:.3f}", flush=True)  # fmt: skip
    for name in names:
        runs = got[name]
        print(f"{name:<26} peak {statistics.median(m['peak_mb'] for m in runs):7.0f} MB  "
              f"steady round {statistics.median(m['round_s'] for m in runs):5.2f} s  "
              f"whole {statistics.median(m['wall_s'] for m in runs):6.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
