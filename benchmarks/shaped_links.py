"""Does the simulator predict a real deployment? fedavg and splitfed with 4 devices, each
device process in its own network namespace on a shaped link (tc tbf rates, a delaying proxy
for latency), the server on loopback; the simulator's predicted round / step times against
the measured ones.

The prediction uses profiles that describe these machines: each process's compute speed as
measured by a first, unshaped deployed run of the same job (``cotune.deploy.calibrate``), and
the links as shaped (rates x TCP goodput, one-way latency). Everything runs over TLS with
per-device tokens, as ``cotune launch`` sets up.

Run (root): .venv/bin/python benchmarks/shaped_links.py [--paradigms fedavg splitfed]
Target (issue 13): predicted within +-15% of measured, per round (fedavg) / per step
(splitfed), median over the run, and for the whole training phase.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from cotune.config import config_from_dict
from cotune.deploy.calibrate import calibrated_profiles, write_profiles
from cotune.deploy.launch import launch
from cotune.deploy.netlab import Link, ShapedLinks, netlab_unavailable

# Four different access links (Mbit/s up, down; one-way latency), phone- to laptop-class.
LINKS = {
    "device-0": Link(up_mbit=8, down_mbit=16, latency_s=0.010),
    "device-1": Link(up_mbit=4, down_mbit=8, latency_s=0.020),
    "device-2": Link(up_mbit=2, down_mbit=8, latency_s=0.030),
    "device-3": Link(up_mbit=4, down_mbit=4, latency_s=0.040),
}
# One torch thread per device process: 4 devices and the server share this machine's cores.
DEVICE_ENV = {"OMP_NUM_THREADS": "1"}


def job(paradigm: str, out: Path, steps: int) -> dict:
    common = {
        "seed": 0,
        "model": {"name_or_path": "minilm", "task": "classification", "max_length": 40},
        "data": {"dataset": "fortunes", "labels": ["computers", "politics", "science", "love"]},
        "partition": {"scheme": "iid"},
        "devices": {"count": 4},
        "peft": {"method": "lora", "r": 8, "alpha": 16, "target_modules": ["query", "value"]},
        "eval": {"every": steps, "batch_size": 64, "max_examples": 32},
        "engine": {"request_timeout_s": 300},
        "output": {"dir": str(out)},
    }
    if paradigm == "fedavg":
        return {**common, "name": "fedavg", "paradigm": {"name": "fedavg", "options": {
            "local_steps": 2, "fraction": 1.0}},
            "train": {"steps": steps, "batch_size": 8, "lr": 1e-2}}  # fmt: skip
    return {**common, "name": "splitfed", "paradigm": {"name": "splitfed", "options": {
        "cut": 2, "aggregate_every": 4}},
        "train": {"steps": steps, "batch_size": 4, "lr": 1e-2}}  # fmt: skip


def intervals(run_dir: Path, paradigm: str) -> list[tuple[float, float]]:
    """(predicted, measured) seconds of each round (fedavg) / step (splitfed) but the first."""
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if paradigm == "fedavg":
        marks = [r for r in recs if r["event"] == "round"]
    else:
        marks = [r for r in recs if r["event"] == "train" and r["role"] == "mean"]
    return [
        (b["sim_time_s"] - a["sim_time_s"], b["host_time_s"] - a["host_time_s"])
        for a, b in zip(marks, marks[1:])
    ]


def calibrate(paradigm: str, steps: int, root: Path) -> Path:
    """Profiles of this machine's processes for the job: measured by an unshaped deployed run."""
    raw = job(paradigm, root / "runs", steps)
    calib = launch(config_from_dict({**raw, "name": f"{paradigm}-calibrate"}), quiet=True,
                   device_env=DEVICE_ENV)  # fmt: skip
    return write_profiles(calibrated_profiles(calib, LINKS), root / f"{paradigm}.yaml")


def shaped(paradigm: str, steps: int, root: Path, profiles: Path, seed: int = 0) -> dict:
    """The job on the shaped links, predicted (those profiles) against measured."""
    raw = job(paradigm, root / "runs", steps)
    run = {**raw, "seed": seed, "name": f"{paradigm}-shaped-{seed}", "devices": {
        **raw["devices"], "profile_file": str(profiles), "server": "measured-server",
        "profiles": [f"measured-{d}" for d in LINKS]}}  # fmt: skip
    with ShapedLinks(LINKS) as lab:
        run_dir = launch(config_from_dict(run), quiet=True, wrap=lab.wrap,
                         server_hosts=lab.hosts, device_env=DEVICE_ENV)  # fmt: skip
    pairs = intervals(run_dir, paradigm)
    ratios = [p / m for p, m in pairs]
    predicted, measured = sum(p for p, _ in pairs), sum(m for _, m in pairs)
    return {
        "paradigm": paradigm,
        "unit": "round" if paradigm == "fedavg" else "step",
        "n": len(pairs),
        "median_predicted_s": statistics.median(p for p, _ in pairs),
        "median_measured_s": statistics.median(m for _, m in pairs),
        "median_ratio": statistics.median(ratios),
        "worst_ratio": max(ratios, key=lambda r: abs(r - 1.0)),
        "total_ratio": predicted / measured,
        "run_dir": str(run_dir),
    }


def check(paradigm: str, steps: int, root: Path) -> dict:
    return shaped(paradigm, steps, root, calibrate(paradigm, steps, root))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paradigms", nargs="+", default=["fedavg", "splitfed"])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here")
    args = ap.parse_args()
    why = netlab_unavailable()
    if why is not None:
        raise SystemExit(f"shaped links cannot run here: {why}")
    root = args.out or Path(tempfile.mkdtemp(prefix="cotune-shaped-"))
    for paradigm in args.paradigms:
        r = check(paradigm, args.steps, root)
        ok = abs(r["median_ratio"] - 1) <= 0.15 and abs(r["total_ratio"] - 1) <= 0.15
        print(f"{paradigm}: per {r['unit']} predicted {r['median_predicted_s']:.3f} s vs "
              f"measured {r['median_measured_s']:.3f} s (median ratio {r['median_ratio']:.3f}, "
              f"worst {r['worst_ratio']:.3f} over {r['n']}); whole training phase "
              f"{r['total_ratio']:.3f}  [{'met' if ok else 'NOT met'}: within +-15%]")  # fmt: skip
        print(json.dumps(r))


if __name__ == "__main__":
    main()
