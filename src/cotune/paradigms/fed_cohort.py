"""Device cohorts for federated rounds in the in-process engine (``paradigm.options.cohort``).

A FedAvg round asks K simulated devices to train ``local_steps`` steps each. One after another
that is K small forwards and backwards through the same frozen base per step; a cohort runs
local step ``j`` of all K devices as ONE padded batch, each device's rows through its own
adapter tensors (``cotune.peft.grouped``). One backward of the sum of the devices' losses gives
each device exactly its own gradient (a device's loss depends only on its rows and tensors);
each then clips and takes its own optimizer step. Messages, bytes, FLOP charges (known from an
earlier counted step of the same shape, else that step runs device by device and counts) and
the simulated clock are those of the one-by-one round.

Differences from one-by-one, as for split cohorts: float results agree to ~1e-6 (other batch
shapes), and the dropout masks of the whole cohort come from the first device's RNG stream
(statistically the same; bitwise different when dropout > 0). Cohorts need every trainable
tensor in an adapter layer (a trained classification head cannot differ per row group) and a
plain device loss (FedProx's proximal term included); otherwise the round runs one by one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from cotune.aggregation import proximal_loss
from cotune.data import IGNORE_INDEX, Batch
from cotune.errors import DivergenceError
from cotune.models import task_loss
from cotune.peft.grouped import bind_state, row_groups, split_by_layer
from cotune.train import StepResult

if TYPE_CHECKING:
    from cotune.paradigms.federated import FedDevice

log = logging.getLogger(__name__)


def cohort_supported(devices: Sequence[FedDevice]) -> bool:
    first = devices[0]
    ctx = first.ctx
    if not getattr(first, "cohort", False) or ctx.domains is not None:
        return False
    if ctx.cfg.train.autocast == "fp16":  # one backward, but each device has its own loss scale
        return False
    if any(d.example_domains is not None or d.dataset is None for d in devices):
        return False
    layers = ctx.model.adapters.layers
    per_layer, rest = split_by_layer(layers, first.state.params)
    stateful = any(getattr(layers[p], "reg_from_forward", False) for p in per_layer)
    if rest or stateful:
        if not _told:
            _told.append(True)
            log.info(
                "fedavg cohort: %s, so rounds run device by device",
                "a trained head cannot differ per row group"
                if rest
                else "a regularizer from the forward would mix the devices",
            )
        return False
    return True


_told: list[bool] = []


def _pad_cat(batches: list[Batch], task: str) -> Batch:
    width = max(int(b.input_ids.shape[1]) for b in batches)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(t, (0, width - t.shape[1]), value=value)

    ids = torch.cat([pad(b.input_ids, 0) for b in batches])
    mask = torch.cat([pad(b.attention_mask, 0) for b in batches])
    if task == "causal_lm":
        labels = torch.cat([pad(b.labels, IGNORE_INDEX) for b in batches])
    else:
        labels = torch.cat([b.labels for b in batches])
    return Batch(ids, mask, labels)


def train_cohort(devices: Sequence[FedDevice], steps: list[int], rnd: int, key: str) -> None:
    """Run each device's ``steps[i]`` local steps, step ``j`` of all devices that still have
    one as a single batch; results land in each device's ``results`` list. Each device's
    sampler position is kept in its state afterwards, as ``TrainingRole.train_steps`` does."""
    try:
        _cohort_steps(devices, steps, rnd, key)
    finally:
        for d in devices:
            assert d.sampler is not None
            d.state.sampler = d.sampler.state_dict()


def _cohort_steps(devices: Sequence[FedDevice], steps: list[int], rnd: int, key: str) -> None:
    first = devices[0]
    ctx = first.ctx
    model = ctx.model
    trainer, layers, forward = model.trainer, model.adapters.layers, model.forward
    accum = ctx.cfg.train.grad_accum
    task = ctx.task
    flops = ctx.meter.flops
    for j in range(max(steps)):
        live = [d for d, n in zip(devices, steps) if j < n]
        micro = [[d.dataset.batch(d.sampler.next_indices()) for _ in range(accum)] for d in live]
        dims = [[tuple(int(x) for x in b.input_ids.shape) for b in m] for m in micro]
        if any(flops.known(key, dm) is None for ds in dims for dm in ds) or len(live) < 2:
            for d, m in zip(live, micro):  # counts the shape once, the usual way
                d.results.append(d.step_on(m, rnd, key))
            continue
        started = time.perf_counter()
        names = list(first.state.params)
        leaves = [{k: d.state.params[k].detach().requires_grad_(True) for k in names} for d in live]
        losses = [0.0] * len(live)
        with trainer.activate(first.state):  # its RNG draws the cohort's dropout masks
            for a in range(accum):
                batches = [m[a] for m in micro]
                rows = [len(b) for b in batches]
                joint = _pad_cat(batches, task)
                with row_groups(layers, rows, leaves):
                    logits = forward(joint.input_ids, joint.attention_mask)
                total = 0.0
                start = 0
                for i, (d, b, n) in enumerate(zip(live, batches, rows)):
                    part = logits[start : start + n]
                    if task == "causal_lm":
                        part = part[:, : b.input_ids.shape[1]]
                    loss = task_loss(part, b.labels, task)
                    with bind_state(layers, leaves[i]):
                        reg = model.adapters.regularization_loss()
                    if reg is not None:
                        loss = loss + reg
                    if d.prox_global is not None:
                        loss = loss + proximal_loss(leaves[i], d.prox_global, d.prox_mu)
                    losses[i] += float(loss.detach()) / accum
                    total = total + loss / accum
                    start += n
                trainer.backward(total)
        share = (time.perf_counter() - started) / len(live)
        for d, own, loss, ds, m in zip(live, leaves, losses, dims, micro):
            grads = {k: leaf.grad for k, leaf in own.items() if leaf.grad is not None}
            f = sum(flops.charge_known(key, dm) for dm in ds)
            d.results.append(apply_grads(d, grads, loss, f, sum(len(b) for b in m), rnd))
            d.train_host_s += share


def apply_grads(
    device: FedDevice, grads: dict[str, torch.Tensor], loss: float, flops: int, n: int, rnd: int
) -> StepResult:
    """One device's optimizer step from gradients the cohort computed for it."""
    trainer = device.ctx.model.trainer
    with trainer.activate(device.state):
        lr = trainer.set_lr(device.state.step)
        for k, p in trainer.params.items():
            p.grad = grads.get(k)
        try:
            norm = trainer.clip_and_step(loss=loss)
        except DivergenceError as err:
            raise err.for_role(device.role_id) from None
        device.state.step += 1
    device.ctx.meter.compute(flops, round=rnd, label="train")
    return StepResult(loss=loss, lr=lr, grad_norm=norm, examples=n, flops=flops)
