"""Claim (SimDC, arXiv 2503.22288): a device–cloud simulation platform of high fidelity, i.e.
simulated runs that behave like real ones on real devices and links. The paper gives no figure;
cotune's restatement is its own simulator's: the time it predicts for a run against the time
the same run takes deployed for real (issue 13's target: within ±15%).

Setting: benchmarks/shaped_links.py over several seeds: fedavg (4 devices, all sampled, 2 local
steps × batch 8) and splitfed (cut 2, 4 devices × batch 4), MiniLM, TLS and per-device tokens,
each device process in its own network namespace on a shaped link (8/16, 4/8, 2/8 and 4/4
Mbit/s up/down by tc tbf; 10–40 ms one-way latency by a delaying proxy). The profiles are
measured once per paradigm by an unshaped deployed run (`cotune.deploy.calibrate`); each seed
is then a shaped deployed run with its prediction. Figures: predicted / measured time per round
(fedavg) or step (splitfed), median over the run, and for the whole training phase.

Run (root, network namespaces; uses the whole machine: run it alone):
     .venv/bin/python benchmarks/claims/simdc.py [--seeds 0 1 2 --steps 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from harness import ROOT, figure, run_seeds, save, verdict

sys.path.insert(0, str(ROOT / "benchmarks"))
BAND = 0.15  # issue 13's target: predicted within ±15% of measured


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--paradigms", nargs="+", default=["fedavg", "splitfed"])
    args = ap.parse_args()
    from shaped_links import calibrate, shaped

    from cotune.deploy.netlab import netlab_unavailable

    why = netlab_unavailable()
    if why is not None:
        raise SystemExit(f"the SimDC claim needs shaped links, which cannot run here: {why}")
    root = Path(tempfile.mkdtemp(prefix="claims-simdc-"))
    profiles = {p: calibrate(p, args.steps, root) for p in args.paradigms}

    def one(seed: int) -> dict[str, float]:
        row = {}
        for p in args.paradigms:
            r = shaped(p, args.steps, root, profiles[p], seed)
            row[f"{p}_median_ratio"] = r["median_ratio"]
            row[f"{p}_total_ratio"] = r["total_ratio"]
            row[f"{p}_median_measured_s"] = r["median_measured_s"]
        return row

    r = run_seeds(one, args.seeds)
    figs = []
    for p in args.paradigms:
        unit = "round" if p == "fedavg" else "step"
        for key, what in ((f"{p}_median_ratio", f"per {unit}, median"),
                          (f"{p}_total_ratio", "whole training phase")):  # fmt: skip
            # Inside the band = BAND − |ratio − 1| > 0 over the whole CI.
            slack = [BAND - abs(v - 1.0) for v in r[key]]
            figs.append(figure(f"{p}: predicted / measured, {what}", r[key], "×",
                               verdict=verdict(slack, expect="positive")))  # fmt: skip
        figs.append(figure(f"{p}: measured seconds per {unit} (median)",
                           r[f"{p}_median_measured_s"], "s"))  # fmt: skip
    save("simdc", {
        "title": "SimDC: the simulator's predicted time vs measured time on shaped links",
        "paper": "a high-fidelity device–cloud simulation platform (hybrid: servers plus real "
                 "phones, a configurable device-behaviour traffic controller); no figure for "
                 "fidelity in the available text (arXiv 2503.22288, abstract)",
        "setting": f"{', '.join(args.paradigms)} deployed for real (gRPC, TLS, 4 device "
                   f"processes in network namespaces on tc-shaped links with proxy latency), "
                   f"{args.steps} steps; profiles measured once per paradigm by an unshaped run",
        "reconstruction": "the claim is restated as cotune's own fidelity (SimDC has no time "
                          "model to compare); target ±15% from issue 13; one machine's "
                          "processes stand in for devices, links are shaped, not radio",
        "figures": figs,
        "verdict": ", ".join(f"{f['name']}: {f['verdict']}" for f in figs if "verdict" in f),
        "expect": "predicted within ±15% of measured",
    })  # fmt: skip


if __name__ == "__main__":
    main()
