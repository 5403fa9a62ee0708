"""Whole-run time of a small job run several times in one process on `engine.kind: ray`, hosts
kept between runs (`engine.ray.keep_hosts: true`, the default) vs ended with each run, beside
the `local` engine. The job: the tiny fedavg of the tests' engine matrix (a 2-layer random BERT,
2 devices on 2 hosts, 6 steps), so the run itself is short and the hosts' start-up shows.

Run: .venv/bin/python benchmarks/ray_kept_hosts.py [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import tiny_config_dict  # noqa: E402

from cotune.config import config_from_dict  # noqa: E402
from cotune.run import run_experiment  # noqa: E402

FEDAVG = {"name": "fedavg", "options": {"local_steps": 2}}


def timed(tmp: Path, name: str, engine: dict) -> float:
    cfg = config_from_dict(tiny_config_dict(tmp / name, name=name, paradigm=FEDAVG, engine=engine))
    t = time.perf_counter()
    run_experiment(cfg, quiet=True, report=False)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    hosts = {"hosts": 2, "num_cpus_per_host": 0.5}
    out: dict[str, list[float]] = {"ended": [], "kept": [], "local": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            once = {"kind": "ray", "ray": {**hosts, "keep_hosts": False}}
            out["ended"].append(timed(Path(tmp), f"ended{i}", once))
        for i in range(args.runs):
            out["kept"].append(timed(Path(tmp), f"kept{i}", {"kind": "ray", "ray": hosts}))
        for i in range(args.runs):
            out["local"].append(timed(Path(tmp), f"local{i}", {"kind": "local"}))
    ray.shutdown()
    for k, v in out.items():
        print(f"{k:<6} runs {[round(x, 2) for x in v]} s")
    later = statistics.median(out["kept"][1:]) if args.runs > 1 else out["kept"][0]
    print(f"hosts ended with each run: median {statistics.median(out['ended']):.2f} s; kept: "
          f"first {out['kept'][0]:.2f} s, later runs median {later:.2f} s; "
          f"local {statistics.median(out['local']):.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
