"""Centralized LoRA: every device uploads its raw (tokenized) shard, the server trains on the pool.

The upper bound on accuracy and the lower bound on privacy: the upload of every device's data
is a real message, so its bytes are counted like any other paradigm's traffic.
"""

from __future__ import annotations

from cotune.data import EncodedDataset
from cotune.paradigms.base import Experiment, ParadigmResult, TrainingRole, reply
from cotune.runtime import Message, Role


class DataOwner(Role):
    """A device in the centralized baseline: it only hands over its shard when asked."""

    def __init__(self, role_id: str, shard: EncodedDataset):
        super().__init__(role_id)
        self.shard = shard

    def on_get_data(self, msg: Message) -> Message:
        return reply(msg, "data", self.shard.to_tensors(), examples=len(self.shard))


class CentralServer(TrainingRole):
    def pool(self, messages: list[Message]) -> EncodedDataset:
        parts = [EncodedDataset.from_tensors(m.tensors, self.exp.task) for m in messages]
        return EncodedDataset.concat(parts)

    def pool_domains(self, messages: list[Message]) -> list[int] | None:
        """Each pooled example's domain expert: its sender's (MoDULA's domain stage)."""
        plan = self.exp.domains
        if plan is None:
            return None
        return [d for m in messages for d in plan.example_experts(m.sender, m.meta["examples"])]


def run(exp: Experiment) -> ParadigmResult:
    cfg = exp.cfg
    server = CentralServer("server", exp, None, seed=cfg.seed)
    exp.engine.register(server)
    owners = []
    for i, idx in enumerate(exp.parts):
        owner = DataOwner(f"device-{i}", exp.train_set.subset(idx))
        exp.engine.register(owner)
        owners.append(owner)

    asks = [Message("get_data", "server", o.role_id, {}, {"round": 0}) for o in owners]
    if exp.resume is None:
        uploads = exp.engine.request_many(asks)
    else:  # uploaded before the checkpoint (its bytes and time are in the restored clock)
        uploads = [o.handle(m) for o, m in zip(owners, asks, strict=True)]
    server.set_dataset(server.pool(uploads), server.pool_domains(uploads))
    exp.sim.memory["server"] = exp.full_model_memory()

    start = 0
    if exp.resume is not None:
        server.restore(exp.resume["states"]["server"])
        start = int(exp.resume["step"])

    last_eval: dict[str, float] = {}
    with exp.progress(cfg.train.steps - start, f"central {cfg.name}") as bar:
        step = start
        for point in exp.eval_points():
            if point <= start:
                continue
            for r in server.train_steps(point - step, round=0):
                step += 1
                exp.log_record("train", step, "server", loss=r.loss, lr=r.lr, grad_norm=r.grad_norm)
                bar.update(1, loss=r.loss)
            last_eval = exp.evaluate_state(server.state)
            exp.log_record("eval", step, "server", **last_eval)
            bar.update(0, **{k: v for k, v in last_eval.items() if k in ("accuracy", "perplexity")})
            exp.maybe_checkpoint(step, {"server": server.state}, {})
    return ParadigmResult(states={"server": server.state}, final_eval=last_eval)
