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

from cotune.build import build_experiment, check_devices, check_methods
from cotune.config import RunConfig, dump_config
from cotune.errors import DivergenceError, Interrupted, RunDirError
from cotune.rundir import (  # noqa: F401 - re-exported: cotune.run was their home
    RUN_MARKER,
    RunDirTxn,
    check_run_dir,
    latest_checkpoint,
    load_checkpoint,
    load_latest_checkpoint,
    run_dir_for,
    truncate_metrics,
    write_checkpoint,
)
from cotune.summary import build_summary, deployment_summary, write_summary

log = logging.getLogger(__name__)


def run_experiment(
    cfg: RunConfig,
    *,
    out_root: str | Path | None = None,
    overwrite: bool | None = None,
    resume: bool = False,
    quiet: bool = False,
    report: bool = True,
) -> Path:
    """Run ``cfg`` and return its run directory (``<output.dir>/<name>``).

    Everything that can fail on the inputs is checked before the run directory is touched; an
    old run replaced with ``overwrite`` is deleted only once the new run has started (see
    ``cotune.rundir``). ``resume`` continues from the newest good checkpoint, starts afresh
    when none was written yet, and completes the outputs of a run killed after its final one.
    """
    from cotune.paradigms import get_paradigm

    overwrite = cfg.output.overwrite if overwrite is None else overwrite
    run_dir = run_dir_for(cfg, out_root)
    check_run_dir(run_dir, overwrite=overwrite, resume=resume)
    check_methods(cfg)
    from cotune.report.trackers import check_trackers

    check_trackers(cfg)
    paradigm = get_paradigm(cfg.paradigm.name)
    payload = None
    if resume:
        device = check_devices(cfg)  # the server's: the checkpoint's tensors go there
        payload = load_latest_checkpoint(run_dir, cfg, device) if run_dir.is_dir() else None
        if payload is None:
            log.warning("--resume: %s holds no checkpoint yet; starting the run afresh", run_dir)
        elif payload.get("final") and not missing_outputs(run_dir, cfg):
            raise RunDirError(
                f"--resume: {run_dir} already finished (its last checkpoint is final and every "
                "output is there)"
            )

    exp, tokenizer = build_experiment(cfg, run_dir, quiet=quiet)

    try:
        return _transact(exp, tokenizer, paradigm, payload, run_dir, overwrite, resume, report)
    finally:
        exp.grid.close()  # a deployed run says goodbye to its devices


def _transact(exp, tokenizer, paradigm, payload, run_dir, overwrite, resume, report) -> Path:
    txn = RunDirTxn(run_dir, overwrite=overwrite, resume=resume)
    txn.begin()
    try:
        return _run_in(exp, tokenizer, paradigm, payload, txn, report=report)
    except KeyboardInterrupt:
        message = _interrupted_message(run_dir, txn.is_started)
        txn.abort()
        raise Interrupted(message) from None
    except DivergenceError as err:
        ckpt = latest_checkpoint(run_dir) if txn.is_started else None
        txn.abort()
        if ckpt is not None:
            keep = f"the last good checkpoint is {ckpt.parent.name} (nothing non-finite was saved)"
        elif txn.is_started:
            keep = "no checkpoint was written before it (nothing non-finite was saved)"
        else:  # it never started: undone like any failed start (a replaced run is back)
            keep = "nothing of it was kept (a run it was to replace is back in place)"
        raise DivergenceError(
            f"{err}; the run stopped and {keep}. Lower train.lr, set train.max_grad_norm, or set "
            "train.on_nonfinite=skip to skip such steps",
            role=err.role,
            step=err.step,
        ) from None
    except BaseException:
        txn.abort()
        raise


def _interrupted_message(run_dir: Path, started: bool) -> str:
    if not started:
        return (
            "interrupted before the run started: nothing was kept (a run it was to replace is "
            "back in place)"
        )
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return "interrupted before the first checkpoint: nothing to resume (run it again)"
    return (
        f"interrupted; {run_dir} keeps its checkpoint {ckpt.parent.name} (continue with --resume)"
    )


def missing_outputs(run_dir: Path, cfg: RunConfig) -> list[str]:
    """The outputs a finished run writes after its final checkpoint that are not there."""
    names = ["summary.json", "costs.csv"] + (["adapter"] if cfg.output.save_adapter else [])
    return [n for n in names if not (run_dir / n).exists()]


def _run_in(exp, tokenizer, paradigm, payload, txn: RunDirTxn, *, report: bool) -> Path:
    from cotune.report import MetricsLog
    from cotune.report.trackers import Trackers

    cfg, run_dir = exp.cfg, exp.run_dir
    (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    if exp.ggm_allocation is not None:  # which components GGM's setup chose to train
        (run_dir / "ggm_allocation.json").write_text(
            json.dumps(exp.ggm_allocation, indent=2) + "\n", encoding="utf-8"
        )
    metrics = run_dir / "metrics.jsonl"
    if payload is not None:
        truncate_metrics(metrics, int(payload["step"]))
    elif metrics.exists():  # --resume of a run killed before its first checkpoint: afresh
        metrics.unlink()
    exp.log = MetricsLog(metrics)
    exp.log.on_write = txn.started
    trackers = Trackers(cfg, run_dir)
    exp.log.listeners.append(trackers.record)
    try:
        done = _train_and_write(exp, tokenizer, paradigm, payload, txn, report=report)
    except BaseException:
        trackers.finish(None)
        raise
    trackers.finish(done)
    return run_dir


def _train_and_write(
    exp, tokenizer, paradigm, payload, txn: RunDirTxn, *, report: bool
) -> dict[str, Any]:
    """Train (or complete a finished run's outputs) and write them; returns the summary."""
    from cotune.paradigms.base import ParadigmResult

    cfg, run_dir = exp.cfg, exp.run_dir
    if payload is not None:
        txn.started()  # continuing a run: its files are its own already
        exp.resume = payload
        exp.last_checkpoint_step = int(payload["step"])
        if payload.get("sim"):
            vars(exp.sim.clock).update(payload["sim"]["clock"])
            vars(exp.sim.flops).update(payload["sim"]["flops"])
    tokenizer.save(run_dir / "tokenizer")
    if exp.data.label_names:
        (run_dir / "labels.json").write_text(json.dumps(exp.data.label_names), encoding="utf-8")

    def checkpoint(step: int, states: dict, extra: dict) -> None:
        write_checkpoint(run_dir, cfg, step, states, extra, sim=exp.sim)
        txn.started()

    exp.checkpoint_fn = checkpoint

    started = time.perf_counter()
    if payload is not None and payload.get("final"):
        log.info("%s finished training; completing its outputs", run_dir)
        result = ParadigmResult(
            states=payload["states"],
            final_eval=payload.get("final_eval") or _last_eval(exp.log.records),
            extra=payload["extra"],
        )
        messages = payload.get("messages")
    else:
        if cfg.peft.stages is not None:
            from cotune.stages import run_stages

            result = run_stages(exp, paradigm)
        else:
            result = paradigm(exp)
        messages = len(exp.engine.transfers)
        last_step = max([int(r.get("step", 0)) for r in exp.log.records] + [cfg.train.steps])
        write_checkpoint(
            run_dir, cfg, last_step, result.states, result.extra, sim=exp.sim, final=True,
            final_eval=result.final_eval, messages=messages,
        )  # fmt: skip
        txn.started()
    host_time = time.perf_counter() - started

    if cfg.output.save_adapter:
        tmp = run_dir / "adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapters(exp, result.states, tmp)
        shutil.rmtree(run_dir / "adapter", ignore_errors=True)
        tmp.rename(run_dir / "adapter")  # a killed export never leaves half an adapter
    summary = build_summary(exp, result, host_time, messages=messages)
    measured = getattr(exp.engine, "measured", None)
    if measured is not None:  # a deployed run: what really happened next to the prediction
        summary["deployment"] = deployment_summary(summary, measured(), host_time)
    write_summary(run_dir, summary)
    if report:
        from cotune.report import write_run_report

        write_run_report(run_dir)
    return summary


def _last_eval(records: list[dict]) -> dict[str, float]:
    """The final evaluation from the log (checkpoints written before it was stored there)."""
    evals = [r for r in records if r.get("event") == "eval" and r.get("role") in ("server", "mean")]
    if not evals:
        return {}
    keys = ("loss", "accuracy", "exact_match", "perplexity", "examples")
    return {k: evals[-1][k] for k in keys if isinstance(evals[-1].get(k), float | int)}


_PEFT_CLASSES = {"classification": "AutoPeftModelForSequenceClassification",
                 "causal_lm": "AutoPeftModelForCausalLM"}  # fmt: skip


def model_card(name_or_path: str, task: str, label_names: list[str] | None) -> str:
    """The adapter's README: its base model and the lines that load it with stock PEFT (a
    classification head needs its label count and names passed, which PEFT cannot read from
    the adapter directory)."""
    from cotune.models.loading import public_model_id, resolved_path

    base = public_model_id(name_or_path)
    lines = ["# cotune adapter", "", f"Base model: `{base}`"]
    if base != name_or_path:
        lines[-1] += (f" (cotune's bundled `{name_or_path}`; on the machine that trained it: "
                      f"`{resolved_path(name_or_path)}`)")  # fmt: skip
    lines[-1] += "."
    cls = _PEFT_CLASSES.get(task)
    if cls is not None:
        args = ['"path/to/this/adapter"']
        if task == "classification" and label_names:
            id2label = {i: n for i, n in enumerate(label_names)}
            label2id = {n: i for i, n in enumerate(label_names)}
            args += [f"num_labels={len(label_names)}", f"id2label={id2label!r}",
                     f"label2id={label2id!r}"]  # fmt: skip
        lines += ["", "Load it with PEFT:", "", "```python", f"from peft import {cls}", "",
                  f"model = {cls}.from_pretrained(", *(f"    {a}," for a in args), ")",
                  "```"]  # fmt: skip
    if base.startswith("random:"):
        lines += ["", f"`{base}` is a randomly initialised model built by cotune; load the "
                  "merged export (`cotune export`) rather than this adapter."]  # fmt: skip
    return "\n".join(lines) + "\n"


def save_adapters(exp, states: dict, out: Path) -> None:
    """One PEFT adapter dir per product role; several roles get PEFT-style sub-directories."""
    from cotune.models.loading import public_model_id
    from cotune.peft import save_adapter

    for role, state in states.items():
        target = out if len(states) == 1 else out / role
        with exp.trainer.activate(state):
            save_adapter(
                exp.adapters,
                target,
                base_model_name_or_path=public_model_id(exp.loaded.name_or_path),
                task=exp.task,
            )
        (target / "README.md").write_text(
            model_card(exp.loaded.name_or_path, exp.task, exp.data.label_names), encoding="utf-8"
        )
