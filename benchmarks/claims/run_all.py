"""The whole claims suite in one command: the claim scripts in parallel lanes (each run uses one
torch thread, so two lanes fill two cores), then the ones that need the whole machine alone,
then docs/claims.md.

Run: .venv/bin/python benchmarks/claims/run_all.py [--lanes 2] [--only hierfed fedbiot ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Minutes each took on the 2-core development machine with two lanes busy (for lane balance).
MINUTES = {
    "hierfed": 50, "peft_methods": 25, "splitlora": 15, "splitfrozen": 10, "dlora": 10,
    "fedbiot": 12, "d2lora": 5,
}  # fmt: skip
ALONE = ["simdc"]  # deployed runs with several processes each: they need every core


def run(claim: str, log: list[str]) -> None:
    started = time.perf_counter()
    rc = subprocess.run([sys.executable, str(HERE / f"{claim}.py")], cwd=HERE.parents[1]).returncode
    minutes = (time.perf_counter() - started) / 60
    log.append(f"{claim}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {minutes:.1f} min")
    print(log[-1], flush=True)


def lanes_for(claims: list[str], n: int) -> list[list[str]]:
    """Longest first onto the least loaded of ``n`` lanes (by MINUTES; 10 when unknown)."""
    lanes: list[list[str]] = [[] for _ in range(max(1, n))]
    for claim in sorted(claims, key=lambda c: -MINUTES.get(c, 10)):
        min(lanes, key=lambda lane: sum(MINUTES.get(c, 10) for c in lane)).append(claim)
    return lanes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lanes", type=int, default=2)
    ap.add_argument("--only", nargs="+", default=None, help="these claims only")
    args = ap.parse_args()
    wanted = args.only or [*MINUTES, *ALONE]
    unknown = [c for c in wanted if not (HERE / f"{c}.py").is_file()]
    if unknown:
        raise SystemExit(f"no such claim script: {', '.join(unknown)}")
    lanes = lanes_for([c for c in wanted if c not in ALONE], args.lanes)
    log: list[str] = []
    started = time.perf_counter()

    def lane_main(claims: list[str]) -> None:
        for claim in claims:
            run(claim, log)

    threads = [threading.Thread(target=lane_main, args=(lane,)) for lane in lanes if lane]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for claim in (c for c in wanted if c in ALONE):
        run(claim, log)
    subprocess.run([sys.executable, str(HERE / "render.py")], cwd=HERE.parents[1], check=True)
    print(f"suite: {(time.perf_counter() - started) / 60:.1f} min", *log, sep="\n")


if __name__ == "__main__":
    main()
