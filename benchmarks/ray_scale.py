"""Ray at population scale: 10,000 devices on 2 Ray hosts, 20 sampled per round, vs 100.

The fedavg job of ``population_scale.py`` (MiniLM + LoRA r=8 q/v, 2 local steps x batch 4,
``optimizer_state: reset``) on ``engine.kind: ray`` with two host actors; only the population
differs. Each host holds one frozen base and builds a device's role when it is first sampled,
so a host's peak memory should not grow with the population. Each run is its own driver
process (and its own Ray instance); the runs alternate A B A B.

Run: .venv/bin/python benchmarks/ray_scale.py [--rounds 3] [--repeats 2]
Target (issue 14): peak memory per host within the population-scale targets (<= 1.05x the
100-device run); start-up time recorded.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from population_scale import ROOT, STARTUP_MARK, write_data  # noqa: E402 - the same data

CHILD = (
    STARTUP_MARK
    + r"""
data, devices, rounds, hosts, out = sys.argv[1:6]
cfg = load_config("configs/demo/fedavg.yaml", [
    f"data.dataset={data}", "data.test_fraction=0.01",
    f"devices.count={devices}", "devices.mix=null", "partition.scheme=iid",
    "partition.min_size=1", "paradigm.options.clients_per_round=20",
    "paradigm.options.fraction=1.0", "paradigm.options.local_steps=2",
    "paradigm.options.optimizer_state=reset", f"train.steps={2 * int(rounds)}",
    f"eval.every={2 * int(rounds)}", "train.batch_size=4", "train.warmup_steps=0",
    "eval.max_examples=64", f"output.dir={out}", f"name=ray{devices}",
    "engine.kind=ray", f"engine.ray.hosts={hosts}", "engine.ray.num_cpus_per_host=1",
])
run_dir = run_experiment(cfg, overwrite=True, quiet=True, report=False)
summary = json.loads((run_dir / "summary.json").read_text())
nodes = summary["deployment"]["nodes"]
hosts_peak, trained = {}, {}
for node, m in nodes.items():
    if node != "server" and m.get("peak_rss_bytes"):
        h = int(node.split("-")[1]) % int(hosts)  # round-robin placement
        hosts_peak[h] = max(hosts_peak.get(h, 0), m["peak_rss_bytes"])
        trained[h] = trained.get(h, 0) + 1
print(json.dumps({
    "driver_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "host_rss_mb": [hosts_peak[h] / 2**20 for h in sorted(hosts_peak)],
    "host_devices": [trained[h] for h in sorted(trained)],
    "startup_s": first[0],
    "wall_s": time.perf_counter() - t0,
    "accuracy": summary["final"].get("accuracy"),
}))
"""
)


def measure(data: Path, devices: int, rounds: int, hosts: int, out: str) -> dict:
    import json

    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(data), str(devices), str(rounds), str(hosts), out],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    if res.returncode != 0:
        sys.exit(f"run with {devices} devices failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--population", type=int, default=10_000)
    ap.add_argument("--hosts", type=int, default=2)
    ap.add_argument("--examples", type=int, default=25_000)
    args = ap.parse_args()
    sizes = [100, args.population]
    runs: dict[int, list[dict]] = {n: [] for n in sizes}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "population.jsonl"
        write_data(data, args.examples)
        for rep in range(args.repeats):
            for n in sizes if rep % 2 == 0 else sizes[::-1]:
                m = measure(data, n, args.rounds, args.hosts, tmp)
                runs[n].append(m)
                hosts = ", ".join(f"{v:.0f}" for v in m["host_rss_mb"])
                used = ", ".join(str(v) for v in m["host_devices"])
                print(f"  {n:>6} devices: host peak RSS [{hosts}] MB (devices trained there:"
                      f" [{used}]), driver {m['driver_rss_mb']:.0f} MB, start-up"
                      f" {m['startup_s']:.1f} s, wall {m['wall_s']:.1f} s", flush=True)  # fmt: skip

    def med(n: int, f) -> float:
        return statistics.median(f(m) for m in runs[n])

    small, large = sizes
    # A host's memory grows with the steps it runs (allocator arenas), and which host the
    # sampled devices live on varies with the population: the mean over hosts compares the
    # same work; the largest host is printed too.
    host = med(large, lambda m: statistics.mean(m["host_rss_mb"])) / med(
        small, lambda m: statistics.mean(m["host_rss_mb"])
    )
    worst = med(large, lambda m: max(m["host_rss_mb"])) / med(
        small, lambda m: max(m["host_rss_mb"])
    )
    driver = med(large, lambda m: m["driver_rss_mb"]) / med(small, lambda m: m["driver_rss_mb"])
    start = med(large, lambda m: m["startup_s"]) / med(small, lambda m: m["startup_s"])
    print(f"{args.population} vs 100 devices on {args.hosts} hosts: peak RSS per host (mean) "
          f"{host:.3f} (target <= 1.05: {'met' if host <= 1.05 else 'NOT met'}), largest host "
          f"{worst:.3f}, driver {driver:.3f}, "
          f"start-up {start:.3f} ({med(large, lambda m: m['startup_s']):.1f} s vs "
          f"{med(small, lambda m: m['startup_s']):.1f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
