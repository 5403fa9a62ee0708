"""What the federated paradigms share: the device that trains what it is sent and reports it,
device sampling per round, the mean-loss records of a round and the round record.

Written once here so the FedAvg family, FedBiOT and HierFedLoRA cannot drift apart (FedBiOT's
own sampling once ignored mid-round drops under ``random`` availability).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from cotune.aggregation import proximal_loss
from cotune.errors import ProtocolError
from cotune.paradigms.base import Experiment, TrainingRole, mean, reply, state_tensors
from cotune.paradigms.fed_secagg import SecAggDevice
from cotune.paradigms.options import FedAvgOptions, ParadigmOptions, parse_options
from cotune.runtime import Message
from cotune.runtime.grid import Grid
from cotune.runtime.ids import SERVER
from cotune.runtime.node import NodeContext
from cotune.train import StepResult, full_model_loss


class FedDevice(SecAggDevice, TrainingRole):
    """Loads the global adapter it is sent, trains it on its own shard, reports the result.

    Reads its options (``local_steps`` / ``local_epochs``, ``optimizer_state``, ``prox_mu``)
    from its node's config (``paradigm.options``, as ``options_model`` types them). Paradigms
    whose devices train a part of the model (hierfed's depth) override ``prepare``,
    ``flop_key`` and ``upload``; everything else is this one round protocol.
    """

    options_model: type[ParadigmOptions] = FedAvgOptions
    #: Whether a device that resets its optimizer lets its adapter go between rounds (see
    #: ``releasable``); off where rounds may send a part of it (hierfed's depths).
    release_between_rounds = True

    def __init__(self, ctx: NodeContext) -> None:
        super().__init__(ctx)
        opts = parse_options(self.options_model, ctx.cfg.paradigm.options)
        self.steps = int(opts.local_steps)
        self.epochs: float | None = getattr(opts, "local_epochs", None)
        self.reset_optimizer = getattr(opts, "optimizer_state", "keep") == "reset"
        self.prox_mu = float(getattr(opts, "prox_mu", 0.0))
        self.prox_global: dict[str, torch.Tensor] | None = None
        self.cohort = bool(getattr(opts, "cohort", False))
        self.cohort_rows: int | None = getattr(opts, "cohort_rows", None)
        self.round = 0
        self.results: list[StepResult] = []  # a cohort round's steps, as they complete
        self.train_host_s = 0.0
        self.task_loss = self.loss_fn  # FedProx wraps it per round
        # With a reset optimizer and a round message that carries the whole adapter, nothing
        # of the adapter outlives the round: it is released after the report, and only the
        # RNG and sampler position stay (a population of 100,000 grows by those alone).
        self.releasable = False
        self.report_memory()

    def report_memory(self) -> None:
        """This device's memory estimate (the whole model by default)."""
        self.probe_memory()

    def local_steps(self) -> int:
        if self.epochs is None:
            return self.steps
        assert self.dataset is not None
        per_epoch = math.ceil(len(self.dataset) / self.ctx.cfg.train.batch_size)
        return max(1, math.ceil(self.epochs * per_epoch))

    def prepare(self, msg: Message) -> None:
        """Read what the round's message says beyond the adapter (nothing by default)."""

    def flop_key(self) -> str | None:
        """The FLOP counter's key of a local step (None: the whole model's)."""
        return None

    def upload(self) -> dict[str, torch.Tensor]:
        """What goes back to the aggregator: the part of the adapter this device trains."""
        return self.ctx.role_tensors(state_tensors(self.state))

    def on_train(self, msg: Message) -> Message:
        self.begin_round(msg)
        started = time.perf_counter()
        results = self.train_steps(self.local_steps(), round=self.round, key=self.flop_key())
        # Measurement, not protocol: host timings never ride in a message (they would change
        # its byte count, and so the simulated time, from one run to the next).
        self.train_host_s = time.perf_counter() - started
        return self.finish(msg, results)

    @classmethod
    def can_batch_train(cls, devices: list[FedDevice]) -> bool:
        from cotune.paradigms.fed_cohort import cohort_supported

        return cohort_supported(devices)

    @classmethod
    def batch_on_train(cls, devices: list[FedDevice], msgs: list[Message]) -> list[Message]:
        """Colocated devices' round as one cohort (``cohort: true``; see ``fed_cohort``); a
        round whose messages ask for different kinds of step (hierfed's depths) one by one."""
        from cotune.paradigms.fed_cohort import train_cohort

        if not cls.one_cohort(msgs):
            return [d.on_train(m) for d, m in zip(devices, msgs)]
        for d, m in zip(devices, msgs):
            d.begin_round(m)
            d.results, d.train_host_s = [], 0.0
        steps = [d.local_steps() for d in devices]
        first = devices[0]
        train_cohort(devices, steps, first.round, first.flop_key() or first.ctx.model.flop_key)
        return [d.finish(m, d.results) for d, m in zip(devices, msgs)]

    @staticmethod
    def one_cohort(msgs: list[Message]) -> bool:
        """Whether these round messages train the same way (so may run as one batch)."""
        return True

    def begin_round(self, msg: Message) -> None:
        """Load the global adapter the round's message carries; set the step and loss."""
        self.round = int(msg.meta["round"])
        self.prepare(msg)
        tensors = msg.tensors
        if "rank" in msg.meta:  # heterogeneous ranks: the first r components, zero-padded
            from cotune.paradigms.fed_ranks import pad

            tensors = pad(tensors, self.ctx.model.trainer.params)
        if not self.state.params:  # released after its last round: the message has it all
            self.state.params = {k: v.detach().clone() for k, v in tensors.items()}
            missing = set(self.ctx.model.trainer.params) - set(self.state.params)
            if missing:
                raise ProtocolError(
                    f"{self.role_id}: round {self.round} sent {len(msg.tensors)} tensors, "
                    f"not the whole adapter it released (missing {sorted(missing)[:3]})"
                )
        else:
            with torch.no_grad():
                for k, v in tensors.items():
                    self.state.params[k].copy_(v)
        self.releasable = (
            self.release_between_rounds
            and self.reset_optimizer
            and set(msg.tensors) >= set(self.state.params)
        )
        if self.reset_optimizer:
            self.state.optim = {k: {} for k in self.state.params}
        self.state.step = int(msg.meta["schedule_step"])  # LR follows the global round
        self.prox_global = tensors if self.prox_mu > 0 else None
        if self.prox_global is not None:
            self.loss_fn = self._proximal(self.prox_global)

    def finish(self, msg: Message, results: list[StepResult]) -> Message:
        """The round's report; then what need not outlive the round is let go."""
        out = self.report(msg, results)
        if self.releasable:
            self.state.params, self.state.optim = {}, {}
            if self.prox_global is not None:  # its closure holds the round's global adapter
                self.prox_global, self.loss_fn = None, self.task_loss
        return out

    def report(self, msg: Message, results: list[StepResult]) -> Message:
        assert self.dataset is not None
        tensors, extra = self.upload(), {}
        if "rank" in msg.meta:  # only its own rank components travel (fewer after pruning)
            from cotune.paradigms.fed_ranks import pruned_rank, truncate

            rank = pruned_rank(tensors, int(msg.meta["rank"]), float(msg.meta.get("prune", 0.0)))
            tensors, extra = truncate(tensors, rank), {"rank": rank}
        if "dp" in msg.meta:  # local DP: clipped and noised before it leaves the device
            tensors = self._privatised(tensors, msg)
        if "sa" in msg.meta:  # secure aggregation: only the masked, weighted change leaves
            weight = len(self.dataset) if msg.meta["sa"].get("weight") == "examples" else 1
            tensors = self.secure_report(tensors, msg, weight)
        return reply(
            msg,
            "update",
            tensors,
            round=self.round,
            examples=len(self.dataset),
            losses=[r.loss for r in results],
            **extra,
        )

    def _privatised(
        self, tensors: dict[str, torch.Tensor], msg: Message
    ) -> dict[str, torch.Tensor]:
        from cotune.privacy import add_noise, clipped_delta

        dp = msg.meta["dp"]
        ref = {k: msg.tensors[k][tuple(slice(0, n) for n in v.shape)] for k, v in tensors.items()}
        delta, _ = clipped_delta(tensors, ref, float(dp["clip"]))
        index = int(self.role_id.rpartition("-")[2])
        gen = torch.Generator().manual_seed(int(dp["seed"]) * 1_000_003 + self.round * 7919 + index)
        noisy = add_noise(delta, float(dp["sigma"]) * float(dp["clip"]), gen)
        return {k: (ref[k].float() + noisy[k]).to(tensors[k].dtype) for k in tensors}

    def measurements(self) -> dict[str, float]:
        return {"train_host_s": self.train_host_s}

    def _proximal(self, global_params: dict[str, torch.Tensor]):
        model, mu = self.ctx.model, self.prox_mu
        task = full_model_loss(model.forward, self.ctx.task, model.adapters.regularization_loss)
        params = model.trainer.params  # the node's parameters, holding this role's tensors now

        def loss_fn(batch):
            return task(batch) + proximal_loss(params, global_params, mu)

        return loss_fn


def sample_round(
    grid: Grid,
    devices: list[str],
    rnd: int,
    seed: int,
    *,
    clients_per_round: int | None,
    fraction: float,
    salt: int = 0xFED,
) -> list[str]:
    """Devices connected at the round's start, sampled without replacement (seeded per round;
    ``salt`` keeps each paradigm's own random stream)."""
    pool = grid.connected(devices, round=rnd)
    k = clients_per_round or max(1, round(fraction * len(devices)))
    k = min(k, len(pool))
    rng = np.random.default_rng([seed, salt, rnd])
    picked = sorted(rng.choice(len(pool), size=k, replace=False).tolist()) if k else []
    return [pool[i] for i in picked]


def log_mean_losses(exp: Experiment, losses: list[list[float]], first_step: int, rnd: int) -> None:
    """One ``train`` record per local step: the mean over the devices that reported."""
    for j in range(max((len(ls) for ls in losses), default=0)):
        vals = [ls[j] for ls in losses if j < len(ls)]
        exp.log_record("train", first_step + j, "mean", round=rnd, loss=mean(vals))


class RoundTraffic:
    """Bytes and host seconds of one round, for its ``round`` record."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.mark = len(grid.transfers)
        self.started = time.perf_counter()

    def record(self, chosen: list[str]) -> dict[str, Any]:
        traffic = self.grid.transfers[self.mark :]
        return {
            "bytes_up": sum(t.nbytes for t in traffic if t.receiver == SERVER),
            "bytes_down": sum(t.nbytes for t in traffic if t.sender == SERVER),
            # Host seconds of the whole round vs. the devices' own training: the overhead of
            # the protocol (encoding, aggregation, bookkeeping) is the difference.
            "round_host_s": time.perf_counter() - self.started,
            "device_train_host_s": sum(
                self.grid.measurements(d).get("train_host_s", 0.0) for d in chosen
            ),
        }
