"""Split-federated step host time vs the central step at the same total batch, in one process.

MiniLM (LoRA r=8 on q/v), max_length 40, in-process engine. Two pairings:
  * 1 device x batch 16 (splitfed) vs central batch 16 (same data, same sampler: same batches);
  * 4 devices x batch 4 (splitfed) vs central batch 16 (same examples per step).
Short runs of the two paradigms alternate (interleaved blocks) so machine noise hits both alike;
a run evaluates only after its last step, and its step host time is the median over steps 2..
of the gap between consecutive train records. splitfed's step covers the whole protocol: the
device forward, encoding/decoding the activations and cut gradients, the server's
forward/backward and both optimizer steps, the clock and the metrics; the median leaves out
the longer gaps of the steps that also average the device adapters (every 10 steps) or
evaluate. (Until session 15 a run evaluated after every step and the window ran from the
evaluation to the next train record; a splitfed step now finishes on the devices at the start
of the next one unless the driver needs it done, as it does before an evaluation, so an
evaluation per step would measure the protocol with an extra local event per step.)

The 4-device pairing runs twice: with SplitLoRA's sequential server (four server updates on
batches of 4 per step, by design) and with the pooled server (one update on the 16 pooled rows)
plus the in-process device cohort (the four devices' bottom segments as one batch; it takes over
once every device shape's FLOPs are known, so longer runs gain more).

``--padding-free`` runs both sides with ``train.padding_free`` (the device cohort packs its joint
batch too); ``--cohort-off`` turns the pooled pairing's cohort off, to compare the two;
``--u-shaped`` runs splitfed U-shaped (the head and labels stay on the devices: four messages a
step; with the pooled server, one middle pass and every device's top turned at once).

Run: .venv/bin/python benchmarks/split_step.py [--repeats 2 --steps 8] [--only pooled]
     [--padding-free] [--cohort-off] [--u-shaped]
Target: step host time ratio splitfed / central <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

COMMON = [
    "partition.scheme=iid", "partition.min_size=1", "devices.mix=null",
    "model.max_length=40", "eval.max_examples=1", "output.save_adapter=false",
    "output.checkpoint_every=0",  # measure steps, not checkpoint writes
]  # fmt: skip


def step_time(config: str, sets: list[str], steps: int, out: str) -> float:
    from cotune.config import load_config
    from cotune.run import run_experiment

    cfg = load_config(config, [*COMMON, *sets, f"train.steps={steps}", f"eval.every={steps}",
                               f"output.dir={out}"])  # fmt: skip
    run_dir = run_experiment(cfg, overwrite=True, quiet=True, report=False)
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["host_time_s"] for r in recs if r["event"] == "train"}
    return statistics.median(train[k] - train[k - 1] for k in range(2, steps + 1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--only", choices=["1x16", "sequential", "pooled"], default=None,
                    help="measure one pairing (more repeats in the same time)")  # fmt: skip
    ap.add_argument("--padding-free", action="store_true", help="train.padding_free on both sides")
    ap.add_argument("--cohort-off", action="store_true", help="the pooled pairing without cohort")
    ap.add_argument("--u-shaped", action="store_true", help="splitfed with the head on the devices")
    args = ap.parse_args()
    pairs = {
        "1 device x 16": (
            ("configs/splitfed.yaml", ["devices.count=1", "train.batch_size=16", "name=sf1"]),
            ("configs/demo/central.yaml", ["devices.count=1", "train.batch_size=16", "name=c1"]),
        ),
        "4 devices x 4, sequential server": (
            ("configs/splitfed.yaml", ["devices.count=4", "train.batch_size=4", "name=sf4"]),
            ("configs/demo/central.yaml", ["devices.count=4", "train.batch_size=16", "name=c4"]),
        ),
        "4 devices x 4, pooled server + cohort": (
            ("configs/splitfed.yaml", ["devices.count=4", "train.batch_size=4", "name=sf4p",
                                       "paradigm.options.server_batch=pooled"]),
            ("configs/demo/central.yaml", ["devices.count=4", "train.batch_size=16", "name=c4p"]),
        ),
    }  # fmt: skip
    extra = ["train.padding_free=true"] if args.padding_free else []
    cohort = [f"paradigm.options.cohort={'false' if args.cohort_off else 'true'}"]
    u = ["paradigm.options.u_shaped=true"] if args.u_shaped else []
    pairs = {
        p: (
            (sf[0], [*sf[1], *extra, *u, *(cohort if "pooled" in p else [])]),
            (ce[0], [*ce[1], *extra]),
        )
        for p, (sf, ce) in pairs.items()
    }
    if args.only is not None:
        tag = {"1x16": "1 device", "sequential": "sequential", "pooled": "pooled"}[args.only]
        pairs = {p: v for p, v in pairs.items() if tag in p}
    times = {(p, side): [] for p in pairs for side in ("splitfed", "central")}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.repeats):
            for p, (sf, ce) in pairs.items():
                times[(p, "splitfed")].append(step_time(*sf, args.steps, out))
                times[(p, "central")].append(step_time(*ce, args.steps, out))
    ok = True
    for p in pairs:
        s = statistics.median(times[(p, "splitfed")])
        c = statistics.median(times[(p, "central")])
        ratio = s / c
        ok &= ratio <= 1.05
        print(
            f"{p:<40} splitfed {s * 1000:7.1f} ms/step   central {c * 1000:7.1f} ms/step   "
            f"ratio {ratio:.3f}  (target <= 1.05: {'met' if ratio <= 1.05 else 'NOT met'})"
        )
        print(f"{'':<40} runs: splitfed {[round(x * 1000, 1) for x in times[(p, 'splitfed')]]}"
              f"  central {[round(x * 1000, 1) for x in times[(p, 'central')]]}")  # fmt: skip
    print(f"all targets {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
