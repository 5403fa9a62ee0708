"""Local-only training: each device fine-tunes its own adapter on its own shard, nothing is shared.

The privacy upper bound and the baseline every collaborative paradigm must beat. The server
only sends control messages ("train N steps") and receives loss reports; adapters never move.
"""

from __future__ import annotations

from cotune.errors import PeerUnavailable
from cotune.paradigms.base import Experiment, ParadigmResult, TrainingRole, mean, reply
from cotune.paradigms.options import LocalOptions, parse_options
from cotune.progress import eval_fields
from cotune.runtime import Message
from cotune.runtime.ids import SERVER
from cotune.train import StepResult


class LocalDevice(TrainingRole):
    def __init__(self, ctx):
        super().__init__(ctx)
        opts = parse_options(LocalOptions, ctx.cfg.paradigm.options)
        self.cohort, self.cohort_rows = opts.cohort, opts.cohort_rows
        # What fedavg's cohort reads of a device (fed_cohort.py): no proximal term here.
        self.prox_global, self.prox_mu = None, 0.0
        self.results: list[StepResult] = []
        self.train_host_s = 0.0  # host seconds of its steps (a cohort's share, when batched)
        self.probe_memory()

    def on_train(self, msg: Message) -> Message:
        results = self.train_steps(int(msg.meta["steps"]), round=int(msg.meta.get("round", 0)))
        return self.report(msg, results)

    def report(self, msg: Message, results: list[StepResult]) -> Message:
        return reply(
            msg,
            "train_result",
            losses=[r.loss for r in results],
            lrs=[r.lr for r in results],
            step=self.state.step,
        )

    @classmethod
    def can_batch_train(cls, devices: list[LocalDevice]) -> bool:
        from cotune.paradigms.fed_cohort import cohort_supported

        return cohort_supported(devices)  # type: ignore[arg-type]

    @classmethod
    def batch_on_train(cls, devices: list[LocalDevice], msgs: list[Message]) -> list[Message]:
        """Colocated devices' steps as one cohort (``paradigm.options.cohort``)."""
        from cotune.paradigms.fed_cohort import train_cohort

        for d in devices:
            d.results = []
        steps = [int(m.meta["steps"]) for m in msgs]
        rnd = int(msgs[0].meta.get("round", 0))
        train_cohort(devices, steps, rnd, devices[0].ctx.model.flop_key)  # type: ignore[arg-type]
        return [d.report(m, d.results) for d, m in zip(devices, msgs)]


def run(exp: Experiment) -> ParadigmResult:
    cfg, grid = exp.cfg, exp.grid
    devices = grid.node_ids("device-")
    for d in devices:
        grid.start(d, LocalDevice)

    start = 0
    if exp.resume is not None:
        for d in devices:
            grid.restore(d, exp.resume["states"][d])
        start = int(exp.resume["step"])

    per_device: dict[str, dict[str, float]] = {}
    summary: dict[str, float] = {}
    with exp.progress(cfg.train.steps - start, f"local {cfg.name}") as bar:
        step = start
        for rnd, point in enumerate(exp.eval_points(), start=1):
            if point <= start:
                continue
            chunk = point - step
            futures = grid.submit_many(  # all at once: colocated devices may run as a cohort
                [Message("train", SERVER, d, {}, {"steps": chunk, "round": rnd}) for d in devices]
            )
            replies = []
            for f in futures:
                r = f.result()
                if not r.ok or r.message is None:
                    raise PeerUnavailable(f"{r.role}: {r.error}")  # local training has no quorum
                replies.append(r.message)
            losses = [r.meta["losses"] for r in replies]
            for j in range(chunk):
                step_losses = [ls[j] for ls in losses]
                exp.log_record(
                    "train",
                    step + j + 1,
                    "mean",
                    round=rnd,
                    loss=mean(step_losses),
                    lr=replies[0].meta["lrs"][j],
                )
            for r in replies:
                exp.log_record("train", point, r.sender, round=rnd, loss=mean(r.meta["losses"]))
            step = point
            per_device, summary = exp.evaluate_roles(devices, step, rnd)
            bar.update(chunk, **eval_fields(summary))  # the devices' mean
            exp.maybe_checkpoint(
                step, lambda: {d: grid.snapshot(d) for d in devices}, {"round": rnd}
            )
    return ParadigmResult(
        states={d: grid.snapshot(d) for d in devices},
        final_eval=summary,
        extra={"per_device_eval": per_device},
    )
