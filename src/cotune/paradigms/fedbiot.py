"""FedBiOT (arXiv 2406.17706, KDD 2024): federated fine-tuning without the full model on devices.

The server splits the model into the *adapter* (the last ``adapter_layers`` blocks, trained by
devices: their LoRA, or the blocks in full) and the frozen lower part, and builds an *emulator*
of the lower part by uniformly dropping blocks (``emulator.py``). Devices only ever hold the
emulator + adapter. Before training and before every round the server aligns the emulator to
the full model on public data (RMS-normalised L2 between hidden states, optional KL on logits);
devices train the adapter on their data through the emulator with a proximal term to the
round's global adapter; the server averages the adapters (FedAvg). Evaluation plugs the global
adapter into the emulator ("AdapEmu", role ``emulator``) and into the full model ("AdapFu",
role ``server``, the run's product). Follows the official code (HarliWu/FedBiOT) as summarised
in ``shared/reference/methods-distributed.md`` §6.

On the Grid: a device holds the emulator it was sent (its own copy of the aligned blocks, applied
from the message; on ``local`` devices share one emulator *module* and swap their copy in), and
reports the emulator version it trained with; the server resends the emulator to a device whose
last report it did not get.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Any

import torch

from cotune.aggregation import weighted_average
from cotune.data import Batch, BatchSampler
from cotune.errors import ProtocolError
from cotune.models import segment_loss
from cotune.paradigms.base import (
    Experiment,
    ParadigmResult,
    parse_options,
    reply,
    screen_updates,
)
from cotune.paradigms.emulator import (
    Aligner,
    BiOTModels,
    emulator_shape,
    load_public,
    node_models,
)
from cotune.paradigms.federated import log_mean_losses, sample_round
from cotune.paradigms.options import FedBiOTOptions
from cotune.progress import eval_fields
from cotune.runtime import Message, Role
from cotune.runtime.ids import SERVER
from cotune.runtime.node import NodeContext
from cotune.train import RoleState, Trainer, evaluate, train_step
from cotune.train.memory import MemoryProbe, probe_ids

EMU = "emulator."  # message keys of emulator tensors


def models_for(model: Any, opts: FedBiOTOptions) -> tuple[BiOTModels, Trainer]:
    return node_models(model, opts.adapter_layers, opts.keep_layers, opts.drop_ratio,
                       opts.adapter_mode)  # fmt: skip


class BiOTDevice(Role):
    """Holds the emulator it was sent + the adapter; trains the adapter on its shard with a
    proximal term to the round's global adapter."""

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx.node_id)
        assert ctx.data is not None
        self.ctx, self.dataset = ctx, ctx.data
        self.opts = parse_options(FedBiOTOptions, ctx.cfg.paradigm.options)
        self.m, self.trainer = models_for(ctx.model, self.opts)
        init = {k: p.data.detach().clone() for k, p in self.m.adapter_params.items()}
        self.state = self.trainer.new_state(ctx.seed, init)
        self.sampler = BatchSampler(len(self.dataset), ctx.cfg.train.batch_size, ctx.seed)
        self.weights: dict[str, torch.Tensor] | None = None  # the aligned blocks it holds
        self.version = -1  # the emulator version it holds (-1: none yet)
        self.cohort = self.opts.cohort
        self.cohort_rows = self.opts.cohort_rows
        self.round = 0
        self.anchor: dict[str, torch.Tensor] = {}  # the round's global adapter
        self.results: list[Any] = []  # a cohort round's steps, as they complete
        self.train_host_s = 0.0
        m, cfg = self.m, ctx.cfg
        ctx.meter.memory("emulator", lambda: emulator_memory(m, cfg))

    def on_train(self, msg: Message) -> Message:
        self._begin(msg)
        results = []
        assert self.weights is not None
        with self.m.holding(self.weights), self.trainer.activate(self.state):
            for _ in range(self.opts.local_steps):
                results.append(self._step(self._micro(), self.round))
        return self._report(msg, results)

    def _begin(self, msg: Message) -> None:
        """The round's emulator and global adapter (the proximal term's anchor)."""
        self.round = int(msg.meta["round"])
        self._apply_emulator(msg)
        self.anchor = {k: msg.tensors[k] for k in self.trainer.params}
        with torch.no_grad():
            for k, v in self.anchor.items():
                self.state.params[k].copy_(v)
        self.state.step = int(msg.meta["schedule_step"])
        self.results = []

    def _micro(self) -> list[Batch]:
        return [self.dataset.batch(self.sampler.next_indices())
                for _ in range(self.ctx.cfg.train.grad_accum)]  # fmt: skip

    def _loss(self, batch: Batch) -> torch.Tensor:
        m = self.m
        ids, mask = batch.input_ids, batch.attention_mask
        loss = segment_loss(m.emu_forward, ids, mask, batch.labels, self.ctx.task)
        for term in self.cohort_penalty(dict(self.trainer.params), None):
            loss = loss + term
        return loss

    def _step(self, micro: list[Batch], rnd: int) -> Any:
        """One step (the emulator held, this device's state active)."""
        meter = self.ctx.meter
        r = train_step(self.trainer, self.state, self._loss, micro, counter=meter.flops,
                       key="emulator")  # fmt: skip
        meter.compute(r.flops, round=rnd, label="train")
        return r

    def _report(self, msg: Message, results: list[Any]) -> Message:
        self.state.sampler = self.sampler.state_dict()
        up = {k: v.detach() for k, v in self.state.params.items()}
        return reply(msg, "update", up, round=self.round, examples=len(self.dataset),
                     losses=[r.loss for r in results], emulator_version=self.version)  # fmt: skip

    # --- a round's devices as one cohort (paradigm.options.cohort; fed_cohort.py) ----------
    @classmethod
    def can_batch_train(cls, devices: list[BiOTDevice]) -> bool:
        from cotune.paradigms.fed_cohort import cohort_supported

        return cohort_supported(devices)

    @classmethod
    def batch_on_train(cls, devices: list[BiOTDevice], msgs: list[Message]) -> list[Message]:
        """Devices that will hold the same emulator version train as one batch through it."""
        from cotune.paradigms.fed_cohort import train_cohort

        if len({int(m.meta["emulator_version"]) for m in msgs}) != 1:
            return [d.on_train(m) for d, m in zip(devices, msgs)]
        for d, m in zip(devices, msgs):
            d._begin(m)
        steps = [d.opts.local_steps for d in devices]
        train_cohort(devices, steps, devices[0].round, "emulator")
        return [d._report(m, d.results) for d, m in zip(devices, msgs)]

    def step_on(self, micro: list[Batch], rnd: int, key: str | None) -> Any:
        assert self.weights is not None
        with self.m.holding(self.weights), self.trainer.activate(self.state):
            return self._step(micro, rnd)

    def cohort_plan(self) -> Any:
        """The emulator (holding this device's aligned blocks), with the adapter's layers."""
        from cotune.paradigms.fed_cohort import CohortPlan

        m, model = self.m, self.ctx.model
        n = m.emu_anatomy.num_layers
        weights = self.weights
        return CohortPlan(
            trainer=self.trainer, layers=model.adapters.layers, root=model.loaded.model,
            forward=m.emu_forward, body=m.emu_anatomy.segment(0, n, embed=True, head=False),
            head=m.emu_anatomy.segment(n, n, embed=False, head=True),
            scope=lambda: m.holding(weights) if weights is not None else nullcontext(),
        )  # fmt: skip

    def cohort_penalty(self, leaves: dict[str, torch.Tensor], plan: Any) -> list[torch.Tensor]:
        """The terms added to the task loss, in order, on ``leaves``: the adapter blocks'
        regularizers, then ε·||w_A − w_A^(t)||²."""
        m, mu = self.m, self.opts.prox_mu
        if plan is None:
            reg = m.adapter_regularization()
        elif not self.ctx.model.adapters.has_regularizer:  # no term can come: nothing to bind
            reg = None
        else:
            from cotune.peft.grouped import bind_state

            with bind_state(plan.layers, leaves):
                reg = m.adapter_regularization()
        terms = [] if reg is None else [reg]
        if mu > 0:
            terms.append(mu * sum((leaves[k] - self.anchor[k]).pow(2).sum() for k in leaves))
        return terms

    def _apply_emulator(self, msg: Message) -> None:
        """Take the emulator tensors the message carries: the aligned blocks become this
        device's copy; on first contact the rest (embeddings, head, frozen parts of the adapter
        blocks) goes into the node's own model (colocated nodes share the frozen base it came
        from, so there is nothing to apply)."""
        own = {k[len(EMU) :]: v for k, v in msg.tensors.items() if k.startswith(EMU)}
        if own:
            missing = sorted(set(self.m.emulator_named) - set(own))
            if missing:
                raise ProtocolError(f"{msg.describe()}: emulator lacks {missing[:3]}")
            self.weights = {k: own[k] for k in self.m.emulator_named}
            if not self.ctx.grid or not self.ctx.grid.colocated:
                named = dict(self.m.emulator.named_parameters())
                with torch.no_grad():
                    for k, v in own.items():
                        if k not in self.m.emulator_named and k in named:
                            named[k].copy_(v)
            self.version = int(msg.meta["emulator_version"])
        if self.weights is None:
            raise ProtocolError(f"{msg.describe()}: no emulator yet (first contact sends it)")

    def snapshot(self) -> dict[str, Any]:
        return {"state": self.state, "weights": self.weights, "version": self.version}

    def restore(self, st: dict[str, Any]) -> None:
        self.state, self.weights, self.version = st["state"], st["weights"], int(st["version"])
        if self.state.sampler is not None:
            self.sampler.load_state_dict(self.state.sampler)


def emulator_memory(m: BiOTModels, cfg: Any) -> Any:
    """Peak training memory of a device holding the emulator + adapter, at the largest batch."""
    ids = probe_ids(cfg, m.emulator)
    was = m.emulator.training
    m.emulator.train()
    try:
        return MemoryProbe().estimate("emulator", m.emulator, m.emu_forward, ids, ids.clone())
    finally:
        m.emulator.train(was)


def evaluate_both(
    exp: Experiment, m: BiOTModels, trainer: Trainer, glob: RoleState
) -> tuple[dict, dict]:
    """(AdapFu, AdapEmu): the global adapter in the full model and in the emulator."""
    bs = exp.cfg.eval.batch_size
    with trainer.activate(glob):
        full = evaluate(exp.forward, exp.loaded.model, exp.test_set, exp.task, bs)
        emu = evaluate(m.emu_forward, m.emulator, exp.test_set, exp.task, bs)
    return full, emu


def preflight(exp: Experiment) -> None:
    """Checks that need the model, run before the run directory is touched."""
    opts = parse_options(FedBiOTOptions, exp.cfg.paradigm.options)
    emulator_shape(exp.model, opts.adapter_layers, opts.keep_layers, opts.drop_ratio,
                   opts.adapter_mode)  # fmt: skip


def run(exp: Experiment) -> ParadigmResult:
    cfg, grid = exp.cfg, exp.grid
    opts = parse_options(FedBiOTOptions, cfg.paradigm.options)
    m, trainer = models_for(exp.model, opts)
    public = load_public(exp, opts.public_dataset, opts.public_view, opts.public_examples)
    init = {k: p.data.detach().clone() for k, p in m.adapter_params.items()}
    glob = trainer.new_state(cfg.seed, init)
    devices = grid.node_ids("device-")
    for d in devices:
        grid.start(d, BiOTDevice)
    held = dict.fromkeys(devices, -1)  # the emulator version each device last reported

    aligner = Aligner(exp, m, public, opts)
    start = 0
    if exp.resume is None:
        first = aligner.run(opts.initial_align_steps, glob, trainer, 0)
        if first:
            exp.log_record("align", 0, SERVER, round=0, steps=opts.initial_align_steps, **first)
    else:  # the aligned emulator, the global and every device's state, as checkpointed
        res = exp.resume
        glob = res["states"][SERVER]
        aligner.load_state_dict(res["extra"]["aligner"])
        for d, dev in res["extra"]["devices"].items():  # the devices that had been used
            grid.restore(d, {"state": res["states"][d], **dev})
        held = {d: int(v) for d, v in res["extra"]["held"].items()}
        start = int(res["extra"]["round"])
    rounds = opts.rounds or math.ceil(cfg.train.steps / opts.local_steps)
    spr = opts.local_steps
    last: dict[str, float] = {}
    rejected_total = 0  # uploads refused (non-finite or malformed): counted, never aggregated
    with exp.progress(rounds - start, f"fedbiot {cfg.name}", unit="round") as bar:
        for rnd in range(start + 1, rounds + 1):
            step = rnd * spr
            aligned = aligner.run(opts.align_steps, glob, trainer, rnd)
            if aligned:
                exp.log_record("align", step, SERVER, round=rnd, steps=opts.align_steps, **aligned)
            sent_before, started = len(grid.transfers), time.perf_counter()
            chosen = sample_round(grid, devices, rnd, cfg.seed,
                                  clients_per_round=opts.clients_per_round,
                                  fraction=opts.fraction, salt=0xB107)  # fmt: skip
            msgs = []
            for d in chosen:
                tensors = {k: v.detach() for k, v in glob.params.items()}
                if held[d] < aligner.version or held[d] < 0:
                    # First contact: the whole emulator; later: only what alignment changed.
                    tensors |= m.emulator_tensors(full=held[d] < 0)
                meta = {"round": rnd, "schedule_step": (rnd - 1) * spr,
                        "emulator_version": aligner.version}  # fmt: skip
                msgs.append(Message("train", SERVER, d, tensors, meta))
            # Together: devices colocated on one host may train as a cohort.
            done = grid.gather(grid.submit_many(msgs, round=rnd))
            for r in done.replies:  # what a device holds, as far as the server knows
                if r.message is not None:
                    held[r.role] = int(r.message.meta["emulator_version"])
            ref = {k: glob.params[k] for k in glob.params}
            updates, rejected = screen_updates(
                [r.message for r in done.ok if r.message is not None], lambda _, ref=ref: ref
            )
            rejected_total += len(rejected)
            if updates:
                w = [
                    float(u.meta["examples"]) if opts.weighting == "examples" else 1.0
                    for u in updates
                ]
                new = weighted_average([u.tensors for u in updates], w)
                n_params = sum(v.numel() for v in new.values())
                exp.meter.compute(3.0 * n_params * len(updates), after=done.closed_at,
                                  label="aggregate")  # fmt: skip
                with torch.no_grad():
                    for k, v in new.items():
                        glob.params[k].copy_(v)
            log_mean_losses(exp, [u.meta["losses"] for u in updates], (rnd - 1) * spr + 1, rnd)
            traffic = grid.transfers[sent_before:]
            exp.log_record(
                "round", step, SERVER, round=rnd, participants=len(chosen), reported=len(updates),
                dropped=len(chosen) - len(updates) - len(rejected), rejected=len(rejected),
                bytes_up=sum(t.nbytes for t in traffic if t.receiver == SERVER),
                bytes_down=sum(t.nbytes for t in traffic if t.sender == SERVER),
                round_host_s=time.perf_counter() - started,
            )  # fmt: skip
            if step // cfg.eval.every > (step - spr) // cfg.eval.every or rnd == rounds:
                full, emu = evaluate_both(exp, m, trainer, glob)
                exp.log_record("eval", step, SERVER, round=rnd, **full)
                exp.log_record("eval", step, "emulator", round=rnd, **emu)
                last = {**full, **{f"emulator_{k}": v for k, v in emu.items() if k != "examples"}}
            bar.update(1, **eval_fields(last))
            if not exp.checkpoint_due(step):
                continue
            snaps = grid.snapshots(devices)
            exp.maybe_checkpoint(
                step,
                {SERVER: glob, **{d: s["state"] for d, s in snaps.items()}},
                {"round": rnd, "aligner": aligner.state_dict(), "held": held,
                 "devices": {d: {"weights": s["weights"], "version": s["version"]}
                             for d, s in snaps.items()}},
            )  # fmt: skip
    # The product in the run's adapter layout: the initial adapter set with the trained part.
    product = exp.trainer.new_state(cfg.seed, {**exp.initial_params(), **{
        k: v for k, v in glob.params.items() if k in exp.trainer.params}})  # fmt: skip
    extra = {"rounds": rounds, "rejected_updates": rejected_total,
             "emulator_layers": m.emulator_layers, "kept_blocks": m.kept,
             "adapter_blocks": m.adapter_blocks, "adapter_mode": opts.adapter_mode}  # fmt: skip
    if opts.adapter_mode == "full":  # the trained blocks do not fit the PEFT adapter layout
        torch.save(
            {k: v.clone() for k, v in glob.params.items()}, exp.run_dir / "fedbiot_adapter.pt"
        )
    m.release()
    return ParadigmResult(states={SERVER: product}, final_eval=last, extra=extra)
