"""Staged PEFT training in one run (`peft.stages`): MoDULA's universal → domain → router, MoSLD's
joint / experts / router.

A driver around the paradigm: for each stage with steps, the adapters switch stage (which
parameters train), a fresh `Trainer` is built over that stage's trainable set, and the paradigm
runs once with `train.steps` = the stage's steps, starting from the adapter the previous stage
produced. The simulator (clock, FLOP meter, costs) runs on across stages; metrics records get
the stage's name and a step counted from the start of the run.

In MoDULA's domain stage every device trains the expert of its own domain (its dominant label,
`peft.domains`): devices up- and download only that expert (plus the shared tensors), so FedAvg
averages each expert over the devices of its domain; `central` routes each pooled example
through its sender's expert.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from cotune.config import RunConfig
from cotune.errors import CheckpointError, ConfigError

# Paradigms whose product is one adapter (the next stage starts from it).
MULTI_PRODUCT = {"local": "one adapter per device", "dlora": "one adapter per device"}
# Paradigms whose devices train whole models through TrainingRole (per-device domain experts).
DOMAIN_PARADIGMS = ("central", "fedavg")


def stage_order(method: str) -> list[str]:
    """The method's stages in training order (empty for a method without stages)."""
    from cotune.peft import get_method

    return list(getattr(get_method(method).layer_cls, "stage_params", {}))


def stage_plan(cfg: RunConfig) -> list[tuple[str, int]]:
    """`peft.stages` as (stage, steps) in the method's order; errors name the bad field."""
    stages = cfg.peft.stages or {}
    order = stage_order(cfg.peft.method)
    if not order:
        raise ConfigError(
            f"peft.stages: method {cfg.peft.method!r} has no training stages "
            "(staged methods: modula, mosld)"
        )
    for name in stages:
        if name not in order:
            raise ConfigError(
                f"peft.stages.{name}: not a stage of {cfg.peft.method!r} "
                f"(allowed: {', '.join(order)})"
            )
    return [(s, stages[s]) for s in order if s in stages]


def check_stages(cfg: RunConfig, labels: list, parts: list, label_names: list | None) -> None:
    """Everything about `peft.stages` that can be wrong, before the run directory exists."""
    plan = stage_plan(cfg)
    paradigm = cfg.paradigm.name
    if paradigm in MULTI_PRODUCT:
        raise ConfigError(
            f"peft.stages: paradigm {paradigm!r} produces {MULTI_PRODUCT[paradigm]}; "
            "a staged run carries one adapter from stage to stage"
        )
    if dict(plan).get("domain"):
        if paradigm not in DOMAIN_PARADIGMS:
            raise ConfigError(
                f"peft.stages.domain: the domain stage (each device trains its domain's expert) "
                f"runs in {', '.join(DOMAIN_PARADIGMS)}, not {paradigm!r}"
            )
        domain_plan(cfg, labels, parts, label_names)


def domain_plan(cfg: RunConfig, labels: list, parts: list, label_names: list | None):
    from cotune.peft import get_method
    from cotune.peft.domains import plan_domains

    opts = get_method(cfg.peft.method).parse_options(cfg.peft.options)
    return plan_domains(labels, parts, label_names, opts.num_experts)


class StageLog:
    """The run's metrics log seen from one stage: steps shifted to the run's count, stage named."""

    def __init__(self, inner: Any, stage: str, offset: int) -> None:
        self.inner, self.stage, self.offset = inner, stage, offset

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.inner.records

    def log(self, record: dict[str, Any]) -> None:
        self.inner.log({**record, "step": int(record["step"]) + self.offset, "stage": self.stage})


def carry_forward(params: dict[str, torch.nn.Parameter], states: dict[str, Any]) -> None:
    """Make the stage's product the model's adapter, in fresh storage (no role aliases it)."""
    with torch.no_grad():
        for state in states.values():
            for k, v in state.params.items():
                if k in params:
                    params[k].data = v.detach().clone()


def stage_checkpoint(exp: Any, stage: str, offset: int) -> Callable[..., None] | None:
    """The stage's checkpoint writer: the run's, with the step counted from the run's start and
    what a resume needs beyond the paradigm's states (the stage, and the whole adapter: the
    earlier stages' tensors are not in this stage's role states)."""
    write = exp.checkpoint_fn
    if write is None:
        return None

    def checkpoint(step: int, states: dict[str, Any], extra: dict[str, Any]) -> None:
        info = {"name": stage, "step": step}
        write(
            offset + step, states, {**extra, "stage": info, "adapters": exp.adapters.state_dict()}
        )

    return checkpoint


def stage_experiment(
    exp: Any, stage: str, steps: int, offset: int, domains: Any, resume: dict | None = None
) -> Any:
    """A copy of `exp` for one stage: its trainer, engine, step budget, log view, domains, and the
    paradigm's resume payload when the run resumes inside this stage."""
    from cotune.nodes import make_grid
    from cotune.runtime import LocalEngine
    from cotune.train import Trainer

    cfg = exp.cfg
    scfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": steps})})
    exp.adapters.set_stage(stage)
    if stage == "domain" and domains is not None:
        experts = tuple(sorted(set(domains.by_role.values())))
        for layer in exp.adapters.layers.values():
            layer.train_domains(experts)
    engine = LocalEngine(codec=cfg.engine.codec, wire=cfg.engine.kind != "local")
    engine.add_listener(exp.sim.clock.on_transfer)
    sexp = dataclasses.replace(
        exp,
        cfg=scfg,
        trainer=Trainer(exp.adapters.named_trainable(), scfg.train, steps),
        engine=engine,
        log=StageLog(exp.log, stage, offset) if exp.log is not None else None,
        domains=domains if stage == "domain" else None,
        flop_key=f"full:{stage}",  # each stage's forward differs (experts, router)
        checkpoint_fn=stage_checkpoint(exp, stage, offset),
        last_checkpoint_step=0 if resume is None else int(resume["step"]),
        resume=resume,
    )
    sexp.grid = make_grid(sexp)  # the stage's roles see the stage's trainer, domains and key
    return sexp


def resume_point(exp: Any, stages: list[str]) -> tuple[str, int] | None:
    """(stage, step within it) of the checkpoint a resumed run continues from; restores the whole
    adapter (every stage's tensors) from it. None for a fresh run."""
    if exp.resume is None:
        return None
    info = exp.resume.get("extra", {}).get("stage")
    if info is None or info.get("name") not in stages:
        raise CheckpointError(
            f"--resume: the checkpoint at step {exp.resume.get('step')} names no stage of this "
            f"run's peft.stages ({', '.join(stages)})"
        )
    exp.adapters.load_state_dict(exp.resume["extra"]["adapters"])
    return str(info["name"]), int(info["step"])


def run_stages(exp: Any, paradigm: Callable[[Any], Any]) -> Any:
    """Run `paradigm` once per stage with steps, carrying the adapter forward; returns the last
    stage's result (its trainer becomes `exp.trainer`, so saving sees the stage's tensors)."""
    cfg = exp.cfg
    plan = stage_plan(cfg)
    domains = None
    if dict(plan).get("domain"):
        labels = [e.group for e in exp.data.train]
        domains = domain_plan(cfg, labels, exp.parts, exp.data.group_names)
    offset, result, done = 0, None, []
    resume_at = resume_point(exp, [s for s, n in plan if n > 0])
    for stage, steps in plan:
        if steps == 0:
            continue
        sresume = None
        if resume_at is not None:
            if stage != resume_at[0]:  # finished before the checkpoint: its tensors are restored
                offset += steps
                done.append({"stage": stage, "steps": steps, "final": None, "resumed": True})
                continue
            sresume = {**exp.resume, "step": resume_at[1]}
            resume_at = None
        sexp = stage_experiment(exp, stage, steps, offset, domains, sresume)
        result = paradigm(sexp)
        carry_forward(sexp.trainer.params, result.states)
        exp.trainer = sexp.trainer
        exp.engine.transfers.extend(sexp.engine.transfers)
        offset += steps
        done.append({"stage": stage, "steps": steps, "final": result.final_eval})
    assert result is not None  # the config guarantees at least one step
    result.extra["stages"] = done
    if domains is not None:
        result.extra["domains"] = domains.describe()
    # The final checkpoint holds only the last stage's trainable tensors: add the whole adapter.
    result.extra["adapters"] = exp.adapters.state_dict()
    return result
