"""SplitFrozen: devices run frozen bottom layers forward only; the server fine-tunes the rest.

Device ``i`` holds the embeddings and blocks [0, k_i), frozen (its adapters stay at their
initial value, an identity for LoRA), and runs them under ``no_grad``: it uploads the cut
activations and labels, never receives a gradient, and its weights never change. The server
holds adapters on every block from ``min_i k_i`` up (plus the head) and trains them, one step
per received batch in arrival order ("server-centric": one adapter over all devices' data).

Cut points are heterogeneity-aware: ``k_i = round(max_cut · flops_i / max_j flops_j)`` (slower
devices get fewer layers), at least ``min_cut``, then lowered until the device's memory estimate
fits its profile; ``cuts`` sets them by hand. Pipelining: a device starts its next forward as soon
as its upload is out (``pipeline: false`` waits for a one-line ``ack`` from the server instead).
Only the abstract of the paper was available: see docs/methods.md (SplitFrozen).

On the Grid: the server chooses the cuts from what the devices declared (speed, memory) and tells
each device its cut (``configure``); every step is a local event on each device (its own loop:
next batch, forward, upload); the server serves the uploads in the order they arrived.
"""

from __future__ import annotations

from typing import Any

import torch

from cotune.data import BatchSampler
from cotune.errors import ConfigError, ProtocolError
from cotune.models import Activations, Segment, segment_loss
from cotune.models.packing import padding_free, token_dims
from cotune.paradigms.base import Experiment, ParadigmResult, mean, parse_options
from cotune.paradigms.options import SplitFrozenOptions
from cotune.paradigms.split_cut import (
    activation_dtype,
    admit_upload,
    check_cut,
    segment_memory,
    side_reg,
)
from cotune.runtime import Message, Role
from cotune.runtime.ids import SERVER
from cotune.runtime.node import NodeContext
from cotune.train import RoleState, Trainer
from cotune.train.memory import MemoryEstimate

MIB = 1024**2


def choose_cuts(
    exp: Experiment, opts: SplitFrozenOptions
) -> tuple[list[int], list[MemoryEstimate]]:
    """Per-device cuts (explicit or from the devices' declared speed) whose segment fits the
    memory each device declared."""
    n = exp.loaded.anatomy.num_layers
    where = "paradigm.options"
    devices = exp.grid.node_ids("device-")
    info = [exp.grid.node_info(d) for d in devices]
    if opts.cuts is not None:
        if len(opts.cuts) != len(devices):
            raise ConfigError(f"{where}.cuts: {len(opts.cuts)} cuts for {len(devices)} devices")
        cuts = list(opts.cuts)
    else:
        top = n // 2 if opts.max_cut is None else opts.max_cut
        fastest = max(i["flops"] for i in info)
        cuts = [max(opts.min_cut, round(top * i["flops"] / fastest)) for i in info]
    for d, k in zip(devices, cuts):
        if not 0 <= k < n:
            raise ConfigError(
                f"{where}: cut {k} of {d} is outside the model or leaves the server nothing "
                f"({exp.cfg.model.name_or_path} has {n} blocks: need 0 <= cut < {n})"
            )
    memo: dict[int, MemoryEstimate] = {}

    def mem(k: int) -> MemoryEstimate:
        if k not in memo:
            seg = exp.loaded.anatomy.segment(0, k, embed=True, head=False)
            memo[k] = segment_memory(exp.loaded, exp.cfg, seg, train=False)
        return memo[k]

    for i, (d, node) in enumerate(zip(devices, info)):
        allowed = node["memory_bytes"]
        if opts.cuts is None:  # heterogeneity-aware: shed layers until the segment fits
            while cuts[i] > opts.min_cut and mem(cuts[i]).total > allowed:
                cuts[i] -= 1
        if mem(cuts[i]).total > allowed:
            raise ConfigError(
                f"{d} (profile {node.get('profile', '?')!r}): its frozen segment (embeddings + "
                f"{cuts[i]} blocks) needs {mem(cuts[i]).total / MIB:.2f} MiB but the profile "
                f"allows {allowed / MIB:.2f} MiB; lower the cut or pick a larger profile"
            )
    return cuts, [mem(k) for k in cuts]


def server_names(exp: Experiment, cuts: list[int]) -> list[str]:
    """Adapter tensors above every device's cut: what the server trains (ConfigError if none)."""
    lower = exp.loaded.anatomy.segment(0, min(cuts), embed=True, head=False)
    names = [k for k in exp.trainer.params if not lower.owns(k)]
    if not names:
        raise ConfigError(
            "paradigm.options: the server side owns no adapter parameter above the cuts"
        )
    return names


class FrozenDevice(Role):
    """Runs its frozen bottom segment forward only and uploads the cut activations + labels."""

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx.node_id)
        assert ctx.data is not None
        self.ctx, self.dataset = ctx, ctx.data
        self.sampler = BatchSampler(len(self.dataset), ctx.cfg.train.batch_size, ctx.seed)
        self.cut: int | None = None
        self.segment: Segment | None = None
        self.state: RoleState | None = None  # made once the cut (so the model it holds) is known

    def on_configure(self, msg: Message) -> None:
        """The cut the server chose for this device."""
        self.set_cut(int(msg.meta["cut"]))

    def set_cut(self, cut: int) -> None:
        # The device loads only the embeddings and its frozen blocks.
        model = self.ctx.segment_model(0, cut, embed=True, head=False)
        cfg = self.ctx.cfg
        self.cut = cut
        if self.state is None:
            # The adapters inside the device's blocks stay at their initial value (frozen).
            self.state = model.trainer.new_state(self.ctx.seed, model.initial_params())
        self.segment = model.loaded.anatomy.segment(0, self.cut, embed=True, head=False)
        seg = self.segment
        self.ctx.meter.memory(
            f"frozen-{self.cut}", lambda: segment_memory(model.loaded, cfg, seg, train=False)
        )

    def tick_step(self, meta: dict[str, Any]) -> None:
        """This device's next step: ``train.grad_accum`` batches, each forwarded and uploaded
        on its own (a frozen forward keeps no graph, so nothing waits for the server)."""
        if self.segment is None or self.state is None:
            raise ProtocolError(f"{self.role_id} has no cut yet (no configure message)")
        for _ in range(self.ctx.cfg.train.grad_accum):
            self._upload(int(meta["step"]))

    def _upload(self, step: int) -> None:
        assert self.segment is not None and self.state is not None
        meter, trainer = self.ctx.meter, self.ctx.model.trainer
        batch = self.dataset.batch(self.sampler.next_indices())
        self.state.sampler = self.sampler.state_dict()
        seg = self.segment

        @torch.no_grad()
        def forward(b):
            return seg(b.input_ids, b.attention_mask)

        packed = self.ctx.cfg.train.padding_free  # counted by real tokens: dims say how many
        dims = token_dims(batch.attention_mask, True) if packed else None
        with trainer.activate(self.state), padding_free(packed):
            acts, flops = meter.flops.run(
                f"frozen-device-fwd-{self.cut}", forward, batch, dims=dims
            )
        meter.compute(flops, round=step, label="forward")
        tensors = self.outgoing(acts, batch.labels)
        msg = Message("activations", self.role_id, SERVER, tensors, {"step": step, "cut": self.cut})
        assert self.ctx.grid is not None
        self.ctx.grid.send(msg, codec=self.ctx.cfg.engine.activation_codec)

    def outgoing(self, acts: Activations, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors of the ``activations`` message (a test may corrupt them here)."""
        return {"hidden": acts.hidden, "attention_mask": acts.attention_mask, "labels": labels}

    def on_ack(self, msg: Message) -> None:  # pipeline: false only
        return None

    def snapshot(self) -> RoleState:
        assert self.state is not None, f"{self.role_id} was not configured"
        return self.state

    def restore(self, st: dict[str, Any]) -> None:
        """A checkpointed state and the cut this device was configured with."""
        self.set_cut(int(st["cut"]))
        self.state = st["state"]
        if self.state.sampler is not None:
            self.sampler.load_state_dict(self.state.sampler)


class FrozenServer(Role):
    """The server's own role (on the driver's node): queues uploads, trains on them in order."""

    def __init__(
        self, ctx: NodeContext, trainer: Trainer, cuts: dict[str, int], opts, min_cut: int
    ) -> None:
        super().__init__(ctx.node_id)
        self.ctx, self.trainer, self.cuts, self.opts = ctx, trainer, cuts, opts
        anatomy = ctx.model.loaded.anatomy
        n = anatomy.num_layers
        self.segments = {
            k: anatomy.segment(k, n, embed=False, head=True) for k in set(cuts.values())
        }
        self.state = trainer.new_state(ctx.seed, ctx.model.initial_params())
        lower = anatomy.segment(0, min_cut, embed=True, head=False)
        self.reg = side_reg(ctx.model.adapters, lambda p: not lower.owns(p))
        self.queue: list[tuple[float, int, Message]] = []
        self.skipped: list[tuple[str, str]] = []
        self.dtype = activation_dtype(ctx.cfg)

    def on_activations(self, msg: Message) -> None:
        admit_upload(msg, self._check, self.queue, self.skipped, self.opts.on_bad_message)

    def _check(self, msg: Message) -> None:
        check_cut(msg, hidden_size=self.ctx.model.loaded.anatomy.hidden_size, dtype=self.dtype,
                  task=self.ctx.task, labels=True)  # fmt: skip

    def serve(self, step: int) -> list[float]:
        """Train on the step's uploads in the order they arrived: one update per
        ``train.grad_accum`` uploads (their mean loss; a last, shorter group when some were
        skipped), the devices acknowledged once their upload's update is done."""
        grid = self.ctx.grid
        assert grid is not None
        order, accum = sorted(self.queue), self.ctx.cfg.train.grad_accum
        losses = []
        for at in range(0, len(order), accum):
            group = order[at : at + accum]
            losses.append(self._update(group, step))
            if not self.opts.pipeline:  # the device waits for its batch to be served
                for _, _, msg in group:
                    grid.send(Message("ack", SERVER, msg.sender, {}, {"step": step}))
        self.queue = []
        return losses

    def _update(self, group: list[tuple[float, int, Message]], step: int) -> float:
        """One optimizer step on ``group``'s uploads (gradients accumulated); its mean loss."""
        trainer, meter, task = self.trainer, self.ctx.meter, self.ctx.task
        packed, n, total = self.ctx.cfg.train.padding_free, len(group), 0.0
        with trainer.activate(self.state):
            trainer.set_lr(self.state.step)
            for arrival, _, msg in group:
                cut = self.cuts[msg.sender]
                t = msg.tensors
                acts = Activations(t["hidden"], t["attention_mask"])  # no gradient goes back

                def fwd_bwd(
                    a: Activations, labels: torch.Tensor, seg: Segment = self.segments[cut]
                ) -> float:
                    loss = segment_loss(seg, a, None, labels, task)
                    reg = self.reg()
                    loss = loss + reg if reg is not None else loss
                    trainer.backward(loss / n)
                    return float(loss.detach())

                dims = token_dims(acts.attention_mask, True) if packed else None
                with padding_free(packed):
                    loss, flops = meter.flops.run(
                        f"frozen-server-{cut}", fwd_bwd, acts, t["labels"], dims=dims
                    )
                meter.compute(flops, round=step, after=arrival, label="server")
                total += loss
            with self.in_role():
                trainer.clip_and_step(loss=total / n)
            self.state.step += 1
        return total / n


def preflight(exp: Experiment) -> None:
    """Cuts inside the model and fitting each device's memory (before any file is written)."""
    opts = parse_options(SplitFrozenOptions, exp.cfg.paradigm.options)
    server_names(exp, choose_cuts(exp, opts)[0])


def run(exp: Experiment) -> ParadigmResult:
    cfg, grid = exp.cfg, exp.grid
    opts = parse_options(SplitFrozenOptions, cfg.paradigm.options)
    cuts, mems = choose_cuts(exp, opts)
    params = exp.trainer.params
    names = server_names(exp, cuts)
    devices = grid.node_ids("device-")
    for d in devices:
        grid.start(d, FrozenDevice)
    # The server's role and its trainer live on the server node's own model.
    ctx = grid.context(SERVER)
    own = ctx.model.trainer.params
    trainer = Trainer({k: own[k] for k in names}, cfg.train, cfg.train.steps * len(devices))
    server = FrozenServer(ctx, trainer, dict(zip(devices, cuts)), opts, min(cuts))
    grid.host(server)
    if exp.resume is None:  # on resume the devices get their cut back with their state
        for d, k in zip(devices, cuts):
            grid.send(Message("configure", SERVER, d, {}, {"cut": k}))
    n = exp.loaded.anatomy.num_layers
    server_seg = exp.loaded.anatomy.segment(min(cuts), n)
    exp.meter.memory(
        "frozen-server", lambda: segment_memory(exp.loaded, cfg, server_seg, train=True)
    )
    frozen = {k: v.clone() for k, v in exp.initial_params().items()}

    def combined() -> RoleState:
        return RoleState(params={**frozen, **server.state.params})

    start = 0
    if exp.resume is not None:
        st = exp.resume["states"]
        for d, k in zip(devices, cuts):
            grid.restore(d, {"state": st[d], "cut": k})
        server.state = st["server-side"]
        start = int(exp.resume["step"])
    last_eval: dict[str, float] = {}
    points = set(exp.eval_points())
    with exp.progress(cfg.train.steps - start, f"splitfrozen {cfg.name}") as bar:
        for step in range(start + 1, cfg.train.steps + 1):
            grid.tick(devices, "step", {"step": step})
            losses = server.serve(step)
            for dev, err in server.skipped:
                exp.log_record("skip", step, dev, error=err)
            server.skipped = []
            exp.log_record("train", step, "mean", loss=mean(losses))
            bar.update(1, train_loss=mean(losses))
            if step in points:
                last_eval = exp.evaluate_state(combined())
                exp.log_record("eval", step, SERVER, **last_eval)
            states = {"server-side": server.state, **{d: grid.snapshot(d) for d in devices}}
            exp.maybe_checkpoint(step, states, {})
    if not last_eval:
        last_eval = exp.evaluate_state(combined())
    extra = {
        "cuts": cuts,
        "server_trainable_params": sum(params[k].numel() for k in names),
        "device_memory_bytes": [m.total for m in mems],
    }
    return ParadigmResult(states={SERVER: combined()}, final_eval=last_eval, extra=extra)
