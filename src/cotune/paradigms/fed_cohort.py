"""Device cohorts for federated rounds on colocated devices (``paradigm.options.cohort``).

A round asks K simulated devices to train ``local_steps`` steps each. One after another that is
K small forwards and backwards through the same frozen base per step; a cohort runs local step
``j`` of all K devices as ONE padded batch, each device's rows through its own adapter tensors
(``cotune.peft.grouped``). One backward of the sum of the devices' losses gives each device
exactly its own gradient (a device's loss depends only on its rows and tensors); each then clips
and takes its own optimizer step. Messages, bytes, FLOP charges (known from an earlier counted
step of the same shape, else that step runs device by device and counts) and the simulated
clock are those of the one-by-one round.

Who offers it: ``fedavg`` and ``local`` devices (the whole model), ``hierfed`` members of a
group round (the blocks below their depth without a graph: ``HierDevice.cohort_plan``) and
``fedbiot`` devices that hold the same emulator version (through the emulator). A member
describes its step with a ``CohortPlan`` and adds its own loss terms (``cohort_penalty``:
regularizers, FedProx's or FedBiOT's proximal term). A trained task head (classification's
``modules_to_save``) runs once per row group with that device's head tensors. ``dlora`` does
not: a DLoRA step is a conversation with the cloud, which computes each device's killed modules
with that device's tensors, so its rounds run one device at a time.

Differences from one-by-one, as for split cohorts: float results agree to ~1e-6 (other batch
shapes), and the dropout masks of the whole cohort come from the first device's RNG stream
(statistically the same; bitwise different when dropout > 0). Cohorts need every trainable
tensor in an adapter layer or the task head, a regularizer that does not come from the forward,
no domain routing and no fp16 loss scaling; otherwise the round runs one by one.

With ``train.padding_free`` the cohort's joint batch runs padding-free like a one-by-one
step (row groups split the packed tokens by member; the body returns only the first tokens
when the head reads only those), and its FLOP keys carry each member's real tokens. The row
groups hold through the backward too, where checkpointed blocks recompute their forward.

``cohort_rows`` bounds a pass: a round's devices then run in consecutive cohorts of at most
that many rows (each cohort's dropout masks from its own first device), so the activations
held at once stay bounded (measured on CPU: ten devices x batch 16 at once held +1.25 GB).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cotune.aggregation import proximal_loss
from cotune.data import IGNORE_INDEX, Batch
from cotune.errors import DivergenceError
from cotune.models import Activations, Segment, task_loss
from cotune.models.packing import Packing, padding_free, token_dims
from cotune.models.segment import packed_task_loss
from cotune.peft import AdapterLayer
from cotune.peft.grouped import bind_state, bind_tensors, row_groups, split_by_layer
from cotune.runtime.node import NodeModel
from cotune.train import StepResult, Trainer
from cotune.train.joint import step_roles

log = logging.getLogger(__name__)


@dataclass
class CohortPlan:
    """How a cohort's joint step runs on its members' node: the trainer over their tensors,
    the adapter layers that take per-row-group tensors, the whole forward, and the same split
    before the task head (``body``, then ``head`` once per row group with that member's head
    tensors: a trained classification head); ``scope`` wraps the step (FedBiOT's emulator)."""

    trainer: Trainer
    layers: Mapping[str, AdapterLayer]
    root: nn.Module
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    body: Callable[[torch.Tensor, torch.Tensor], Activations]
    head: Segment
    scope: Callable[[], AbstractContextManager[Any]] = nullcontext


def model_plan(model: NodeModel) -> CohortPlan:
    """The plan of a member that trains its node's whole model (fedavg, local)."""
    anatomy = model.loaded.anatomy
    n = anatomy.num_layers
    return CohortPlan(
        trainer=model.trainer,
        layers=model.adapters.layers,
        root=model.loaded.model,
        forward=model.forward,
        # The head runs apart (once per member); when it reads only the first token, only
        # that position leaves the body (a padding-free last block then computes only it).
        body=anatomy.segment(
            0, n, embed=True, head=False, keep="first" if anatomy.head_reads_first else "all"
        ),
        head=anatomy.segment(n, n, embed=False, head=True),
    )


def plan_of(member: Any) -> CohortPlan:
    own = getattr(member, "cohort_plan", None)
    return own() if own is not None else model_plan(member.ctx.model)


def penalty_of(
    member: Any, leaves: dict[str, torch.Tensor], plan: CohortPlan
) -> list[torch.Tensor]:
    """The terms a member adds to its task loss, in order, on its own leaves: the adapter
    method's regularizer, then FedProx's proximal term (a member may define
    ``cohort_penalty``)."""
    own = getattr(member, "cohort_penalty", None)
    if own is not None:
        return own(leaves, plan)
    adapters = member.ctx.model.adapters
    reg = None
    if adapters.has_regularizer:  # binding the member's tensors to ask costs ~0.2 ms a layer
        with bind_state(plan.layers, leaves):
            reg = adapters.regularization_loss()
    terms = [] if reg is None else [reg]
    if getattr(member, "prox_global", None) is not None:
        terms.append(proximal_loss(leaves, member.prox_global, member.prox_mu))
    return terms


def cohort_supported(devices: Sequence[Any]) -> bool:
    """Whether these devices' round may run as one cohort (``cohort: true`` asked for it);
    when it may not, why is logged once per reason and the round runs device by device."""
    first = devices[0]
    ctx = first.ctx
    if not getattr(first, "cohort", False):
        return False
    if ctx.domains is not None or any(
        getattr(d, "example_domains", None) is not None for d in devices
    ):
        return decline("domain routing sends each example to its own expert")
    if ctx.cfg.train.autocast == "fp16":
        return decline("fp16 loss scaling keeps one scale per device, a cohort one backward")
    if any(d.dataset is None for d in devices):
        return decline("a device holds no data")
    plan = plan_of(first)
    layers = plan.layers
    per_layer, rest = split_by_layer(layers, first.state.params)
    loose = [k for k in rest if not plan.head.owns(k)]
    if loose:
        return decline(f"{loose[0]} is trained outside the adapter layers and the task head")
    if any(getattr(layers[p], "reg_from_forward", False) for p in per_layer):
        return decline("a regularizer from the forward would mix the devices")
    return True


def decline(why: str, then: str = "rounds run device by device") -> bool:
    """A cohort cannot run: say why, once per reason in this process; always False."""
    if why not in _told:
        _told.add(why)
        log.info("device cohort: %s, so %s", why, then)
    return False


_told: set[str] = set()


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


def train_cohort(devices: Sequence[Any], steps: list[int], rnd: int, key: str) -> None:
    """Run each device's ``steps[i]`` local steps, step ``j`` of all devices that still have
    one as a single batch; results land in each device's ``results`` list. Each device's
    sampler position is kept in its state afterwards, as ``TrainingRole.train_steps`` does.
    With ``cohort_rows``, the devices run in consecutive cohorts of at most that many rows."""
    try:
        size = len(devices)
        limit = getattr(devices[0], "cohort_rows", None) if devices else None
        if limit is not None:
            size = max(1, limit // max(1, devices[0].ctx.cfg.train.batch_size))
        for i in range(0, len(devices), size):
            _cohort_steps(devices[i : i + size], steps[i : i + size], rnd, key)
    finally:
        for d in devices:
            assert d.sampler is not None
            d.state.sampler = d.sampler.state_dict()


def _cohort_steps(devices: Sequence[Any], steps: list[int], rnd: int, key: str) -> None:
    first = devices[0]
    ctx = first.ctx
    plan = plan_of(first)
    trainer, layers = plan.trainer, plan.layers
    names = list(first.state.params)
    # Tensors the task head runs (a trained head; adapters inside the head): bound per row
    # group as the head runs once per member; the rest take per-row-group tensors.
    head_names = [k for k in names if plan.head.owns(k)]
    _, rest = split_by_layer(layers, first.state.params)
    split_head = bool(rest)
    accum = ctx.cfg.train.grad_accum
    packed = ctx.cfg.train.padding_free
    task = ctx.task
    flops = ctx.meter.flops
    for j in range(max(steps)):
        live = [d for d, n in zip(devices, steps) if j < n]
        micro = [[d.dataset.batch(d.sampler.next_indices()) for _ in range(accum)] for d in live]
        dims = [[token_dims(b.attention_mask, packed) for b in m] for m in micro]
        if any(flops.known(key, dm) is None for ds in dims for dm in ds) or len(live) < 2:
            for d, m in zip(live, micro):  # counts the shape once, the usual way
                d.results.append(d.step_on(m, rnd, key))
            continue
        started = time.perf_counter()
        leaves = [{k: d.state.params[k].detach().requires_grad_(True) for k in names} for d in live]
        grouped = (
            [{k: v for k, v in lv.items() if k not in head_names} for lv in leaves]
            if split_head
            else leaves
        )
        losses = [0.0] * len(live)
        # The first member's RNG draws the dropout masks.
        with plan.scope(), trainer.activate(first.state), padding_free(packed):
            # A causal-LM head under padding_free: each member's real tokens' logits only.
            per_token: Segment | None = None
            if isinstance(plan.forward, Segment) and not split_head and plan.forward.packs_logits():
                per_token = plan.forward
            for a in range(accum):
                batches = [m[a] for m in micro]
                rows = [len(b) for b in batches]
                joint = _pad_cat(batches, task)
                with row_groups(layers, rows, grouped):
                    if split_head:
                        acts = plan.body(joint.input_ids, joint.attention_mask)
                    elif per_token is not None:
                        logits, layout = per_token.packed_logits(
                            joint.input_ids, joint.attention_mask
                        )
                        parts = logits.split(layout.group_tokens(rows))
                    else:
                        logits = plan.forward(joint.input_ids, joint.attention_mask)
                if split_head:
                    logits = _heads(
                        plan, acts, rows, [{k: lv[k] for k in head_names} for lv in leaves]
                    )
                total = 0.0
                start = 0
                for i, (d, b, n) in enumerate(zip(live, batches, rows)):
                    if per_token is not None:  # its rows' real tokens, in its own packing
                        own = Packing.of(b.attention_mask)
                        loss = packed_task_loss(parts[i], b.labels, own)
                    else:
                        part = logits[start : start + n]
                        if task == "causal_lm":
                            part = part[:, : b.input_ids.shape[1]]
                        loss = task_loss(part, b.labels, task)
                    for term in penalty_of(d, leaves[i], plan):
                        loss = loss + term
                    losses[i] += float(loss.detach()) / accum
                    total = total + loss / accum
                    start += n
                # A checkpointed block recomputes its forward in backward: the row groups must
                # hold then too.
                with row_groups(layers, rows, grouped):
                    trainer.backward(total)
        grads = [
            {k: leaf.grad for k, leaf in own.items() if leaf.grad is not None} for own in leaves
        ]
        charged = [sum(flops.charge_known(key, dm) for dm in ds) for ds in dims]
        examples = [sum(len(b) for b in m) for m in micro]
        results = apply_grads_many(live, trainer, grads, losses, charged, examples, rnd)
        share = (time.perf_counter() - started) / len(live)
        for d, result in zip(live, results):
            d.results.append(result)
            d.train_host_s += share


def _heads(
    plan: CohortPlan, acts: Activations, rows: list[int], tensors: list[dict[str, torch.Tensor]]
) -> torch.Tensor:
    """The task head once per row group, each with its member's own head tensors."""
    out, start = [], 0
    for n, own in zip(rows, tensors):
        part = Activations(acts.hidden[start : start + n], acts.attention_mask[start : start + n])
        with bind_tensors(plan.root, own):
            out.append(plan.head(part))
        start += n
    return torch.cat(out)


def apply_grads_many(
    devices: Sequence[Any],
    trainer: Trainer,
    grads: list[dict[str, torch.Tensor]],
    losses: list[float],
    flops: list[int],
    examples: list[int],
    rnd: int,
) -> list[StepResult]:
    """The members' optimizer steps as one AdamW call (``cotune.train.joint``): each is bit
    for bit the ``Trainer.step`` it would take alone (the same guards and reported norm, the
    clip factor computed as ``clip_grads_with_norm_`` computes it), without an optimizer call
    per member."""
    max_norm = trainer.cfg.max_grad_norm
    lrs = [trainer.lr_at(d.state.step) for d in devices]
    norms: list[float | None] = [None] * len(devices)
    updates, index, totals = [], [], []
    for i, (d, g, loss) in enumerate(zip(devices, grads, losses)):
        if not math.isfinite(loss):
            try:
                trainer.nonfinite(f"non-finite loss ({loss})", d.state.step + 1)
            except DivergenceError as err:
                raise err.for_role(d.role_id) from None
            d.state.step += 1
            continue
        coef, known = None, None
        if max_norm is not None and g:
            # In the trainer's parameter order: the norm's sum rounds by order.
            total = torch.nn.utils.get_total_norm([g[k] for k in trainer.params if k in g])
            known = float(total)  # the joint step's own guard reads it, not a second norm
            if bool(total.isfinite()):  # else the joint step skips it (or stops), as step does
                norms[i] = known
                coef = float(torch.clamp(float(max_norm) / (total + 1e-6), max=1.0))
        updates.append((trainer, d.state, g, coef))
        index.append(i)
        totals.append(known)
    applied = step_roles(updates, roles=[devices[i].role_id for i in index], norms=totals)
    for i, ok in zip(index, applied):
        if not ok:
            norms[i] = None
    out = []
    for d, loss, lr, norm, f, n in zip(devices, losses, lrs, norms, flops, examples):
        d.ctx.meter.compute(f, round=rnd, label="train")
        out.append(StepResult(loss=loss, lr=lr, grad_norm=norm, examples=n, flops=f))
    return out
