"""HAT's on-device drafter, distilled federatedly: a counted training run (issue 16).

HAT serves a causal LM U-shaped: the device keeps the first ``n_in`` and the last ``n_out``
blocks (with the embeddings, the final norm and the head), the cloud runs the middle. The
device drafts tokens with a small adapter standing in for the middle (``MiddleAdapter``). This
paradigm trains that adapter where its data is, with the costs counted like any other run:

- every step each device embeds a batch of its own text through its input blocks and uploads
  the hidden states (``embed`` → ``hidden``), exactly what it uploads when serving;
- the cloud runs its middle blocks on them (no gradient, nothing trains there) and sends the
  middle's output back (``middle``);
- the device trains its drafter adapter to reproduce that output (MSE) and, through its own
  output blocks, the full model's next-token distribution (KL; ``drafter.py``'s loss);
- every ``local_steps`` steps the devices report their adapters and the server averages them
  by example count (FedAvg) and sends the average back (``load``).

The model stays frozen everywhere; raw tokens and the next-token distribution never leave the
device. The product is ``RUN_DIR/drafter/cut-<n_in>-<n_out>/`` (the format ``cotune infer``
reads: ``cotune infer RUN_DIR`` generates with this run's model and drafter), and the run's
adapter is the model's own (saved so the run directory is a complete serving package).
Evaluation reports the drafter's greedy acceptance rate: the share of held-out positions where
the drafter's top token equals the full model's (the per-token acceptance probability of greedy
speculative decoding).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from cotune.aggregation import weighted_average
from cotune.data import BatchSampler, EncodedDataset
from cotune.errors import DivergenceError, ProtocolError
from cotune.infer.drafter import DRAFTER_DIR, distil_loss, frozen, save_drafter
from cotune.infer.speculative import MiddleAdapter
from cotune.infer.split import UCut
from cotune.models import Activations
from cotune.paradigms.base import (
    Experiment,
    ParadigmResult,
    mean,
    parse_options,
    reply,
    screen_updates,
)
from cotune.paradigms.options import HatDrafterOptions
from cotune.runtime import Message, Role
from cotune.runtime.ids import SERVER
from cotune.runtime.node import NodeContext
from cotune.runtime.validate import check_activation, meta_number
from cotune.train import RoleState, lr_factor

log = logging.getLogger(__name__)


class DrafterDevice(Role):
    """A device: its input and output blocks (frozen), its drafter adapter and optimizer."""

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx.node_id)
        if ctx.data is None:
            raise RuntimeError(f"{ctx.node_id} holds no data")
        self.ctx, self.data = ctx, ctx.data
        self.opts = parse_options(HatDrafterOptions, ctx.cfg.paradigm.options)
        self.model = ctx.model
        anatomy = self.model.loaded.anatomy
        L = anatomy.num_layers
        self.inputs = anatomy.segment(0, self.opts.n_in)
        self.outputs = anatomy.segment(L - self.opts.n_out, L)
        train = ctx.cfg.train
        self.adapter = MiddleAdapter(anatomy.hidden_size, self.opts.width).to(ctx.device)
        self.optimizer = torch.optim.AdamW(
            self.adapter.parameters(), lr=train.lr, betas=train.betas,
            weight_decay=train.weight_decay,
        )  # fmt: skip
        self.sampler = BatchSampler(len(self.data), train.batch_size, ctx.seed)
        self.step = 0
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (hidden, mask) sent up
        self.finite = True  # every micro-batch of this step so far had a finite loss

    def on_load(self, msg: Message) -> Message:
        self.adapter.load_state_dict({k: v.to(self.ctx.device) for k, v in msg.tensors.items()})
        return reply(msg, "loaded")

    def on_embed(self, msg: Message) -> Message:
        """A batch of its own text through its input blocks; the hidden states go up."""
        batch = self.data.batch(self.sampler.next_indices())
        ids = batch.input_ids.to(self.ctx.device)
        mask = batch.attention_mask.to(self.ctx.device)
        meter = self.ctx.meter
        with torch.no_grad():
            acts, flops = meter.flops.run(
                "hat-inputs", self.inputs, ids, mask, dims=tuple(ids.shape)
            )
        meter.compute(flops, round=int(msg.meta["round"]), label="input blocks")
        self.pending = (acts.hidden, mask)
        return reply(msg, "hidden", {"hidden": acts.hidden, "attention_mask": mask},
                     step=msg.meta["step"])  # fmt: skip

    def on_middle(self, msg: Message) -> Message:
        """One micro-batch towards the middle's output the cloud sent back: its gradient is
        accumulated, and the drafter steps after the step's last one (``train.grad_accum``)."""
        if self.pending is None:
            raise ProtocolError(f"{self.role_id}: 'middle' without a batch embedded first")
        hidden, mask = self.pending
        self.pending = None
        target = check_activation(
            f"{msg.describe()}: tensor 'hidden'", msg.tensors["hidden"],
            shape=tuple(hidden.shape), dtype=hidden.dtype,
        ).to(self.ctx.device)  # fmt: skip
        train, meter = self.ctx.cfg.train, self.ctx.meter
        micro, micros = int(msg.meta.get("micro", 0)), train.grad_accum
        if not 0 <= micro < micros:
            raise ProtocolError(f"{msg.describe()}: micro-batch {micro} of {micros}")
        lr = train.lr * lr_factor(self.step, train.steps, train.warmup_steps, train.schedule)
        if micro == 0:  # a new step (a step skipped part-way left gradients: gone too)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad()
            self.finite = True

        def fwd_bwd(h: torch.Tensor, t: torch.Tensor, m: torch.Tensor) -> float:
            o = self.opts
            loss = distil_loss(self.adapter(h), t, m, self.outputs,
                               mse_weight=o.mse_weight, kl_weight=o.kl_weight)  # fmt: skip
            (loss / micros).backward()
            return float(loss.detach())

        with frozen(self.model.loaded.model):
            loss, flops = meter.flops.run(
                "hat-distil", fwd_bwd, hidden, target, mask, dims=tuple(mask.shape)
            )
        meter.compute(flops, round=int(msg.meta["round"]), label="drafter")
        self.finite = self.finite and math.isfinite(loss)
        if micro < micros - 1:
            return reply(msg, "distilled", loss=loss, lr=lr, step=self.step)
        if not self.finite:
            if train.on_nonfinite == "stop":
                raise DivergenceError(f"drafter loss is {loss} at step {self.step + 1}",
                                      role=self.role_id, step=self.step + 1)  # fmt: skip
        else:
            if train.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.adapter.parameters(), train.max_grad_norm)
            self.optimizer.step()
        self.step += 1
        return reply(msg, "distilled", loss=loss, lr=lr, step=self.step)

    def on_report(self, msg: Message) -> Message:
        tensors = {k: v.detach().clone() for k, v in self.adapter.state_dict().items()}
        return reply(msg, "drafter", tensors, examples=len(self.data))

    def snapshot(self) -> RoleState:
        return RoleState(
            params={k: v.detach().clone() for k, v in self.adapter.state_dict().items()},
            optim={"adamw": self.optimizer.state_dict()},
            step=self.step,
            sampler=self.sampler.state_dict(),
        )

    def restore(self, state: RoleState | None) -> None:
        if state is None:
            return
        self.adapter.load_state_dict(state.params)
        self.optimizer.load_state_dict(state.optim["adamw"])
        self.step = state.step
        if state.sampler is not None:
            self.sampler.load_state_dict(state.sampler)


def checked_upload(m: Message, hidden_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A device's upload as the cloud accepts it: finite ``[B, T, D]`` hidden states and a
    ``[B, T]`` 0/1 attention mask; else ``ProtocolError`` naming the sender and the tensor."""
    for name in ("hidden", "attention_mask"):
        if name not in m.tensors:
            raise ProtocolError(f"{m.describe()}: no tensor {name!r}")
    hidden = check_activation(f"{m.describe()}: tensor 'hidden'", m.tensors["hidden"],
                              shape=(None, None, hidden_size))  # fmt: skip
    mask = m.tensors["attention_mask"]
    if tuple(mask.shape) != tuple(hidden.shape[:2]) or bool(((mask != 0) & (mask != 1)).any()):
        raise ProtocolError(
            f"{m.describe()}: tensor 'attention_mask' must be 0/1 of shape "
            f"{list(hidden.shape[:2])}, got {list(mask.shape)}"
        )
    return hidden, mask


@torch.no_grad()
def drafter_metrics(
    anatomy: Any, cut: UCut, adapter: MiddleAdapter, test: EncodedDataset, batch_size: int,
    opts: HatDrafterOptions,
) -> dict[str, float]:  # fmt: skip
    """Measurement on the held-out text: the greedy acceptance rate (the drafter's top token
    equals the full model's) and the distillation loss, over real positions."""
    L = anatomy.num_layers
    inputs, middle = anatomy.segment(0, cut.n_in), anatomy.segment(cut.n_in, L - cut.n_out)
    outputs = anatomy.segment(L - cut.n_out, L)
    agree = total = 0.0
    loss_sum = 0.0
    for start in range(0, len(test), batch_size):
        b = test.batch(list(range(start, min(len(test), start + batch_size))))
        dev = next(adapter.parameters()).device
        ids, mask = b.input_ids.to(dev), b.attention_mask.to(dev)
        h = inputs(ids, mask)
        mid = middle(h).hidden
        guess = adapter(h.hidden)
        full = outputs(Activations(mid, mask)).argmax(-1)
        draft = outputs(Activations(guess, mask)).argmax(-1)
        real = mask.bool()
        agree += float((full == draft)[real].sum())
        n = float(real.sum())
        total += n
        loss = distil_loss(guess, mid, mask, outputs,
                           mse_weight=opts.mse_weight, kl_weight=opts.kl_weight)  # fmt: skip
        loss_sum += float(loss) * n
    return {
        "drafter_acceptance": agree / max(total, 1.0),
        "drafter_loss": loss_sum / max(total, 1.0),
    }


def preflight(exp: Experiment) -> None:
    """The cut must leave the cloud at least one block (before any file is written)."""
    opts = parse_options(HatDrafterOptions, exp.cfg.paradigm.options)
    UCut(opts.n_in, opts.n_out).check(exp.model.loaded.anatomy.num_layers)


def run(exp: Experiment) -> ParadigmResult:
    cfg, grid = exp.cfg, exp.grid
    opts = parse_options(HatDrafterOptions, cfg.paradigm.options)
    cut = UCut(opts.n_in, opts.n_out)
    devices = grid.node_ids("device-")
    for d in devices:
        grid.start(d, DrafterDevice)
    ctx = grid.context(SERVER)
    anatomy = ctx.model.loaded.anatomy
    L = anatomy.num_layers
    cut.check(L)
    middle = anatomy.segment(cut.n_in, L - cut.n_out)
    # The model's own adapter, untouched: what the drafter was distilled for, saved with it.
    model_state = ctx.model.trainer.new_state(cfg.seed, ctx.model.initial_params())
    with torch.random.fork_rng(devices=[]):  # the drafter's init, seeded, leaves the RNG be
        torch.manual_seed(cfg.seed)
        drafter = MiddleAdapter(anatomy.hidden_size, opts.width).to(ctx.device)
    glob = {k: v.detach().clone() for k, v in drafter.state_dict().items()}
    codec = cfg.engine.activation_codec

    start, rnd = 0, 0
    if exp.resume is not None:
        for d in devices:
            grid.restore(d, exp.resume["states"].get(d))
        start = int(exp.resume["step"])
        glob, rnd = exp.resume["extra"]["drafter"], int(exp.resume["extra"]["round"])

    bad_uploads = 0

    def micro_batch(meta: dict[str, Any], skipped: set[str]) -> list[Message]:
        """One batch of every device not ``skipped`` this step: its input blocks' hidden
        states up, the cloud's middle over them down, its distilled reply (a bad upload: the
        device is skipped for the step, the run goes on)."""
        nonlocal bad_uploads
        # Together: every device runs its bottom at once (in parallel when deployed).
        ups = grid.request_many(
            [Message("embed", SERVER, d, {}, meta) for d in devices], codec=codec, together=True
        )
        downs = []
        for m in ups:  # the cloud's middle, in arrival order of the uploads
            if m.sender in skipped:
                continue
            try:
                hidden, mask = checked_upload(m, anatomy.hidden_size)
            except ProtocolError as err:
                log.warning("skipped a step of %s: %s", m.sender, err)
                bad_uploads += 1
                skipped.add(m.sender)
                continue
            acts = Activations(hidden.to(ctx.device), mask.to(ctx.device))
            with torch.no_grad():
                out, flops = ctx.meter.flops.run(
                    "hat-middle", middle, acts, dims=tuple(acts.attention_mask.shape)
                )
            ctx.meter.compute(flops, round=meta["round"], after=m.arrival, label="middle")
            downs.append(Message("middle", SERVER, m.sender, {"hidden": out.hidden}, meta))
        return grid.request_many(downs, codec=codec, together=True)

    total, points = cfg.train.steps, exp.eval_points()
    ends = sorted({*range(opts.local_steps, total, opts.local_steps), *points, total})
    last_eval: dict[str, float] = {}
    rejected_total = 0
    with exp.progress(total - start, f"hat_drafter {cfg.name}") as bar:
        step = start
        for end in [e for e in ends if e > start]:
            rnd += 1
            grid.request_many(
                [Message("load", SERVER, d, glob, {"round": rnd}) for d in devices], together=True
            )
            for s in range(step + 1, end + 1):
                skipped: set[str] = set()  # a bad upload skips the device's whole step
                per_device: dict[str, list[float]] = {}
                lr = math.nan
                for micro in range(cfg.train.grad_accum):
                    meta = {"round": rnd, "step": s, **({"micro": micro} if micro else {})}
                    for r in micro_batch(meta, skipped):
                        try:  # a peer's numbers: a bad one is left out of the records
                            loss, its_lr = meta_number(r, "loss"), meta_number(r, "lr")
                        except ProtocolError as err:
                            log.warning("left a loss of %s out of the records: %s", r.sender, err)
                            continue
                        per_device.setdefault(r.sender, []).append(loss)
                        lr = its_lr if math.isnan(lr) else lr  # the first reply's
                done = {d: mean(v) for d, v in per_device.items() if d not in skipped}
                losses = list(done.values())
                exp.log_record("train", s, "mean", round=rnd, loss=mean(losses), lr=lr)
                for d, loss in done.items():
                    exp.log_record("train", s, d, round=rnd, loss=loss)
                bar.update(1, train_loss=mean(losses))
            step = end
            reports = grid.request_many(
                [Message("report", SERVER, d, {}, {"round": rnd}) for d in devices], together=True
            )
            good, rejected = screen_updates(reports, lambda _d, ref=glob: ref)
            rejected_total += len(rejected)
            if good:
                glob = weighted_average([m.tensors for m in good],
                                        [float(m.meta["examples"]) for m in good])  # fmt: skip
            exp.log_record("round", step, SERVER, round=rnd, reported=len(good),
                           rejected=len(rejected))  # fmt: skip
            if step in points:
                drafter.load_state_dict(glob)
                last_eval = drafter_metrics(anatomy, cut, drafter, exp.test_set,
                                            cfg.eval.batch_size, opts)  # fmt: skip
                exp.log_record("eval", step, SERVER, round=rnd, **last_eval)
                bar.update(0, acceptance=last_eval["drafter_acceptance"])
            exp.maybe_checkpoint(
                step,
                lambda: {**grid.snapshots(devices), SERVER: model_state},
                {"drafter": glob, "round": rnd},
            )
    drafter.load_state_dict(glob)
    where = exp.run_dir / DRAFTER_DIR / f"cut-{cut.n_in}-{cut.n_out}"
    save_drafter(drafter.cpu(), cut, where, {
        "paradigm": "hat_drafter", "steps": total, "devices": len(devices),
        "local_steps": opts.local_steps, **last_eval})  # fmt: skip
    final = {**exp.evaluate_state(model_state), **last_eval}
    return ParadigmResult(
        states={SERVER: model_state},
        final_eval=final,
        extra={
            "drafter_dir": str(where),
            "rejected_updates": rejected_total,
            "rejected_uploads": bad_uploads,
        },
    )
