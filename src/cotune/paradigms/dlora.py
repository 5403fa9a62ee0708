"""DLoRA (arXiv 2404.05182) as a parameterizable STAND-IN: the paper's method section and its
Kill-and-Revive (KR) rules were not available (``methods-distributed.md`` §3.2/3.3, [INFERRED]).

Every device fine-tunes its own, personal LoRA together with the cloud; nothing is averaged.
The cloud holds the frozen backbone and runs the blocks; the device keeps its data, the
embeddings and the head, and every *active* LoRA module with its optimizer state. Per step the
device sends the embedded batch up; at each active module the cloud sends the module's input
``x`` down and gets the LoRA branch ``Δ(x)`` back; the final hidden state comes down, the device
computes the loss, and the backward pass retraces the same path (``∂y`` down, ``∂x`` up).
KR: every ``kill_every`` steps the device kills the active modules whose ``ΔW = s·BA`` moved
least since the last check until at most ``active_fraction`` remain (a killed module is uploaded
once and merged into the cloud's backbone: applied, frozen, no traffic); every ``revive_every``
steps ``revive_count`` killed modules, drawn at random, train again.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from cotune.errors import CheckpointError
from cotune.models import Activations, task_loss
from cotune.paradigms.base import Experiment, ParadigmResult, TrainingRole, mean, reply
from cotune.paradigms.dlora_cloud import Cloud, lora_flops
from cotune.paradigms.options import DLoRAOptions, parse_options
from cotune.peft import regularization_over
from cotune.progress import eval_fields
from cotune.runtime import Message
from cotune.runtime.ids import SERVER
from cotune.runtime.node import NodeContext
from cotune.train.memory import estimate_memory


class DLoRADevice(TrainingRole):
    """Holds data, embeddings, head and its personal LoRA; runs KR over its modules."""

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx)
        self.opts = parse_options(DLoRAOptions, ctx.cfg.paradigm.options)
        anatomy = ctx.model.loaded.anatomy
        n = anatomy.num_layers
        self.embed = anatomy.segment(0, 0, embed=True, head=False)
        self.head = anatomy.segment(n, n, embed=False, head=True)
        self.layers = ctx.model.adapters.layers
        self.active = sorted(self.layers)
        self.killed: list[str] = []
        self.saved: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self.last_dw: dict[str, torch.Tensor] = {}
        self.ema: dict[str, float] = dict.fromkeys(self.layers, 0.0)
        self.target = max(1, math.ceil(self.opts.active_fraction * len(self.layers)))
        self.rng = np.random.default_rng([ctx.cfg.seed, 0xD10, self.seed])
        self.round = self.lora_flops = 0
        model, cfg, opts, target = ctx.model, ctx.cfg, self.opts, self.target
        ctx.meter.memory("dlora-device", lambda: device_memory(model, cfg, opts, target))

    def snapshot(self) -> dict[str, Any]:
        return {"state": self.state, "kr": self.kr_state()}

    def restore(self, st: dict[str, Any]) -> None:
        super().restore(st["state"])
        self.load_kr_state(st["kr"])

    def kr_state(self) -> dict[str, Any]:
        """Kill-and-Revive's state, for checkpoints (the role state holds the rest)."""
        return {
            "active": list(self.active),
            "killed": list(self.killed),
            "last_dw": {p: t.clone() for p, t in self.last_dw.items()},
            "ema": dict(self.ema),
            "rng": self.rng.bit_generator.state,
        }

    def load_kr_state(self, st: dict[str, Any]) -> None:
        unknown = sorted(set(st["active"]) - set(self.layers))
        if unknown:
            raise CheckpointError(f"dlora checkpoint names modules this model lacks: {unknown[:3]}")
        self.active, self.killed = list(st["active"]), list(st["killed"])
        self.last_dw, self.ema = dict(st["last_dw"]), dict(st["ema"])
        self.rng.bit_generator.state = st["rng"]

    def on_train(self, msg: Message) -> Message:
        self.round = int(msg.meta["round"])
        losses, fractions = [], []
        with self.ctx.model.trainer.activate(self.state):
            if not self.last_dw:
                self.last_dw = self._dw(self.active)
            for _ in range(int(msg.meta["steps"])):
                losses.append(self._step())
                fractions.append(len(self.active) / len(self.layers))
                self._kill_and_revive()
        self.state.sampler = self.sampler.state_dict()
        return reply(msg, "train_result", losses=losses, active=fractions)

    def _step(self) -> float:
        meter, trainer, grid = self.ctx.meter, self.ctx.model.trainer, self.ctx.grid
        assert grid is not None and self.dataset is not None and self.sampler is not None
        task = self.ctx.task
        trainer.set_lr(self.state.step)
        accum = self.ctx.cfg.train.grad_accum
        total = 0.0
        for _ in range(accum):
            b = self.dataset.batch(self.sampler.next_indices())
            self.lora_flops = 0  # this micro-batch's LoRA branches (counted as they run)
            meta = {"round": self.round, "active": list(self.active)}
            if self.opts.embed == "cloud":
                f_embed, tensors = 0, {"input_ids": b.input_ids, "mask": b.attention_mask}
            else:
                h0, f_embed = meter.flops.run(
                    "dlora-embed", self.embed, b.input_ids, b.attention_mask
                )
                tensors = {"hidden": h0.hidden.detach(), "mask": b.attention_mask}
            down = grid.request(Message("forward", self.role_id, SERVER, tensors, meta))
            hidden = down.tensors["hidden"].requires_grad_(True)

            def head_loss(
                h: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
            ) -> torch.Tensor:
                loss = task_loss(self.head(Activations(h, mask)), labels, task)
                reg = self._regularizer()
                loss = (loss + reg if reg is not None else loss) / accum
                loss.backward()
                return loss.detach()

            loss, f_head = meter.flops.run(
                "dlora-head", head_loss, hidden, b.attention_mask, b.labels
            )
            grid.request(Message("backward", self.role_id, SERVER, {"grad": hidden.grad}, meta))
            meter.compute(f_embed + f_head + self.lora_flops, round=self.round, label="train")
            total += float(loss) * accum
        if self.opts.score == "ema_grad_weight":
            self._update_scores()
        trainer.clip_and_step()
        self.state.step += 1
        return total / accum

    def _regularizer(self) -> torch.Tensor | None:
        """The method's regularizer over the modules this device trains (KaSA's; a killed
        module is frozen in the cloud, so its term would only move what no longer trains)."""
        if not self.ctx.model.adapters.has_regularizer:
            return None
        return regularization_over(self.layers[p] for p in self.active)

    def on_lora_fwd(self, msg: Message) -> Message:
        path = msg.meta["layer"]
        x = msg.tensors["x"].requires_grad_(True)
        y = self.layers[path].delta(x)  # with grad: a handler runs as on its own node
        self.lora_flops += 3 * lora_flops(self.layers[path], x)  # forward now, backward later
        self.saved.append((path, x, y))
        return reply(msg, "lora_out", {"y": y.detach()}, round=self.round, layer=path)

    def on_lora_bwd(self, msg: Message) -> Message:
        path, x, y = self.saved.pop()  # backward visits the modules in reverse order
        if path != msg.meta["layer"]:
            raise RuntimeError(f"lora_bwd for {msg.meta['layer']} but {path} is next")
        y.backward(msg.tensors["g"])
        up = {"gx": x.grad} if msg.meta.get("need_gx") else {}  # block 0's input needs none
        return reply(msg, "lora_grad", up, round=self.round, layer=path)

    @torch.no_grad()
    def _update_scores(self) -> None:
        """EMA of ||grad|| x ||dW|| per active module: large when a module both moves and matters."""
        beta = self.opts.score_beta
        for p in self.active:
            layer = self.layers[p]
            grads = [q.grad for _, q in layer.adapter_named_parameters() if q.grad is not None]
            g = float(torch.sqrt(sum((t.float() ** 2).sum() for t in grads))) if grads else 0.0
            w = float(layer.delta_weight().norm())
            self.ema[p] = beta * self.ema[p] + (1.0 - beta) * g * w

    def _dw(self, paths: list[str]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {p: self.layers[p].delta_weight().detach().clone() for p in paths}

    def _kill_and_revive(self) -> None:
        step = self.state.step
        if step % self.opts.kill_every == 0 and len(self.active) > self.target:
            now = self._dw(self.active)
            if self.opts.score == "delta":
                score = {p: float((now[p] - self.last_dw[p]).norm()) for p in self.active}
            else:
                score = {p: self.ema[p] for p in self.active}
            ranked = sorted(self.active, key=lambda p: (score[p], p))
            kill = ranked[: len(self.active) - self.target]
            # Uploaded once so the cloud can merge it into its copy of the backbone.
            tensors = {f"{p}.{k}": v.detach() for p in kill
                       for k, v in self.layers[p].adapter_tensors().items()}  # fmt: skip
            assert self.ctx.grid is not None
            self.ctx.grid.request(Message("kill", self.role_id, SERVER, tensors,
                                          {"round": self.round}))  # fmt: skip
            self.active = sorted(set(self.active) - set(kill))
            self.killed = self.killed + sorted(kill)  # kept in kill order for "stale" revival
            self.last_dw = {p: now[p] for p in self.active}
        if step % self.opts.revive_every == 0 and self.killed and self.opts.revive_count:
            k = min(self.opts.revive_count, len(self.killed))
            if self.opts.revive == "stale":
                back = self.killed[:k]
            else:
                picks = sorted(self.rng.choice(len(self.killed), k, replace=False))
                back = [self.killed[i] for i in picks]
            # A revived module trains on from the A, B it kept while killed.
            self.active = sorted(set(self.active) | set(back))
            self.killed = [p for p in self.killed if p not in back]
            self.last_dw |= self._dw(back)


def run(exp: Experiment) -> ParadigmResult:
    cfg, grid = exp.cfg, exp.grid
    cloud = Cloud(grid.context(SERVER))
    grid.host(cloud)
    devices = grid.node_ids("device-")
    for d in devices:
        grid.start(d, DLoRADevice)

    per_device: dict[str, dict[str, float]] = {}
    summary: dict[str, float] = {}
    step = 0
    if exp.resume is not None:
        for d in devices:
            grid.restore(d, {"state": exp.resume["states"][d], "kr": exp.resume["extra"]["kr"][d]})
        cloud.merged = dict(exp.resume["extra"]["cloud"])
        step = int(exp.resume["step"])
    with exp.progress(cfg.train.steps - step, f"dlora {cfg.name}") as bar:
        for rnd, point in enumerate(exp.eval_points(), start=1):
            if point <= step:
                continue
            chunk, sent_before, started = point - step, len(grid.transfers), time.perf_counter()
            replies = grid.request_many(
                [Message("train", SERVER, d, {}, {"steps": chunk, "round": rnd}) for d in devices]
            )
            for j in range(chunk):
                exp.log_record("train", step + j + 1, "mean", round=rnd,
                               loss=mean([r.meta["losses"][j] for r in replies]),
                               active_fraction=mean([r.meta["active"][j] for r in replies]))  # fmt: skip
            traffic = grid.transfers[sent_before:]
            exp.log_record(
                "round", point, SERVER, round=rnd, participants=len(devices),
                reported=len(devices), dropped=0,
                bytes_up=sum(t.nbytes for t in traffic if t.receiver == SERVER),
                bytes_down=sum(t.nbytes for t in traffic if t.sender == SERVER),
                round_host_s=time.perf_counter() - started,
            )  # fmt: skip
            step = point
            snaps = {d: grid.snapshot(d) for d in devices}
            per_device, summary = exp.evaluate_states(
                {d: s["state"] for d, s in snaps.items()}, step, rnd
            )
            bar.update(chunk, **eval_fields(summary))  # the devices' mean
            exp.maybe_checkpoint(
                step, {d: s["state"] for d, s in snaps.items()},
                {"kr": {d: s["kr"] for d, s in snaps.items()}, "cloud": cloud.merged},
            )  # fmt: skip
    snaps = {d: grid.snapshot(d) for d in devices}
    return ParadigmResult(
        states={d: s["state"] for d, s in snaps.items()},
        final_eval=summary,
        extra={
            "per_device_eval": per_device,
            "active_modules": {d: s["kr"]["active"] for d, s in snaps.items()},
        },  # fmt: skip
    )


def device_memory(model: Any, cfg: Any, opts: DLoRAOptions, active: int) -> Any:
    """A device holds embeddings, head, its LoRA + AdamW state, and per active module the
    saved input ``x`` and rank-r intermediate (an analytic estimate at the largest batch)."""
    anatomy = model.loaded.anatomy
    paths = anatomy.output_paths()
    if opts.embed == "device":
        paths = anatomy.input_paths() + paths
    mods = [model.loaded.model.get_submodule(p) for p in paths]
    seen: set[int] = set()
    frozen = 0
    for mod in mods:
        for p in mod.parameters():
            if id(p) not in seen and not p.requires_grad:
                seen.add(id(p))
                frozen += p.numel() * p.element_size()
    trainable = sum(p.numel() * p.element_size() for p in model.trainer.params.values())
    tokens = cfg.train.batch_size * cfg.model.max_length
    per_module = [tokens * (lay.lora_A.weight.shape[1] + lay.lora_A.weight.shape[0]) * 4
                  for lay in model.adapters.layers.values()]  # fmt: skip
    act = int(sum(sorted(per_module)[-active:])) if active else 0
    return estimate_memory(frozen_bytes=frozen, trainable_bytes=trainable, activation_bytes=act)
