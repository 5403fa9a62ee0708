"""Run one experiment end to end: validate, build, train through the paradigm, write the run dir.

Order matters for bad input: everything that can fail on the user's config or data (config,
dataset, model, adapter targets, partition) is checked *before* the run directory is touched,
so a failed start never leaves half-written files or clobbers an earlier run.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from cotune.config import RunConfig, dump_config
from cotune.errors import CheckpointError, RunDirError

log = logging.getLogger(__name__)

RUN_MARKER = "config.yaml"


def run_dir_for(cfg: RunConfig, out_root: str | Path | None = None) -> Path:
    return Path(out_root if out_root is not None else cfg.output.dir) / cfg.name


def check_run_dir(run_dir: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse to touch an existing run unless told to overwrite or resume it."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        if resume:
            raise RunDirError(f"--resume: {run_dir} holds no run to resume")
        return
    if resume:
        if not (run_dir / RUN_MARKER).is_file():
            raise RunDirError(
                f"--resume: {run_dir} is not a cotune run directory (no {RUN_MARKER})"
            )
        return
    if not overwrite:
        raise RunDirError(
            f"run directory {run_dir} already exists and is not empty; "
            "pass --overwrite to replace it or --resume to continue it"
        )


def prepare_run_dir(run_dir: Path, *, overwrite: bool, resume: bool) -> None:
    if overwrite and not resume and run_dir.exists():
        if run_dir.is_dir() and not (run_dir / RUN_MARKER).is_file() and any(run_dir.iterdir()):
            raise RunDirError(
                f"--overwrite: {run_dir} is not a cotune run directory; refusing to delete it"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------- checkpoints


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / "checkpoints").glob("step-*/state.pt"))
    return ckpts[-1] if ckpts else None


def write_checkpoint(
    run_dir: Path,
    cfg: RunConfig,
    step: int,
    states: dict,
    extra: dict,
    *,
    sim: Any = None,
    final: bool = False,
) -> Path:
    """Every role's state, the driver's extra state and the simulator's clock, atomically."""
    import torch

    out = run_dir / "checkpoints" / f"step-{step:07d}"
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "fingerprint": cfg.fingerprint(),
        "config": cfg.to_dict(),
        "step": step,
        "paradigm": cfg.paradigm.name,
        "states": {k: s.state_dict() for k, s in states.items()},
        "extra": extra,
        "final": final,
        # The clock and FLOP meter, so a resumed run's simulated time and costs carry on.
        "sim": {"clock": vars(sim.clock), "flops": vars(sim.flops)} if sim is not None else None,
    }
    tmp = out / "state.pt.tmp"
    torch.save(payload, tmp)
    tmp.replace(out / "state.pt")  # atomic: a killed run never leaves a half checkpoint
    return out


def load_checkpoint(path: Path, cfg: RunConfig) -> dict[str, Any]:
    import torch

    from cotune.train import RoleState

    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise CheckpointError(f"{path}: cannot read checkpoint ({exc})") from None
    if payload.get("fingerprint") != cfg.fingerprint():
        diffs = _config_diff(payload.get("config", {}), cfg.to_dict())
        raise CheckpointError(
            f"{path} was written by another config; differing fields: {', '.join(diffs[:8]) or 'unknown'}"
        )
    payload["states"] = {k: RoleState.from_state_dict(v) for k, v in payload["states"].items()}
    return payload


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb and key not in ("output", "eval", "name"):
            out.append(f"{prefix}{key} ({va!r} vs {vb!r})")
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint so the log reads as one run."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(rec.get("step", 0)) <= step:
            kept.append(line)
    path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")


# ---------------------------------------------------------------- the run


def build_experiment(cfg: RunConfig, run_dir: Path, *, quiet: bool):
    """Load data, tokenizer, model and adapters; partition; wire the engine. Touches no files."""
    import torch

    from cotune.data import build_tokenizer, encode_dataset, load_task_data, partition
    from cotune.models import load_model
    from cotune.paradigms.base import Experiment
    from cotune.peft import inject_adapters
    from cotune.runtime import LocalEngine
    from cotune.sim.simulation import Simulation
    from cotune.train import Trainer

    torch.manual_seed(cfg.seed)
    sim = Simulation.from_config(cfg.devices, cfg.seed)  # fleet errors first: they are cheap
    task = cfg.model.task
    data = load_task_data(cfg.data, task, cfg.seed)
    num_labels = len(data.label_names) if task == "classification" and data.label_names else None
    random_model = cfg.model.name_or_path.startswith("random:")
    tokenizer = None
    if random_model:
        tokenizer = build_tokenizer(None, [e.text for e in data.train], cfg.data.bpe_vocab_size)
    loaded = load_model(
        cfg.model,
        num_labels=num_labels,
        vocab_size=tokenizer.vocab_size if tokenizer is not None else None,
        seed=cfg.seed,
    )
    if tokenizer is None:
        tokenizer = build_tokenizer(loaded.tokenizer, [], cfg.data.bpe_vocab_size)
    train_set = encode_dataset(data.train, tokenizer, cfg.model.max_length, task)
    test_examples = data.test[: cfg.eval.max_examples] if cfg.eval.max_examples else data.test
    test_set = encode_dataset(test_examples, tokenizer, cfg.model.max_length, task)
    labels = [e.group for e in data.train]  # class ids, or a causal LM's domains (or None)
    parts = partition(labels, cfg.devices.count, cfg.partition, cfg.seed)
    heads = loaded.anatomy.head_paths()
    peft_cfg = cfg.peft
    if peft_cfg.method == "gelora":  # per-layer ranks from the data, before injection
        from cotune.peft.gelora import gelora_peft_section

        peft_cfg = gelora_peft_section(
            peft_cfg, loaded.model, loaded.anatomy, train_set, parts, seed=cfg.seed,
            head_paths=heads, batch_size=cfg.eval.batch_size, sim=sim,
        )  # fmt: skip
    if cfg.peft.stages is not None:  # stage names, paradigm and domains: before any work
        from cotune.stages import check_stages

        check_stages(cfg, labels, parts, data.group_names)
    adapters = inject_adapters(loaded.model, peft_cfg, anatomy=loaded.anatomy, head_paths=heads)
    if peft_cfg.method == "d2lora" or cfg.peft.warmup is not None:  # every role starts warmed
        from cotune.peft.d2lora import d2lora_stage

        d2lora_stage(cfg, loaded, tokenizer, adapters, sim)
    trainer = Trainer(adapters.named_trainable(), cfg.train, cfg.train.steps)
    engine = LocalEngine(codec=cfg.engine.codec)
    engine.add_listener(sim.clock.on_transfer)  # every encoded message costs link time
    exp = Experiment(
        cfg=cfg,
        loaded=loaded,
        adapters=adapters,
        data=data,
        train_set=train_set,
        test_set=test_set,
        parts=parts,
        engine=engine,
        trainer=trainer,
        run_dir=run_dir,
        sim=sim,
        quiet=quiet,
        tokenizer=tokenizer,
    )
    return exp, tokenizer


def run_experiment(
    cfg: RunConfig,
    *,
    out_root: str | Path | None = None,
    overwrite: bool | None = None,
    resume: bool = False,
    quiet: bool = False,
    report: bool = True,
) -> Path:
    """Run ``cfg`` and return its run directory (``<output.dir>/<name>``)."""
    from cotune.paradigms import get_paradigm
    from cotune.report import MetricsLog

    overwrite = cfg.output.overwrite if overwrite is None else overwrite
    run_dir = run_dir_for(cfg, out_root)
    check_run_dir(run_dir, overwrite=overwrite, resume=resume)
    paradigm = get_paradigm(cfg.paradigm.name)
    resume_payload = None
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise CheckpointError(f"--resume: {run_dir / 'checkpoints'} holds no checkpoint")
        resume_payload = load_checkpoint(ckpt, cfg)
        if resume_payload.get("final"):
            raise RunDirError(
                f"--resume: {run_dir} already finished (its last checkpoint is final)"
            )

    exp, tokenizer = build_experiment(cfg, run_dir, quiet=quiet)

    prepare_run_dir(run_dir, overwrite=overwrite, resume=resume)
    (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    if resume_payload is not None:
        truncate_metrics(run_dir / "metrics.jsonl", int(resume_payload["step"]))
    exp.log = MetricsLog(run_dir / "metrics.jsonl")
    if resume_payload is not None:
        exp.resume = resume_payload
        exp.last_checkpoint_step = int(resume_payload["step"])
        if resume_payload.get("sim"):
            vars(exp.sim.clock).update(resume_payload["sim"]["clock"])
            vars(exp.sim.flops).update(resume_payload["sim"]["flops"])
    tokenizer.save(run_dir / "tokenizer")
    if exp.data.label_names:
        (run_dir / "labels.json").write_text(json.dumps(exp.data.label_names), encoding="utf-8")
    exp.checkpoint_fn = lambda step, states, extra: write_checkpoint(
        run_dir, cfg, step, states, extra, sim=exp.sim
    )

    started = time.perf_counter()
    if cfg.peft.stages is not None:
        from cotune.stages import run_stages

        result = run_stages(exp, paradigm)
    else:
        result = paradigm(exp)
    host_time = time.perf_counter() - started

    last_step = max([int(r.get("step", 0)) for r in exp.log.records] + [cfg.train.steps])
    write_checkpoint(run_dir, cfg, last_step, result.states, result.extra, sim=exp.sim, final=True)
    if cfg.output.save_adapter:
        save_adapters(exp, result.states, run_dir / "adapter")
    summary = build_summary(exp, result, host_time)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    write_costs_csv(run_dir / "costs.csv", summary["costs"]["roles"])
    if report:
        from cotune.report import write_run_report

        write_run_report(run_dir)
    return run_dir


def save_adapters(exp, states: dict, out: Path) -> None:
    """One PEFT adapter dir per product role; several roles get PEFT-style sub-directories."""
    from cotune.peft import save_adapter

    for role, state in states.items():
        target = out if len(states) == 1 else out / role
        with exp.trainer.activate(state):
            save_adapter(
                exp.adapters,
                target,
                base_model_name_or_path=exp.loaded.name_or_path,
                task=exp.task,
            )


def build_summary(exp, result, host_time: float) -> dict[str, Any]:
    from cotune.data import partition_summary

    cfg = exp.cfg
    stats = exp.sim.clock.stats()  # restored on resume, unlike the engine's in-memory log
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
    if evals:
        key = "accuracy" if exp.task == "classification" else "loss"
        pick = max if key == "accuracy" else min
        b = pick(evals, key=lambda r: r[key])
        best = {k: b[k] for k in ("step", "loss", "accuracy", "perplexity") if k in b}
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
    costs = exp.sim.cost_table()
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
        },
        "messages": len(exp.engine.transfers),
        "trainable_params": exp.adapters.num_trainable(),
        "partition": partition_summary(exp.parts, labels, exp.data.group_names),
        "extra": {
            k: v for k, v in result.extra.items() if k not in ("per_device_eval", "adapters")
        },
    }


def write_costs_csv(path: Path, roles: dict[str, dict[str, Any]]) -> None:
    """One row per role: the per-device cost table, readable in any spreadsheet."""
    import csv

    fields = ["role", "profile", "flops", "bytes_up", "bytes_down", "compute_s", "comm_s",
              "busy_s", "energy_j", "memory_bytes", "memory_fits"]  # fmt: skip
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for role, row in roles.items():
            w.writerow({"role": role, **{k: row.get(k) for k in fields[1:]}})


def compare(
    config_paths: list[str],
    out_dir: str | Path,
    *,
    overrides: list[str] | None = None,
    overwrite: bool = False,
    quiet: bool = False,
) -> Path:
    """Run several configs into ``out_dir/<name>`` and write a comparison report over them."""
    from cotune.config import load_config
    from cotune.report import write_compare_report

    out = Path(out_dir)
    cfgs = [load_config(p, overrides) for p in config_paths]  # validate all before running any
    names = [c.name for c in cfgs]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise RunDirError(
            f"compare: run names must differ, {sorted(dupes)} appear twice (set `name:` in each config)"
        )
    for c in cfgs:
        check_run_dir(run_dir_for(c, out), overwrite=overwrite, resume=False)
    run_dirs = []
    for c in cfgs:
        if not quiet:
            log.info("running %s (%s)", c.name, c.paradigm.name)
        run_dirs.append(run_experiment(c, out_root=out, overwrite=overwrite, quiet=quiet))
    return write_compare_report(run_dirs, out)
