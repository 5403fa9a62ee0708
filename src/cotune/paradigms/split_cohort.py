"""Device cohorts for split learning in the in-process engine.

Every split step, K simulated devices run the bottom segment on their own batches. One after
another that is K small forwards and backwards through the same frozen layers, which on a CPU
costs far more than one forward of all K batches together. A cohort runs them as ONE padded
batch: each device's rows go through its own adapter tensors (``cotune.peft.grouped``), one
backward gives each device exactly its own gradient. Everything a device does is otherwise
unchanged: it sends its own activations message (sliced to its own length), receives its own
cut gradient, is charged its own FLOPs (known from an earlier counted run at the same shape or
from the key's verified FLOP law; a device whose batch has a shape not known yet runs on its own
beside the cohort, which counts it) and applies its own optimizer step.

Differences from one-at-a-time execution, both documented in docs/methods.md: float results
agree to ~1e-6 (different batch shapes), and dropout masks of the whole cohort are drawn from
the first device's RNG stream (statistically the same; bitwise different when dropout > 0).

With ``train.padding_free`` the joint batch runs padding-free as a device's own batch does (the
row groups split the packed tokens by member, through the backward too), and each member's FLOP
key carries its own real tokens, so it is charged what its one-by-one step would be.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cotune.models import Activations
from cotune.models.packing import padding_free, token_dims
from cotune.paradigms.fed_cohort import decline
from cotune.paradigms.splitting import SplitDevice
from cotune.peft.grouped import bind_state, row_groups, split_by_layer

FWD, BWD = "split-device-fwd", "split-device-bwd"


@dataclass
class _Run:
    devices: list[SplitDevice]
    rows: list[int]
    lengths: list[int]
    dims: list[tuple[int, ...]]  # each member's FLOP key dimensions
    leaves: list[dict[str, torch.Tensor]]
    hidden: torch.Tensor  # [sum rows, max length, d]: the joint output (graph root)
    regs: list[torch.Tensor | None]


class DeviceCohort:
    """Runs the devices of one step as one batch (see the module docstring).

    The engine offers it to colocated devices (``SplitDevice.batch_step``): they share one
    model, so their rows can run through it together, each through its own adapter tensors.
    """

    def __init__(self, first: SplitDevice):
        self.first = first
        self.layout = first.layout
        self.flops = first.ctx.meter.flops
        self._run: _Run | None = None
        layers = first.ctx.model.adapters.layers
        self.layers = layers
        per_layer, rest = split_by_layer(
            layers, {k: torch.empty(0) for k in self.layout.device_names}
        )
        # A device-side tensor outside the adapter layers (e.g. a trainable embedding) cannot
        # differ per row group, nor can a regularizer computed from the last forward (a router's
        # load balance would mix the devices' rows): such runs go one device at a time.
        stateful = any(getattr(layers[p], "reg_from_forward", False) for p in per_layer)
        grid = first.ctx.grid
        opts = first.opts
        # Sequential server with global clipping needs each device's norm before it serves the
        # next device: the backwards cannot wait for the cohort.
        pooled = getattr(opts, "server_batch", "sequential") == "pooled"
        self.supported = (
            grid is not None and grid.colocated and self.layout.top is None and not rest
            and not stateful and getattr(opts, "cohort", False)
            and (pooled or not first.global_clip)
        )  # fmt: skip
        self.packed = first.packed
        if self.supported and first.micros > 1:
            # A micro-batch's backward frees its graph before the next forward, one device at
            # a time (the gradient round trip brings the next micro-batch up).
            self.supported = decline("train.grad_accum > 1", "split steps run device by device")

    @classmethod
    def for_roles(cls, roles: Sequence[SplitDevice]) -> DeviceCohort | None:
        """The cohort led by the first role, built once (what it derives from the model's
        layers and the options does not change between steps)."""
        if not roles:
            return None
        first = roles[0]
        cohort = first._cohort
        if cohort is None:
            cohort = first._cohort = cls(first)
        return cohort

    def ready(self, devices: Sequence[SplitDevice]) -> bool:
        return self.supported and len(devices) > 1

    def forward(self, devices: Sequence[SplitDevice], step: int, rnd: int) -> list[SplitDevice]:
        """Every device draws its batch and sends its activations. Those whose FLOPs at their
        batch's shape are already known run as one forward (when there are two or more); the
        others run one by one, which counts them (dynamic padding keeps meeting new lengths,
        and one new length must not send the whole step back to one device at a time).
        Activations leave in device order either way. Returns the devices that ran as one."""
        batches = [d.next_batch(rnd) for d in devices]
        rows = [int(b.input_ids.shape[0]) for b in batches]
        lengths = [int(b.input_ids.shape[1]) for b in batches]
        packed = self.packed
        dims = [token_dims(b.attention_mask, packed) for b in batches]
        flops = self.flops
        known = [all(flops.known(k, dm) is not None for k in (FWD, BWD)) for dm in dims]
        if sum(known) < 2:
            for d, b in zip(devices, batches):
                d.send_activations(step, rnd, batch=b)
            return []
        picked = [x for x, ok in zip(zip(devices, batches, rows, lengths, dims), known) if ok]
        members, mine_b, m_rows, m_lengths, m_dims = (list(col) for col in zip(*picked))
        width = max(m_lengths)
        # Right padding (the collator's): a row's real positions never see the extra columns.
        ids = torch.cat([F.pad(b.input_ids, (0, width - b.input_ids.shape[1])) for b in mine_b])
        mask = torch.cat(
            [F.pad(b.attention_mask, (0, width - b.attention_mask.shape[1])) for b in mine_b]
        )
        names = self.layout.device_names
        leaves = [
            {k: d.state.params[k].detach().requires_grad_(True) for k in names} for d in members
        ]
        layers = self.layers
        # The first member's RNG draws the dropout masks.
        with members[0].trainer.activate(members[0].state), padding_free(packed):
            with row_groups(layers, m_rows, leaves):
                acts = self.layout.bottom(ids, mask)
            regs = []
            for d, own in zip(members, leaves):
                with bind_state(layers, own):
                    regs.append(d.reg())
        self._run = _Run(members, m_rows, m_lengths, m_dims, leaves, acts.hidden, regs)
        slot, start = {}, 0  # a member's first row in the joint batch, and its regularizer
        for d, n, reg in zip(members, m_rows, regs):
            slot[id(d)] = (start, reg)
            start += n
        for d, b, n, t, dm, ok in zip(devices, batches, rows, lengths, dims, known):
            if not ok:
                d.send_activations(step, rnd, batch=b)
                continue
            at, reg = slot[id(d)]
            mine = Activations(acts.hidden[at : at + n, :t], b.attention_mask)
            d.emit(*d.upload(step, rnd, b, mine, reg, flops.charge_known(FWD, dm)))
        return members

    def backward(self) -> dict[int, int]:
        """One backward of every member's cut gradient; each member keeps its own gradients.
        Returns each member's backward FLOPs (by ``id``), which the caller charges in device
        order (``SplitDevice.backward_done``)."""
        run, self._run = self._run, None
        if run is None:
            return {}
        grad = torch.zeros_like(run.hidden)
        outs, grads = [run.hidden], [grad]
        live = []
        start = 0
        for d, n, t, reg in zip(run.devices, run.rows, run.lengths, run.regs):
            if d.cut_grad is not None:  # a rejected batch has none: its rows get no gradient
                grad[start : start + n, :t] = d.cut_grad
                live.append(d)
                if reg is not None:
                    outs.append(reg)
                    grads.append(torch.ones_like(reg))
            start += n
        if not live:
            return {}
        # A checkpointed block recomputes its forward here: the row groups (and the packing)
        # must hold again.
        with padding_free(self.packed), row_groups(self.layers, run.rows, run.leaves):
            torch.autograd.backward(outs, grads)
        flops = self.flops
        done = {}
        for d, dm, own in zip(run.devices, run.dims, run.leaves):
            if d not in live:
                continue
            d.grads = {k: leaf.grad for k, leaf in own.items() if leaf.grad is not None}
            done[id(d)] = flops.charge_known(BWD, dm)
        return done
