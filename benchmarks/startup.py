"""Start-up cost: `cotune --help` and `import cotune`, against a bare `python -c pass`.

Run: .venv/bin/python benchmarks/startup.py [--repeat 15]
Targets: `cotune --help` < 1 s; neither imports torch, transformers or peft.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def timed(cmd: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    py = sys.executable
    cases = {
        "python -c pass": [py, "-c", "pass"],
        "import cotune": [py, "-c", "import cotune"],
        "cotune --help": [str(BIN / "cotune"), "--help"],
        "cotune run --help": [str(BIN / "cotune"), "run", "--help"],
    }
    # Interleave the cases so machine noise hits all of them alike.
    results: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.repeat):
        for k, cmd in cases.items():
            results[k].append(timed(cmd, 1))
    base = statistics.median(results["python -c pass"])
    print(f"{'command':<22}{'median s':>10}{'over bare python':>18}")
    for k, v in results.items():
        m = statistics.median(v)
        print(f"{k:<22}{m:>10.3f}{m - base:>18.3f}")
    heavy = subprocess.run(
        [
            py,
            "-c",
            "import sys, cotune.cli; print(sorted(m for m in ('torch','transformers','peft') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    print(f"heavy modules imported by cotune.cli: {heavy}")
    ok = statistics.median(results["cotune --help"]) < 1.0 and heavy == "[]"
    print(
        f"target `cotune --help` < 1 s without torch/transformers/peft: {'met' if ok else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
