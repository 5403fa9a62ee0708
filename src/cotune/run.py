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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotune.config import RunConfig, dump_config
from cotune.errors import ConfigError, CotuneError, DivergenceError, Interrupted, RunDirError
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

# ---------------------------------------------------------------- the run


@dataclass
class NodeInputs:
    """A deployed device's own inputs, in place of the config's dataset and partition: its
    training data (labelled with the run's ids) and the run's tokenizer when the server trained
    one (``random:`` models), so the device never needs the server's data."""

    data: Any  # TaskData
    tokenizer: Any  # Tokenizer, or None: the model's own
    index: int  # which device this is


def chat_format(cfg: RunConfig, tokenizer: Any, train: list[Any]) -> Any:
    """``data.chat_template`` resolved against the run's tokenizer; prompts it applies to."""
    from cotune.data.chat import resolve_chat
    from cotune.errors import DataError

    chat = resolve_chat(
        cfg.data.chat_template, cfg.data.system_prompt, tokenizer, cfg.model.name_or_path
    )
    if chat is not None and not any(e.prompt is not None for e in train):
        raise DataError(
            "data.chat_template: the training data has no prompts to make conversations of; "
            "set data.prompt_field, or use an instruct view (e.g. fortunes with view: instruct)"
        )
    return chat


def build_experiment(
    cfg: RunConfig, run_dir: Path, *, quiet: bool, inputs: NodeInputs | None = None
):
    """Load data, tokenizer, model and adapters; partition; wire the engine. Touches no files.
    With ``inputs`` (a device of a deployed run with its own data file), device ``inputs.index``
    holds all of ``inputs.data`` and no other device holds anything."""
    import torch

    from cotune.accel.placement import place_model
    from cotune.data import build_tokenizer, encode_dataset, load_task_data, partition
    from cotune.models import load_model
    from cotune.nodes import make_grid
    from cotune.paradigms import get_preflight
    from cotune.paradigms.base import Experiment
    from cotune.peft import inject_adapters
    from cotune.runtime import LocalEngine
    from cotune.sim.simulation import Simulation
    from cotune.train import Trainer

    torch.manual_seed(cfg.seed)
    sim = Simulation.from_config(cfg.devices, cfg.seed)  # fleet errors first: they are cheap
    device = check_devices(cfg)  # the server's; every node's is resolved (and checked) here
    task = cfg.model.task
    data = load_task_data(cfg.data, task, cfg.seed) if inputs is None else inputs.data
    num_labels = len(data.label_names) if task == "classification" and data.label_names else None
    random_model = cfg.model.name_or_path.startswith("random:")
    tokenizer = inputs.tokenizer if inputs is not None else None
    if random_model and tokenizer is None:
        tokenizer = build_tokenizer(None, [e.text for e in data.train], cfg.data.bpe_vocab_size)
    loaded = load_model(
        cfg.model,
        num_labels=num_labels,
        vocab_size=tokenizer.vocab_size if tokenizer is not None else None,
        seed=cfg.seed,
    )
    place_model(loaded, cfg, device)  # quantized, on the server's device, computing as asked
    if tokenizer is None:
        tokenizer = build_tokenizer(loaded.tokenizer, [], cfg.data.bpe_vocab_size)
    tokenizer.chat = chat_format(cfg, tokenizer, data.train)
    train_set = encode_dataset(data.train, tokenizer, cfg.model.max_length, task).on(device)
    test_examples = data.test
    if cfg.eval.mixture is not None:  # the target domain mix the run is evaluated on
        from cotune.data.mixture import mix_examples

        test_examples = mix_examples(test_examples, cfg.eval.mixture, data.group_names, cfg.seed)
    if cfg.eval.max_examples:
        test_examples = test_examples[: cfg.eval.max_examples]
    # A device with its own data has no test set (the server evaluates): one example stands in.
    test_examples = test_examples or data.train[:1]
    test_set = encode_dataset(test_examples, tokenizer, cfg.model.max_length, task).on(device)
    labels = [e.group for e in data.train]  # class ids, or a causal LM's domains (or None)
    if inputs is None:
        parts = partition(labels, cfg.devices.count, cfg.partition, cfg.seed)
    else:
        parts = [[] for _ in range(cfg.devices.count)]
        parts[inputs.index] = list(range(len(data.train)))
    if cfg.data.mixture is not None:  # every shard resampled to the domain mixture
        from cotune.data.mixture import mix_parts

        parts = mix_parts(parts, labels, cfg.data.mixture, data.group_names, cfg.seed)
    heads = loaded.anatomy.head_paths()
    peft_cfg = cfg.peft
    if peft_cfg.method in ("gelora", "ggm") and inputs is not None:
        from cotune.errors import ConfigError

        raise ConfigError(
            f"peft.method: {peft_cfg.method} chooses its ranks from the run's training data at "
            "setup; a device with its own --data file cannot reproduce them (use the config's data)"
        )
    if peft_cfg.method == "gelora":  # per-layer ranks from the data, before injection
        from cotune.peft.gelora import gelora_peft_section

        peft_cfg = gelora_peft_section(
            peft_cfg, loaded.model, loaded.anatomy, train_set, parts, seed=cfg.seed,
            head_paths=heads, batch_size=cfg.eval.batch_size, sim=sim,
        )  # fmt: skip
    if cfg.peft.stages is not None and inputs is None:  # names, paradigm, domains: up front
        from cotune.stages import check_stages

        check_stages(cfg, labels, parts, data.group_names)
    ggm = None
    if peft_cfg.method == "ggm":  # a warm-up and a graph choose the components to train
        from cotune.peft.ggm_setup import ggm_adapters

        peft_cfg, adapters, ggm = ggm_adapters(
            cfg, peft_cfg, loaded, train_set, parts, head_paths=heads, sim=sim
        )
    else:
        adapters = inject_adapters(loaded.model, peft_cfg, anatomy=loaded.anatomy, head_paths=heads)
    if peft_cfg.method == "d2lora" or cfg.peft.warmup is not None:  # every role starts warmed
        from cotune.peft.d2lora import d2lora_stage

        d2lora_stage(cfg, loaded, tokenizer, adapters, sim)
    trainer = Trainer(adapters.named_trainable(), cfg.train, cfg.train.steps)
    engine = LocalEngine(codec=cfg.engine.codec, wire=cfg.engine.kind != "local")
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
        peft_section=peft_cfg,
        ggm_allocation=ggm.to_json() if ggm is not None else None,
    )
    exp.grid = make_grid(exp)
    preflight = get_preflight(cfg.paradigm.name)
    if preflight is not None:  # cuts, depths, memory: the checks that need the model
        try:
            preflight(exp)
        except BaseException:
            exp.grid.close()
            raise
    return exp, tokenizer


def check_devices(cfg: RunConfig) -> Any:
    """Every node's ``train.device`` / ``train.node_devices`` resolved on this machine, and what
    runs there checked (quantization, autocast, paradigm support); returns the server's device."""
    from cotune.accel.placement import check_placement, node_device
    from cotune.accel.precision import check_precision
    from cotune.nodes import infrastructure
    from cotune.runtime.ids import SERVER, device_id

    nodes = [SERVER, *(device_id(i) for i in range(cfg.devices.count)), *infrastructure(cfg)]
    server = check_placement(cfg, nodes)
    placed = {node_device(cfg.train, n) for n in nodes} if cfg.engine.kind == "isolated" else set()
    for device in {server, *placed}:
        check_precision(cfg, device)
    return server


def check_methods(cfg: RunConfig) -> None:
    """PEFT method names and options: before any data or model is loaded (seconds, not minutes)."""
    from cotune.peft import get_method

    try:
        get_method(cfg.peft.method).parse_options(cfg.peft.options)
    except CotuneError as err:
        text = str(err)
        raise type(err)(text if text.startswith("peft.") else f"peft.method: {text}") from None


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


def compare(
    config_paths: list[str],
    out_dir: str | Path,
    *,
    overrides: list[str] | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    resume: bool = False,
    seeds: int = 1,
) -> Path:
    """Run several configs into ``out_dir/<name>`` and write a comparison report over them,
    updated after every run. ``resume``: a run that finished is kept as it is (if its config
    is the one given), an unfinished one continues from its checkpoint, a missing one starts.
    ``seeds``: each config runs with seeds ``seed .. seed + seeds - 1`` (``<name>-seed<s>``),
    and the report adds every figure's mean and 95% interval over them."""
    from cotune.config import load_config
    from cotune.report import write_compare_report

    out = Path(out_dir)
    cfgs = [load_config(p, overrides) for p in config_paths]  # validate all before running any
    groups: dict[str, list[int]] | None = None
    if seeds < 1:
        raise ConfigError(f"compare --seeds: {seeds} (give at least 1)")
    if seeds > 1:
        groups = {c.name: list(range(i * seeds, (i + 1) * seeds)) for i, c in enumerate(cfgs)}
        cfgs = [c.model_copy(update={"seed": c.seed + k, "name": f"{c.name}-seed{c.seed + k}"})
                for c in cfgs for k in range(seeds)]  # fmt: skip
    names = [c.name for c in cfgs]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise RunDirError(
            f"compare: run names must differ, {sorted(dupes)} appear twice (set `name:` in each config)"
        )
    finished = {c.name for c in cfgs if resume and finished_run(run_dir_for(c, out), c)}
    for c in cfgs:
        if c.name not in finished:
            check_run_dir(run_dir_for(c, out), overwrite=overwrite, resume=resume)
    run_dirs: list[Path] = []
    report, written = out, -1  # the report, and how many runs it covers
    for c in cfgs:
        if c.name in finished:
            log.info("%s finished before: kept", c.name)
            run_dirs.append(run_dir_for(c, out))
            continue
        if not quiet:
            log.info("running %s (%s)", c.name, c.paradigm.name)
        run_dirs.append(
            run_experiment(c, out_root=out, overwrite=overwrite, resume=resume, quiet=quiet)
        )
        # After every run: an interrupted comparison still shows what finished.
        report = write_compare_report(run_dirs, out, seed_groups(groups, len(run_dirs)))
        written = len(run_dirs)
    if written < len(run_dirs) or not run_dirs:  # kept runs after the last one run here
        report = write_compare_report(run_dirs, out, groups)
    return report


def seed_groups(groups: dict[str, list[int]] | None, done: int) -> dict[str, list[int]] | None:
    """The seed groups restricted to the first ``done`` runs (a comparison written midway)."""
    if groups is None:
        return None
    return {k: [i for i in v if i < done] for k, v in groups.items() if v[0] < done}


def finished_run(run_dir: Path, cfg: RunConfig) -> bool:
    """Whether ``run_dir`` holds a finished run of ``cfg`` (its summary and every output);
    a finished run of another config is a ``RunDirError`` (it would be compared as this one)."""
    from cotune.config import load_config

    if not (run_dir / "summary.json").is_file() or missing_outputs(run_dir, cfg):
        return False
    try:
        same = load_config(run_dir / "config.yaml").fingerprint() == cfg.fingerprint()
    except CotuneError:
        same = False
    if not same:
        raise RunDirError(
            f"compare --resume: {run_dir} holds a finished run of a different config; use "
            "--overwrite to run this one there, or another --out"
        )
    return True
