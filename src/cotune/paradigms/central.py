"""Centralized LoRA: every device uploads its raw (tokenized) shard, the server trains on the pool.

The upper bound on accuracy and the lower bound on privacy: the upload of every device's data
is a real message, so its bytes are counted like any other paradigm's traffic. The server keeps
what it received (its checkpoints hold the pool), so a resumed run does not upload again.
"""

from __future__ import annotations

import logging

from cotune.data import EncodedDataset
from cotune.errors import CheckpointError, DataError, ProtocolError
from cotune.paradigms.base import Experiment, ParadigmResult, TrainingRole, reply
from cotune.progress import eval_fields
from cotune.runtime import Message, Role
from cotune.runtime.ids import SERVER
from cotune.runtime.node import NodeContext
from cotune.train import StepResult

log = logging.getLogger(__name__)


class DataOwner(Role):
    """A device in the centralized baseline: it only hands over its shard when asked."""

    def __init__(self, ctx: NodeContext):
        super().__init__(ctx.node_id)
        if ctx.data is None:
            raise RuntimeError(f"{ctx.node_id} holds no data")
        self.shard = ctx.data

    def on_get_data(self, msg: Message) -> Message:
        return reply(msg, "data", self.shard.to_tensors(), examples=len(self.shard))


class CentralServer(TrainingRole):
    """The server's own training role: it lives on the driver's node."""

    def receive(self, pool: dict, senders: list[tuple[str, int]]) -> None:
        """Train on the pooled shards (``pool``: tensors; ``senders``: who sent how many)."""
        self.pool = pool
        self.senders = senders
        data = EncodedDataset.from_tensors(pool, self.ctx.task)
        plan = self.ctx.domains  # MoDULA's domain stage: each example's expert is its sender's
        domains = None
        if plan is not None:
            domains = [d for s, n in senders for d in plan.example_experts(s, n)]
        self.set_dataset(data, domains)


def check_upload(msg: Message, *, task: str, vocab: int, classes: int | None, pad_id: int) -> None:
    """A data owner's upload as the server will train on it: integer tensors of one row per
    example, token ids inside the model's vocabulary, class ids among the run's labels, the
    run's pad id and as many examples as its meta says; else a ``ProtocolError`` naming the
    owner and the field (a token id past the vocabulary would stop the run at its first step)."""
    where = msg.describe()
    t = msg.tensors
    try:
        for key, value in t.items():
            if value.is_floating_point() or value.is_complex() or value.dim() != 1:
                raise ProtocolError(f"tensor {key!r} must be a 1-D integer tensor")
        if "lengths" in t and t["lengths"].numel() and int(t["lengths"].min()) < 0:
            raise ProtocolError("tensor 'lengths' holds a negative row length")
        data = EncodedDataset.from_tensors(t, task)
    except (DataError, ProtocolError) as err:
        raise ProtocolError(f"{where}: {err}") from None
    ids = t["input_ids"]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ProtocolError(f"{where}: token ids must lie in [0, {vocab}) (the model's vocabulary)")
    if data.pad_id != pad_id:
        raise ProtocolError(f"{where}: pad id {data.pad_id}, the run's is {pad_id}")
    if classes is not None:
        labels = t["labels"]
        if labels.numel() != len(data) or (
            labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes)
        ):
            raise ProtocolError(
                f"{where}: tensor 'labels' must hold one of {classes} classes per example"
            )
    if msg.meta.get("examples") != len(data):
        raise ProtocolError(
            f"{where}: meta 'examples' says {msg.meta.get('examples')!r}, it holds {len(data)}"
        )


def usable_uploads(uploads: list[Message], exp: Experiment) -> list[Message]:
    """The uploads that pass ``check_upload``; a bad one is logged and left out of the pool (the
    run trains on the others, as a failed reply would leave them)."""
    embeddings = exp.loaded.model.get_input_embeddings()
    names = exp.data.label_names
    classes = len(names) if exp.task == "classification" and names else None
    kept = []
    for m in uploads:
        try:
            check_upload(m, task=exp.task, vocab=int(embeddings.num_embeddings),
                         classes=classes, pad_id=exp.train_set.pad_id)  # fmt: skip
        except ProtocolError as err:
            log.warning("left out of the pool: %s", err)
            continue
        kept.append(m)
    if not kept:
        raise ProtocolError("central: no data owner sent a usable upload")
    return kept


def pool_uploads(messages: list[Message], task: str) -> dict:
    parts = [EncodedDataset.from_tensors(m.tensors, task) for m in messages]
    return EncodedDataset.concat(parts).to_tensors()


def run(exp: Experiment) -> ParadigmResult:
    cfg, grid = exp.cfg, exp.grid
    owners = grid.node_ids("device-")
    for o in owners:
        grid.start(o, DataOwner)
    server = CentralServer(grid.context(SERVER))

    start = 0
    if exp.resume is None:
        asks = [Message("get_data", SERVER, o, {}, {"round": 0}) for o in owners]
        uploads = usable_uploads(grid.request_many(asks, together=True), exp)
        pool = pool_uploads(uploads, exp.task)
        senders = [(m.sender, int(m.meta["examples"])) for m in uploads]
    else:  # uploaded before the checkpoint (its bytes and time are in the restored clock)
        held = exp.resume["extra"].get("pool")
        if held is None:
            raise CheckpointError(
                "--resume: this central checkpoint does not hold the server's pooled data "
                "(written by an older cotune); start the run afresh"
            )
        pool, senders = held["tensors"], [tuple(s) for s in held["senders"]]
    server.receive(pool, senders)
    server.probe_memory()
    if exp.resume is not None:
        server.restore(exp.resume["states"][SERVER])
        start = int(exp.resume["step"])
    held = {"pool": {"tensors": pool, "senders": [list(s) for s in senders]}}

    last_eval: dict[str, float] = {}
    with exp.progress(cfg.train.steps - start, f"central {cfg.name}") as bar:
        step = start

        def stepped(r: StepResult) -> None:  # each step as it completes: the bar moves too
            nonlocal step
            step += 1
            exp.log_record("train", step, SERVER, loss=r.loss, lr=r.lr, grad_norm=r.grad_norm)
            bar.update(1, train_loss=r.loss)

        for point in exp.eval_points():
            if point <= start:
                continue
            server.train_steps(point - step, round=0, on_step=stepped)
            last_eval = exp.evaluate_state(server.state)
            exp.log_record("eval", step, SERVER, **last_eval)
            bar.update(0, **eval_fields(last_eval))
            exp.maybe_checkpoint(step, {SERVER: server.state}, held)
    return ParadigmResult(states={SERVER: server.state}, final_eval=last_eval)
