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
"""

from __future__ import annotations

import torch

from cotune.data import BatchSampler, EncodedDataset
from cotune.errors import ConfigError, ProtocolError
from cotune.models import Activations, Segment, task_loss
from cotune.paradigms.base import Experiment, ParadigmResult, mean, parse_options
from cotune.paradigms.options import SplitFrozenOptions
from cotune.paradigms.splitting import check_cut_message, segment_memory, side_reg
from cotune.runtime import Message, Role
from cotune.sim.costs import MemoryEstimate
from cotune.sim.simulation import SERVER, device_id
from cotune.train import RoleState, Trainer

MIB = 1024**2


def choose_cuts(
    exp: Experiment, opts: SplitFrozenOptions
) -> tuple[list[int], list[MemoryEstimate]]:
    """Per-device cuts (explicit or from the profiles) whose segment fits the device's memory."""
    n, n_dev = exp.loaded.anatomy.num_layers, len(exp.parts)
    where = "paradigm.options"
    profiles = [exp.sim.profiles[device_id(i)] for i in range(n_dev)]
    if opts.cuts is not None:
        if len(opts.cuts) != n_dev:
            raise ConfigError(f"{where}.cuts: {len(opts.cuts)} cuts for {n_dev} devices")
        cuts = list(opts.cuts)
    else:
        top = n // 2 if opts.max_cut is None else opts.max_cut
        fastest = max(p.flops for p in profiles)
        cuts = [max(opts.min_cut, round(top * p.flops / fastest)) for p in profiles]
    for i, k in enumerate(cuts):
        if not 0 <= k < n:
            raise ConfigError(
                f"{where}: cut {k} of device-{i} is outside the model or leaves the server nothing "
                f"({exp.cfg.model.name_or_path} has {n} blocks: need 0 <= cut < {n})"
            )
    memo: dict[int, MemoryEstimate] = {}

    def mem(k: int) -> MemoryEstimate:
        if k not in memo:
            seg = exp.loaded.anatomy.segment(0, k, embed=True, head=False)
            memo[k] = segment_memory(exp, seg, train=False)
        return memo[k]

    for i, prof in enumerate(profiles):
        if opts.cuts is None:  # heterogeneity-aware: shed layers until the segment fits
            while cuts[i] > opts.min_cut and not mem(cuts[i]).fits(prof):
                cuts[i] -= 1
        if not mem(cuts[i]).fits(prof):
            raise ConfigError(
                f"device-{i} (profile {prof.name!r}): its frozen segment (embeddings + "
                f"{cuts[i]} blocks) needs {mem(cuts[i]).total / MIB:.2f} MiB but the profile "
                f"allows {prof.memory_bytes / MIB:.2f} MiB; lower the cut or pick a larger profile"
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
    def __init__(self, role_id: str, exp: Experiment, dataset: EncodedDataset, seed: int, cut: int):
        super().__init__(role_id)
        self.exp, self.dataset, self.cut = exp, dataset, cut
        self.segment: Segment = exp.loaded.anatomy.segment(0, cut, embed=True, head=False)
        # The adapters inside the device's blocks stay at their initial value (frozen).
        self.state = exp.trainer.new_state(seed, exp.initial_params())
        self.sampler = BatchSampler(len(dataset), exp.cfg.train.batch_size, seed)

    def send_activations(self, step: int) -> None:
        exp = self.exp
        batch = self.dataset.batch(self.sampler.next_indices())
        self.state.sampler = self.sampler.state_dict()

        @torch.no_grad()
        def forward(b):
            return self.segment(b.input_ids, b.attention_mask)

        with exp.trainer.activate(self.state):
            acts, flops = exp.sim.flops.run(f"frozen-device-fwd-{self.cut}", forward, batch)
        exp.sim.charge(self.role_id, flops, round=step, label="forward")
        tensors = self.outgoing(acts, batch.labels)
        msg = Message("activations", self.role_id, SERVER, tensors, {"step": step, "cut": self.cut})
        exp.engine.send(msg, codec=exp.cfg.engine.activation_codec)

    def outgoing(self, acts: Activations, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors of the ``activations`` message (a test may corrupt them here)."""
        return {"hidden": acts.hidden, "attention_mask": acts.attention_mask, "labels": labels}

    def on_ack(self, msg: Message) -> None:  # pipeline: false only
        return None

    def restore(self, state: RoleState) -> None:
        self.state = state
        if state.sampler is not None:
            self.sampler.load_state_dict(state.sampler)


class FrozenServer(Role):
    def __init__(self, exp: Experiment, trainer: Trainer, cuts: dict[str, int], opts, min_cut: int):
        super().__init__(SERVER)
        self.exp, self.trainer, self.cuts, self.opts = exp, trainer, cuts, opts
        n = exp.loaded.anatomy.num_layers
        self.segments = {
            k: exp.loaded.anatomy.segment(k, n, embed=False, head=True) for k in set(cuts.values())
        }
        self.state = trainer.new_state(exp.cfg.seed, exp.initial_params())
        lower = exp.loaded.anatomy.segment(0, min_cut, embed=True, head=False)
        self.reg = side_reg(exp, lambda p: not lower.owns(p))
        self.queue: list[tuple[float, int, Message]] = []
        self.skipped: list[tuple[str, str]] = []

    def on_activations(self, msg: Message) -> None:
        arrival = self.exp.sim.clock.last_arrival(SERVER, msg.sender)
        try:
            check_cut_message(self.exp, msg, labels=True)
        except ProtocolError as err:
            if self.opts.on_bad_message == "stop":
                raise
            self.skipped.append((msg.sender, str(err)))
            return None
        self.queue.append((arrival, len(self.queue), msg))
        return None

    def serve(self, step: int) -> list[float]:
        exp, sim, trainer = self.exp, self.exp.sim, self.trainer
        losses = []
        for arrival, _, msg in sorted(self.queue):
            cut = self.cuts[msg.sender]
            t = msg.tensors
            acts = Activations(t["hidden"], t["attention_mask"])  # no gradient goes back

            def fwd_bwd(
                a: Activations, labels: torch.Tensor, seg: Segment = self.segments[cut]
            ) -> float:
                loss = task_loss(seg(a), labels, exp.task)
                reg = self.reg()
                total = loss + reg if reg is not None else loss
                total.backward()
                return float(total.detach())

            with trainer.activate(self.state):
                trainer.set_lr(self.state.step)
                loss, flops = sim.flops.run(f"frozen-server-{cut}", fwd_bwd, acts, t["labels"])
                iv = sim.charge(SERVER, flops, round=step, after=arrival, label="server")
                trainer.clip_and_step(loss=loss)
                self.state.step += 1
            losses.append(loss)
            if not self.opts.pipeline:  # the device waits for its batch to be served
                exp.engine.send(Message("ack", SERVER, msg.sender, {}, {"step": step, "t": iv.end}))
        self.queue = []
        return losses


def preflight(exp: Experiment) -> None:
    """Cuts inside the model and fitting each device's memory (before any file is written)."""
    opts = parse_options(SplitFrozenOptions, exp.cfg.paradigm.options)
    server_names(exp, choose_cuts(exp, opts)[0])


def run(exp: Experiment) -> ParadigmResult:
    cfg = exp.cfg
    opts = parse_options(SplitFrozenOptions, cfg.paradigm.options)
    cuts, mems = choose_cuts(exp, opts)
    params = exp.trainer.params
    names = server_names(exp, cuts)
    trainer = Trainer({k: params[k] for k in names}, cfg.train, cfg.train.steps * len(exp.parts))
    devices = []
    for i, idx in enumerate(exp.parts):
        dev = FrozenDevice(device_id(i), exp, exp.train_set.subset(idx), cfg.seed + i, cuts[i])
        exp.engine.register(dev)
        exp.sim.memory[dev.role_id] = mems[i]
        devices.append(dev)
    server = FrozenServer(exp, trainer, {d.role_id: d.cut for d in devices}, opts, min(cuts))
    exp.engine.register(server)
    n = exp.loaded.anatomy.num_layers
    exp.sim.memory[SERVER] = segment_memory(
        exp, exp.loaded.anatomy.segment(min(cuts), n), train=True
    )
    frozen = {k: v.clone() for k, v in exp.initial_params().items()}

    def combined() -> RoleState:
        return RoleState(params={**frozen, **server.state.params})

    start = 0
    if exp.resume is not None:
        st = exp.resume["states"]
        for d in devices:
            d.restore(st[d.role_id])
        server.state = st["server-side"]
        start = int(exp.resume["step"])
    last_eval: dict[str, float] = {}
    points = set(exp.eval_points())
    with exp.progress(cfg.train.steps - start, f"splitfrozen {cfg.name}") as bar:
        for step in range(start + 1, cfg.train.steps + 1):
            for d in devices:
                d.send_activations(step)
            losses = server.serve(step)
            for dev, err in server.skipped:
                exp.log_record("skip", step, dev, error=err)
            server.skipped = []
            exp.log_record("train", step, "mean", loss=mean(losses))
            bar.update(1, loss=mean(losses))
            if step in points:
                last_eval = exp.evaluate_state(combined())
                exp.log_record("eval", step, SERVER, **last_eval)
            states = {"server-side": server.state, **{d.role_id: d.state for d in devices}}
            exp.maybe_checkpoint(step, states, {})
    if not last_eval:
        last_eval = exp.evaluate_state(combined())
    extra = {
        "cuts": cuts,
        "server_trainable_params": sum(params[k].numel() for k in names),
        "device_memory_bytes": [m.total for m in mems],
    }
    return ParadigmResult(states={SERVER: combined()}, final_eval=last_eval, extra=extra)
