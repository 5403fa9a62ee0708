"""What a finished run says about itself: ``summary.json`` (accuracy, time, bytes, per-role
costs, the partition), ``costs.csv`` and, for a large population, ``partition.csv``; and a
deployed run's measured figures beside the simulator's prediction."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from cotune.report.metrics import strict_json
from cotune.runtime.ids import device_id

#: Above this many devices, per-device detail leaves summary.json: never-used devices are
#: counted, not listed (in it and costs.csv), and the partition goes to partition.csv (a
#: 100,000-device population would write 100,000 rows of zeros and 600,000 lines of JSON).
IDLE_ROWS_MAX = 1000
PER_DEVICE = ("sizes", "label_counts", "divergence")


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """summary.json and costs.csv (and partition.csv for a large population)."""
    part = summary["partition"]
    if part["num_devices"] > IDLE_ROWS_MAX:
        write_partition_csv(run_dir / "partition.csv", part)
        summary["partition"] = {k: v for k, v in part.items() if k not in PER_DEVICE} | {
            "per_device": "partition.csv"
        }
    (run_dir / "summary.json").write_text(strict_json(summary, indent=2), encoding="utf-8")
    write_costs_csv(run_dir / "costs.csv", summary["costs"]["roles"])


def build_summary(exp, result, host_time: float, *, messages: int | None = None) -> dict[str, Any]:
    from cotune.data import partition_summary

    cfg = exp.cfg
    stats = exp.sim.clock.stats(idle=False)  # restored on resume, unlike the engine's log
    up = sum(st.bytes_up for r, st in stats.items() if r.startswith("device"))
    down = sum(st.bytes_down for r, st in stats.items() if r.startswith("device"))
    # Between infrastructure roles (edge aggregators ↔ cloud): what they sent minus what reached devices.
    backhaul = sum(st.bytes_up for r, st in stats.items() if not r.startswith("device")) - down
    evals = [
        r
        for r in exp.log.records
        if r.get("event") == "eval" and r.get("role") in ("server", "mean")
    ]
    best: dict[str, float] = {}
    key = "accuracy" if exp.task == "classification" else "loss"
    scored = [r for r in evals if key in r]  # hat_drafter's evals score its drafter instead
    if scored:
        pick = max if key == "accuracy" else min
        b = pick(scored, key=lambda r: r[key])
        best = {
            k: b[k] for k in ("step", "loss", "accuracy", "exact_match", "perplexity") if k in b
        }
    target = cfg.eval.target_accuracy
    reached = None
    if target is not None:
        hits = [r for r in evals if r.get("accuracy", 0.0) >= target]
        if hits:
            reached = {
                k: hits[0][k]
                for k in ("step", "round", "sim_time_s", "host_time_s")
                if k in hits[0]
            }
    used = exp.sim.clock.used() | set(exp.sim.memory)
    idle = sum(1 for r in exp.sim.profiles if r.startswith("device-") and r not in used)
    # A large population: list who took part, count the rest.
    costs = exp.sim.cost_table(idle=idle <= IDLE_ROWS_MAX)
    devices = [c for r, c in costs.items() if r.startswith("device-")]
    totals = {
        k: sum(c[k] for c in costs.values()) for k in ("flops", "energy_j", "compute_s", "comm_s")
    }
    device_totals = {
        k: sum(c[k] for c in devices) for k in ("flops", "bytes_up", "bytes_down", "energy_j")
    }
    mems = [c["memory_bytes"] for c in devices if c["memory_bytes"] is not None]
    labels = [e.group for e in exp.data.train]
    return {
        "name": cfg.name,
        "paradigm": cfg.paradigm.name,
        "peft_method": cfg.peft.method,
        "model": cfg.model.name_or_path,
        "dataset": cfg.data.dataset,
        "task": exp.task,
        "devices": cfg.devices.count,
        "steps": cfg.train.steps,
        "final": result.final_eval,
        "best": best,
        "target_accuracy": target,
        "time_to_target": reached,
        "host_time_s": host_time,
        "sim_time_s": exp.sim.now,
        # up/down/total: device links; backhaul: edge aggregators ↔ cloud (hierfed), else 0.
        "bytes": {"up": up, "down": down, "total": up + down, "backhaul": backhaul},
        "costs": {
            "total": totals,
            "devices": device_totals,
            "device_peak_memory_bytes": max(mems) if mems else None,
            "server": costs.get("server"),
            "roles": costs,
            # Devices that never computed nor sent anything (never sampled); not in ``roles``
            # (nor costs.csv) when there are more than IDLE_ROWS_MAX of them.
            "idle_devices": idle,
        },
        "messages": messages if messages is not None else len(exp.engine.transfers),
        "trainable_params": exp.adapters.num_trainable(),
        "partition": partition_summary(exp.parts, labels, exp.data.group_names),
        "extra": {
            k: v for k, v in result.extra.items() if k not in ("per_device_eval", "adapters")
        },
        **_per_device(result.extra.get("per_device_eval")),
    }


def _per_device(per: dict[str, dict[str, float]] | None) -> dict[str, Any]:
    """Devices that end with their own adapter (local, dlora, clustered): each one's final
    evaluation, or above IDLE_ROWS_MAX devices the spread of their accuracies."""
    if not per:
        return {}
    if len(per) <= IDLE_ROWS_MAX:
        return {"per_device_eval": per}
    accs = [v["accuracy"] for v in per.values() if isinstance(v.get("accuracy"), int | float)]
    if not accs:
        return {}
    return {"per_device_accuracy": {"min": min(accs), "mean": sum(accs) / len(accs),
                                    "max": max(accs), "devices": len(accs)}}  # fmt: skip


def deployment_summary(
    summary: dict[str, Any], measured: dict[str, Any], host_time: float
) -> dict[str, Any]:
    """Per device: the simulator's prediction (busy seconds, message bytes on its profile)
    beside what the deployment measured (host busy seconds, bytes on the wire)."""
    roles = summary["costs"]["roles"]
    nodes = {}
    for node, m in measured.items():
        sim = roles.get(node, {})
        if node == "server":  # its busy time: what it did not spend waiting on devices
            m = {"busy_s": max(0.0, host_time - m["idle_s"]), "wire_bytes_up": None,
                 "wire_bytes_down": None, "batched_requests": None,
                 "peak_rss_bytes": m.get("peak_rss_bytes")}  # fmt: skip
        nodes[node] = {
            "predicted_busy_s": sim.get("busy_s"),
            "measured_busy_s": m["busy_s"],
            # Its speed as measured (counted FLOPs per busy second, encoding included): what
            # `cotune.deploy.calibrate` writes into profiles that describe these machines.
            "measured_flops_per_s": (
                sim["flops"] / m["busy_s"] if sim.get("flops") and m["busy_s"] else None
            ),
            "message_bytes_up": sim.get("bytes_up"),
            "wire_bytes_up": m["wire_bytes_up"],
            "message_bytes_down": sim.get("bytes_down"),
            "wire_bytes_down": m["wire_bytes_down"],
            # Requests its process answered in a batch (a Ray host's cohort); busy seconds
            # and this count are per process, which on Ray holds several devices.
            "batched_requests": m.get("batched_requests"),
            # The peak resident memory of its process (a Ray host: of all its devices).
            "peak_rss_bytes": m.get("peak_rss_bytes"),
            # Which process served it ("host:pid"): devices hosted together (a Ray host,
            # `cotune device` with several --id) share busy seconds and peak memory.
            "process": m.get("process"),
        }
    return {
        "predicted_time_s": summary["sim_time_s"],
        "measured_wall_s": host_time,
        "nodes": nodes,
        # The prediction uses the configured profiles (devices.mix); measured seconds are this
        # deployment's hosts, so they agree only where the profiles describe these machines.
    }


def write_partition_csv(path: Path, part: dict[str, Any]) -> None:
    """One row per device: its size, its count of each label and its label divergence."""
    names = part.get("label_names") or []
    counts, div = part.get("label_counts"), part.get("divergence")
    if counts and len(names) != len(counts[0]):
        names = [f"label-{j}" for j in range(len(counts[0]))]
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["device", "size", *(names if counts else []), *(["divergence"] if div else [])])
        for i, size in enumerate(part["sizes"]):
            w.writerow([device_id(i), size, *(counts[i] if counts else []),
                        *([div[i]] if div else [])])  # fmt: skip


def write_costs_csv(path: Path, roles: dict[str, dict[str, Any]]) -> None:
    """One row per role: the per-device cost table, readable in any spreadsheet."""
    fields = ["role", "profile", "flops", "bytes_up", "bytes_down", "compute_s", "comm_s",
              "busy_s", "energy_j", "memory_bytes", "memory_fits"]  # fmt: skip
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for role, row in roles.items():
            w.writerow({"role": role, **{k: row.get(k) for k in fields[1:]}})
