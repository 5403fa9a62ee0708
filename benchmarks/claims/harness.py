"""The claims suite's shared harness: seeds, runs, mean ± 95% CI, verdicts, result files.

Each claim script (benchmarks/claims/<claim>.py) runs its settings over several seeds through
`run_seeds`, turns them into figures with `figure`, and writes one JSON file under
benchmarks/claims/results/ with `save` (the date and the exact command are recorded). `render.py`
builds docs/claims.md from those files, so the page never says more than the runs did.
"""

from __future__ import annotations

import datetime as _dt
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
# Two-sided 95% Student t quantiles by sample size (n − 1 degrees of freedom).
T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t interval); the half-width is nan for one value."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, T95.get(len(xs), 1.96) * statistics.stdev(xs) / len(xs) ** 0.5


def verdict(values: list[float], *, expect: str, margin: float = 0.0) -> str:
    """``reproduced`` when the whole 95% CI of ``values`` is beyond ``margin`` in the expected
    direction (``expect``: "positive" = larger is the claim, "negative" = smaller), ``not
    reproduced`` when the whole CI falls short of it, ``inconclusive`` when the CI covers it.
    ``margin`` is in the expected direction (e.g. 0.5 with "negative" means "at least 0.5
    lower")."""
    signed = values if expect == "positive" else [-v for v in values]
    m, h = mean_ci(signed)
    if h != h:  # one seed: no interval
        return "inconclusive"
    if m - h > margin:
        return "reproduced"
    if m + h < margin:
        return "not reproduced"
    return "inconclusive"


def figure(name: str, values: list[float], unit: str = "", **extra: Any) -> dict[str, Any]:
    m, h = mean_ci(values)
    return {"name": name, "values": values, "mean": m, "ci95": h, "unit": unit, **extra}


def run_seeds(fn: Callable[[int], dict[str, float]], seeds: list[int]) -> dict[str, list[float]]:
    """``fn(seed) -> {metric: value}`` for every seed, gathered per metric (progress printed)."""
    out: dict[str, list[float]] = {}
    for seed in seeds:
        t = time.perf_counter()
        row = fn(seed)
        for k, v in row.items():
            out.setdefault(k, []).append(float(v))
        shown = ", ".join(f"{k} {v:.4g}" for k, v in row.items())
        print(f"  seed {seed}: {shown} ({time.perf_counter() - t:.0f} s)", flush=True)
    return out


def run_config(
    d: dict[str, Any], out: str | None = None, *, save_adapter: bool = False
) -> dict[str, Any]:
    """Run a config dict with cotune; returns its summary.json (plus ``run_dir``). One torch
    thread: claims run side by side on small machines, where extra intra-op threads only spin."""
    import torch

    from cotune.config import config_from_dict
    from cotune.run import run_experiment

    torch.set_num_threads(1)

    d = dict(d)
    d["output"] = {**d.get("output", {}), "dir": out or tempfile.mkdtemp(prefix="claims_"),
                   "save_adapter": save_adapter, "checkpoint_every": 0}  # fmt: skip
    run_dir = run_experiment(config_from_dict(d), overwrite=True, quiet=True, report=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["run_dir"] = str(run_dir)
    return summary


def save(claim: str, result: dict[str, Any]) -> Path:
    """Write results/<claim>.json with the date and the command that produced it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    argv = [Path(sys.argv[0]).resolve().relative_to(ROOT).as_posix(), *sys.argv[1:]]
    payload = {
        "claim": claim,
        "date": _dt.date.today().isoformat(),
        "command": ".venv/bin/python " + shlex.join(argv),
        **result,
    }
    path = RESULTS / f"{claim}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT)}")
    return path


def read_yaml(rel: str) -> dict[str, Any]:
    from cotune.config import read_yaml as _read

    return _read(ROOT / rel)
