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
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from cotune.aggregation import weighted_average
from cotune.data import Batch, BatchSampler, EncodedDataset
from cotune.errors import CheckpointError, PeerUnavailable
from cotune.models import task_loss
from cotune.paradigms.base import (
    Experiment,
    ParadigmResult,
    mean,
    parse_options,
    reply,
    screen_updates,
)
from cotune.paradigms.emulator import (
    BiOTModels,
    align_loss,
    build_models,
    emulator_shape,
    load_public,
)
from cotune.paradigms.options import FedBiOTOptions
from cotune.runtime import Message, Role
from cotune.sim.costs import MemoryProbe
from cotune.sim.simulation import SERVER, device_id
from cotune.train import RoleState, Trainer, evaluate, train_step


class Aligner:
    """The server's emulator alignment on public data (the lower level of the bi-level problem)."""

    def __init__(
        self, exp: Experiment, m: BiOTModels, public: EncodedDataset, opts: FedBiOTOptions
    ) -> None:
        self.exp, self.m, self.public, self.opts = exp, m, public, opts
        self.optimizer = torch.optim.AdamW(m.emulator_params, lr=opts.align_lr, weight_decay=0.0)
        self.sampler = BatchSampler(len(public), exp.cfg.train.batch_size, exp.cfg.seed + 7919)
        self.probe = public.batch(list(range(min(len(public), 32))))  # fixed: before/after
        self.version = 0  # bumped whenever the emulator changes (devices must fetch it again)

    def loss(self, batch: Batch) -> torch.Tensor:
        return align_loss(self.m, batch, self.exp.task, self.opts.kl_weight)

    def run(self, steps: int, glob: RoleState, trainer: Trainer, rnd: int) -> dict[str, float]:
        if steps == 0:
            return {}
        sim = self.exp.sim
        out = {}
        with trainer.activate(glob), self.m.aligning():
            out["loss_before"] = self._probe()
            for _ in range(steps):
                batch = self.public.batch(self.sampler.next_indices())

                def fwd_bwd(b: Batch) -> float:
                    loss = self.loss(b)
                    loss.backward()
                    return float(loss.detach())

                _, flops = sim.flops.run("align", fwd_bwd, batch)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                sim.charge(SERVER, flops, round=rnd, label="align")
            out["loss_after"] = self._probe()
        self.version += 1
        return out

    @torch.no_grad()
    def _probe(self) -> float:
        return float(self.loss(self.probe))

    def state_dict(self) -> dict:
        """What a resume needs: the aligned emulator, the alignment optimizer and sampler."""
        return {
            "emulator": {k: p.detach().clone() for k, p in self.m.emulator_named.items()},
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "version": self.version,
        }

    @torch.no_grad()
    def load_state_dict(self, st: dict) -> None:
        missing = sorted(set(self.m.emulator_named) - set(st["emulator"]))
        if missing:
            raise CheckpointError(f"fedbiot checkpoint lacks emulator tensors: {missing[:3]}")
        for k, p in self.m.emulator_named.items():
            p.copy_(st["emulator"][k])
        self.optimizer.load_state_dict(st["optimizer"])
        self.sampler.load_state_dict(st["sampler"])
        self.version = int(st["version"])


class BiOTDevice(Role):
    """Holds only the emulator + adapter; trains the adapter on its shard with a proximal term."""

    def __init__(self, role_id: str, exp: Experiment, m: BiOTModels, trainer: Trainer,
                 dataset: EncodedDataset, seed: int, init: dict[str, torch.Tensor],
                 opts: FedBiOTOptions) -> None:  # fmt: skip
        super().__init__(role_id)
        self.exp, self.m, self.trainer, self.dataset, self.opts = exp, m, trainer, dataset, opts
        self.state = trainer.new_state(seed, init)
        self.sampler = BatchSampler(len(dataset), exp.cfg.train.batch_size, seed)
        self.emulator_version = -1  # the emulator version this device holds (-1: none yet)

    def on_train(self, msg: Message) -> Message:
        rnd, exp = int(msg.meta["round"]), self.exp
        self.emulator_version = int(msg.meta["emulator_version"])
        # Emulator tensors in the message equal the shared emulator already (one copy in memory),
        # so only the adapter is loaded; the emulator bytes were still counted on the link.
        anchor = {k: msg.tensors[k] for k in self.trainer.params}
        with torch.no_grad():
            for k, v in anchor.items():
                self.state.params[k].copy_(v)
        self.state.step = int(msg.meta["schedule_step"])
        params, mu = self.trainer.params, self.opts.prox_mu

        def loss_fn(batch: Batch) -> torch.Tensor:
            loss = task_loss(self.m.emu_forward(batch.input_ids, batch.attention_mask),
                             batch.labels, exp.task)  # fmt: skip
            reg = self.m.adapter_regularization()
            if reg is not None:
                loss = loss + reg
            if mu > 0:
                loss = loss + mu * sum((params[k] - anchor[k]).pow(2).sum() for k in params)
            return loss

        results = []
        accum = exp.cfg.train.grad_accum
        with self.trainer.activate(self.state):
            for _ in range(self.opts.local_steps):
                micro = [self.dataset.batch(self.sampler.next_indices()) for _ in range(accum)]
                r = train_step(self.trainer, self.state, loss_fn, micro,
                               counter=exp.sim.flops, key="emulator")  # fmt: skip
                exp.sim.charge(self.role_id, r.flops, round=rnd, label="train")
                results.append(r)
        self.state.sampler = self.sampler.state_dict()
        if not exp.sim.online(self.role_id, rnd, exp.sim.clock.free_at(self.role_id)):
            raise PeerUnavailable(f"{self.role_id} went offline in round {rnd} before uploading")
        up = {k: v.detach() for k, v in self.state.params.items()}
        return reply(msg, "update", up, round=rnd, examples=len(self.dataset),
                     losses=[r.loss for r in results])  # fmt: skip


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
    emulator_shape(exp, opts.adapter_layers, opts.keep_layers, opts.drop_ratio, opts.adapter_mode)


def run(exp: Experiment) -> ParadigmResult:
    cfg = exp.cfg
    opts = parse_options(FedBiOTOptions, cfg.paradigm.options)
    m = build_models(exp, opts.adapter_layers, opts.keep_layers, opts.drop_ratio, opts.adapter_mode)
    public = load_public(exp, opts.public_dataset, opts.public_view, opts.public_examples)
    trainer = Trainer(m.adapter_params, cfg.train, cfg.train.steps)
    init = {k: p.data.detach().clone() for k, p in m.adapter_params.items()}
    glob = trainer.new_state(cfg.seed, init)
    devices = []
    for i, idx in enumerate(exp.parts):
        dev = BiOTDevice(device_id(i), exp, m, trainer, exp.train_set.subset(idx), cfg.seed + i,
                         init, opts)  # fmt: skip
        exp.engine.register(dev)
        devices.append(dev)
    ids = torch.ones(cfg.train.batch_size, cfg.model.max_length, dtype=torch.long)
    was = m.emulator.training
    m.emulator.train()
    mem = MemoryProbe().estimate("emulator", m.emulator, m.emu_forward, ids, ids.clone())
    m.emulator.train(was)
    for dev in devices:  # devices hold the emulator + adapter, never the full model
        exp.sim.memory[dev.role_id] = mem

    aligner = Aligner(exp, m, public, opts)
    start = 0
    if exp.resume is None:
        first = aligner.run(opts.initial_align_steps, glob, trainer, 0)
        if first:
            exp.log_record("align", 0, SERVER, round=0, steps=opts.initial_align_steps, **first)
    else:  # the aligned emulator, the global and every device's adapter state, as checkpointed
        res = exp.resume
        glob = res["states"][SERVER]
        aligner.load_state_dict(res["extra"]["aligner"])
        for dev in devices:
            dev.state = res["states"][dev.role_id]
            if dev.state.sampler is not None:
                dev.sampler.load_state_dict(dev.state.sampler)
            dev.emulator_version = int(res["extra"]["emulator_versions"][dev.role_id])
        start = int(res["extra"]["round"])
    rounds = opts.rounds or math.ceil(cfg.train.steps / opts.local_steps)
    spr = opts.local_steps
    last: dict[str, float] = {}
    rejected_total = 0  # uploads refused (non-finite or malformed): counted, never aggregated
    with exp.progress(rounds - start, f"fedbiot {cfg.name}") as bar:
        for rnd in range(start + 1, rounds + 1):
            step = rnd * spr
            aligned = aligner.run(opts.align_steps, glob, trainer, rnd)
            if aligned:
                exp.log_record("align", step, SERVER, round=rnd, steps=opts.align_steps, **aligned)
            sent_before, started = len(exp.engine.transfers), time.perf_counter()
            chosen = sample(exp, opts, devices, rnd)
            updates, failed = [], []
            for dev in chosen:
                tensors = {k: v.detach() for k, v in glob.params.items()}
                if dev.emulator_version < aligner.version or dev.emulator_version < 0:
                    # First contact: the whole emulator; later: only what alignment changed.
                    tensors |= m.emulator_tensors(full=dev.emulator_version < 0)
                meta = {"round": rnd, "schedule_step": (rnd - 1) * spr,
                        "emulator_version": aligner.version}  # fmt: skip
                try:
                    updates.append(
                        exp.engine.request(Message("train", SERVER, dev.role_id, tensors, meta))
                    )
                except PeerUnavailable:
                    failed.append(dev.role_id)
            outcome = exp.sim.clock.round_end([d.role_id for d in chosen], failed=failed)
            ref = {k: glob.params[k] for k in glob.params}
            updates, rejected = screen_updates(updates, lambda _, ref=ref: ref)
            rejected_total += len(rejected)
            if updates:
                w = [
                    float(u.meta["examples"]) if opts.weighting == "examples" else 1.0
                    for u in updates
                ]
                new = weighted_average([u.tensors for u in updates], w)
                n_params = sum(v.numel() for v in new.values())
                exp.sim.charge(SERVER, 3.0 * n_params * len(updates), after=outcome.end_time,
                               label="aggregate")  # fmt: skip
                with torch.no_grad():
                    for k, v in new.items():
                        glob.params[k].copy_(v)
            losses = [u.meta["losses"] for u in updates]
            for j in range(max((len(ls) for ls in losses), default=0)):
                vals = [ls[j] for ls in losses if j < len(ls)]
                exp.log_record("train", (rnd - 1) * spr + j + 1, "mean", round=rnd, loss=mean(vals))
            traffic = exp.engine.transfers[sent_before:]
            exp.log_record(
                "round", step, SERVER, round=rnd, participants=len(chosen), reported=len(updates),
                dropped=len(chosen) - len(updates),
                bytes_up=sum(t.nbytes for t in traffic if t.receiver == SERVER),
                bytes_down=sum(t.nbytes for t in traffic if t.sender == SERVER),
                round_host_s=time.perf_counter() - started,
            )  # fmt: skip
            if step // cfg.eval.every > (step - spr) // cfg.eval.every or rnd == rounds:
                full, emu = evaluate_both(exp, m, trainer, glob)
                exp.log_record("eval", step, SERVER, round=rnd, **full)
                exp.log_record("eval", step, "emulator", round=rnd, **emu)
                last = {**full, **{f"emulator_{k}": v for k, v in emu.items() if k != "examples"}}
            bar.update(1, **{k: v for k, v in last.items() if k in ("accuracy", "perplexity")})
            exp.maybe_checkpoint(
                step,
                {SERVER: glob, **{d.role_id: d.state for d in devices}},
                {"round": rnd, "aligner": aligner.state_dict(),
                 "emulator_versions": {d.role_id: d.emulator_version for d in devices}},
            )  # fmt: skip
    # The product in the run's adapter layout: the initial adapter set with the trained part.
    product = exp.trainer.new_state(cfg.seed, {**exp.initial_params(), **{
        k: v for k, v in glob.params.items() if k in exp.trainer.params}})  # fmt: skip
    extra = {"rounds": rounds, "rejected_updates": rejected_total, "emulator_layers": m.emulator_layers, "kept_blocks": m.kept,
             "adapter_blocks": m.adapter_blocks, "adapter_mode": opts.adapter_mode}  # fmt: skip
    if opts.adapter_mode == "full":  # the trained blocks do not fit the PEFT adapter layout
        torch.save(
            {k: v.clone() for k, v in glob.params.items()}, exp.run_dir / "fedbiot_adapter.pt"
        )
    m.release()
    return ParadigmResult(states={SERVER: product}, final_eval=last, extra=extra)


def sample(
    exp: Experiment, opts: FedBiOTOptions, devices: list[BiOTDevice], rnd: int
) -> list[BiOTDevice]:
    """Devices online at the round start, sampled without replacement (seeded per round)."""
    t0 = exp.sim.clock.free_at(SERVER)
    pool = [d for d in devices if exp.sim.online(d.role_id, rnd, t0)]
    k = min(opts.clients_per_round or max(1, round(opts.fraction * len(devices))), len(pool))
    rng = np.random.default_rng([exp.cfg.seed, 0xB107, rnd])
    return (
        [pool[i] for i in sorted(rng.choice(len(pool), size=k, replace=False).tolist())]
        if k
        else []
    )
