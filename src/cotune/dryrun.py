"""``cotune run/compare --dry-run``: what a run will cost, before running it.

Prints the resolved config (every default made visible), then runs a *probe*: the same config
for one round (federated paradigms) or a few steps, in a temporary directory, and scales what
the simulator and the host measured (host time, simulated time, bytes; device memory as is) to
the whole run. Nothing is written where the run would go. It also warns about runs that are
unlikely to learn anything (a random-init base with very few trainable parameters).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cotune.config import RunConfig, config_from_dict, dump_config

#: Below this many trainable parameters on a random-init base, a run is unlikely to learn.
FEW_TRAINABLE = 50_000
ROUND_PARADIGMS = {"fedavg": ("local_steps",), "fedbiot": ("local_steps",),
                   "hierfed": ("local_steps", "tau")}  # fmt: skip


@dataclass
class Estimate:
    config_yaml: str
    probe_steps: int = 0
    scale: float = 0.0
    host_time_s: float | None = None
    sim_time_s: float | None = None
    bytes_total: float | None = None
    device_peak_memory_bytes: float | None = None
    trainable_params: int | None = None
    warnings: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = ["# resolved config (defaults included)", self.config_yaml.rstrip(), ""]
        if self.probe_steps:
            lines.append(
                f"# estimate: a probe of {self.probe_steps} step(s) scaled x{self.scale:.3g}"
            )
            for name, value, unit in (
                ("host time", self.host_time_s, "s"), ("simulated time", self.sim_time_s, "s"),
                ("bytes moved", self.bytes_total, "B"),
                ("device peak memory", self.device_peak_memory_bytes, "B"),
                ("trainable parameters", self.trainable_params, ""),
            ):  # fmt: skip
                if value is not None:
                    lines.append(f"{name:<22} {_human(value, unit)}")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        return "\n".join(lines)


def _human(v: float, unit: str) -> str:
    if unit == "B":
        for u in ("B", "KB", "MB", "GB", "TB"):
            if abs(v) < 1000 or u == "TB":
                return f"{v:,.1f} {u}"
            v /= 1000
    if unit == "s":
        return f"{v:,.1f} s" + (f" ({v / 3600:.2f} h)" if v >= 3600 else "")
    return f"{int(v):,}"


def probe_steps(cfg: RunConfig) -> int:
    """Steps of the probe: one round of a federated paradigm, else a few steps."""
    opts = cfg.paradigm.options
    keys = ROUND_PARADIGMS.get(cfg.paradigm.name)
    if keys is not None:
        defaults = {"local_steps": 5, "tau": 1}
        n = math.prod(int(opts.get(k, defaults[k]) or defaults[k]) for k in keys)
        return min(cfg.train.steps, max(1, n))
    return min(cfg.train.steps, 3)


def dry_run(cfg: RunConfig, *, probe: bool = True) -> Estimate:
    """The resolved config and, unless ``probe`` is off, an estimate from a probe run."""
    from cotune.run import run_experiment

    est = Estimate(config_yaml=dump_config(cfg))
    if cfg.peft.stages:
        est.warnings.append("a staged run (peft.stages) is not probed: its stages differ")
        return est
    if not probe:
        return est
    steps = probe_steps(cfg)
    with tempfile.TemporaryDirectory(prefix="cotune-dry-run-") as tmp:
        d = cfg.to_dict()
        d["train"]["steps"] = steps
        d["eval"] = {**d["eval"], "every": steps, "max_examples": 8}
        d["output"] = {**d["output"], "dir": tmp, "checkpoint_every": 0, "save_adapter": False}
        probe_cfg = config_from_dict(d, source=f"{cfg.name} (dry-run probe)")
        run_dir = run_experiment(probe_cfg, quiet=True, report=False, overwrite=True)
        summary = json.loads((run_dir / "summary.json").read_text())
    scale = cfg.train.steps / steps
    est.probe_steps, est.scale = steps, scale
    est.host_time_s = float(summary["host_time_s"]) * scale
    est.sim_time_s = float(summary["sim_time_s"]) * scale
    est.bytes_total = float(summary["bytes"]["total"]) * scale
    est.device_peak_memory_bytes = summary["costs"].get("device_peak_memory_bytes")
    est.trainable_params = int(summary["trainable_params"])
    if cfg.model.name_or_path.startswith("random:") and est.trainable_params < FEW_TRAINABLE:
        est.warnings.append(
            f"model.name_or_path {cfg.model.name_or_path!r} is randomly initialised and only "
            f"{est.trainable_params:,} parameters train: expect little learning (use a "
            "pretrained base, or a larger peft.r)"
        )
    return est


def dry_run_text(cfg: RunConfig, probe: bool = True) -> str:
    return dry_run(cfg, probe=probe).text()


def main_for(configs: list[Path], overrides: list[str]) -> str:
    """What ``--dry-run`` prints for one or several configs."""
    from cotune.config import load_config

    parts: list[str] = []
    for c in configs:
        cfg = load_config(c, overrides)
        parts.append(f"## {cfg.name} ({c})\n{dry_run_text(cfg)}")
    return "\n\n".join(parts)
