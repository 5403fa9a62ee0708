"""Clustered federated fine-tuning: one adapter per cluster of devices, so devices whose data
differ stop pulling one adapter in opposite directions.

- ``assign: ifca`` (Ghosh et al., "An Efficient Framework for Clustered Federated Learning",
  NeurIPS 2020): every ``every`` rounds a sampled device is sent all cluster adapters (K times
  the bytes), computes each one's loss on one batch of its own data (counted FLOPs), trains the
  best and says which it chose; between those rounds it gets its cluster's adapter only.
- ``assign: updates`` (in the spirit of Sattler et al.'s clustered FL): every ``every`` rounds
  the server groups the devices it has seen by the cosine similarity of their last updates
  (spherical k-means, seeded); nothing extra travels.

The first round's clusters are drawn at random (seeded): all adapters start from the same
initial values (a LoRA's B is zero), so only training on different devices tells them apart.
Each cluster is aggregated on its own (``aggregator`` per cluster); each device is evaluated
with its cluster's adapter (``per_device_eval``), every cluster adapter as ``cluster-k``.
"""

from __future__ import annotations

import numpy as np
import torch

from cotune.aggregation import get_aggregator
from cotune.flops import flop_counter
from cotune.paradigms.base import Experiment, ParadigmResult, mean, screen_updates, state_tensors
from cotune.paradigms.fedavg import num_rounds, steps_per_round
from cotune.paradigms.federated import FedDevice, RoundTraffic, log_mean_losses, sample_round
from cotune.paradigms.options import ClusteredOptions, parse_options
from cotune.runtime import Message
from cotune.runtime.ids import SERVER


def _tag(k: int, name: str) -> str:
    return f"c{k}|{name}"


class ClusterDevice(FedDevice):
    options_model = ClusteredOptions
    cluster: int | None = None

    def begin_round(self, msg: Message) -> None:
        k = msg.meta.get("choose")
        if k is not None:  # IFCA: every cluster's adapter came; keep the best on my data
            self.cluster = self._choose(msg, int(k))
            own = {n.split("|", 1)[1]: v for n, v in msg.tensors.items()
                   if n.startswith(f"c{self.cluster}|")}  # fmt: skip
            msg = Message(msg.kind, msg.sender, msg.receiver, own, msg.meta)
        else:
            self.cluster = int(msg.meta["cluster"])
        super().begin_round(msg)

    def _choose(self, msg: Message, count: int) -> int:
        assert self.dataset is not None and self.sampler is not None
        batch = self.dataset.batch(self.sampler.next_indices())
        losses = []
        flops = 0
        with self.ctx.model.trainer.activate(self.state) as st, torch.no_grad():
            for k in range(count):
                for name, p in st.params.items():
                    p.copy_(msg.tensors[_tag(k, name)])
                with flop_counter() as mode:
                    losses.append(float(self.loss_fn(batch)))
                flops += int(mode.get_total_flops())
        self.ctx.meter.compute(flops, round=int(msg.meta["round"]), label="choose cluster")
        return int(np.argmin(losses))

    def report(self, msg: Message, results: list) -> Message:
        out = super().report(msg, results)
        out.meta["cluster"] = self.cluster
        return out


def _kmeans(vectors: torch.Tensor, k: int, seed: int, iters: int = 20) -> list[int]:
    """Spherical k-means: the cluster of each row (rows normalised to unit length)."""
    x = torch.nn.functional.normalize(vectors.float(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(x.size(0), generator=gen)[:k]].clone()
    labels = torch.zeros(x.size(0), dtype=torch.long)
    for _ in range(iters):
        labels = (x @ centres.T).argmax(dim=1)
        for j in range(k):
            members = x[labels == j]
            if len(members):
                centres[j] = torch.nn.functional.normalize(members.mean(0), dim=0)
    return labels.tolist()


def run(exp: Experiment) -> ParadigmResult:
    cfg, grid = exp.cfg, exp.grid
    opts = parse_options(ClusteredOptions, cfg.paradigm.options)
    devices = grid.node_ids("device-")
    for d in devices:
        grid.start(d, ClusterDevice)
    k_count = opts.clusters
    states = [
        exp.trainer.new_state(cfg.seed + 7919 * k, exp.initial_params()) for k in range(k_count)
    ]
    aggs = [get_aggregator(opts.aggregator, **opts.aggregator_options) for _ in range(k_count)]
    rng = np.random.default_rng([cfg.seed, 0xC1])
    assignment = {d: int(rng.integers(k_count)) for d in devices}
    last_update: dict[str, torch.Tensor] = {}
    rounds, spr = num_rounds(exp, opts), steps_per_round(exp, opts, devices)
    start = 0
    if exp.resume is not None:
        ex = exp.resume["extra"]
        states = [exp.resume["states"][f"cluster-{k}"] for k in range(k_count)]
        assignment, start = dict(ex["assignment"]), int(ex["round"])
        for agg, sd in zip(aggs, ex["aggregators"]):
            agg.load_state_dict(sd)
        for d in devices:
            grid.restore(d, exp.resume["states"].get(d))
    every = cfg.eval.every
    last_eval: dict[str, float] = {}
    per_device: dict[str, dict[str, float]] = {}
    with exp.progress(rounds - start, f"clustered {cfg.name}", unit="round") as bar:
        for rnd in range(start + 1, rounds + 1):
            step = rnd * spr
            chosen = sample_round(grid, devices, rnd, cfg.seed,
                                  clients_per_round=opts.clients_per_round, fraction=opts.fraction)  # fmt: skip
            traffic = RoundTraffic(grid)
            reassign = rnd > 1 and (rnd - 1) % opts.every == 0
            base = {"round": rnd, "schedule_step": (rnd - 1) * spr}
            msgs = []
            for d in chosen:
                if opts.assign == "ifca" and reassign:
                    tensors = {_tag(k, n): v for k, st in enumerate(states)
                               for n, v in exp.role_tensors(d, state_tensors(st)).items()}  # fmt: skip
                    msgs.append(Message("train", SERVER, d, tensors, {**base, "choose": k_count}))
                else:
                    st = states[assignment[d]]
                    msgs.append(Message("train", SERVER, d, exp.role_tensors(d, state_tensors(st)),
                                        {**base, "cluster": assignment[d]}))  # fmt: skip
            done = grid.gather(grid.submit_many(msgs, round=rnd), quorum=opts.quorum,
                               deadline_s=opts.deadline_s)  # fmt: skip
            reports = [r.message for r in done.ok if r.message is not None]
            claims = {m.sender: m.meta.get("cluster") for m in reports}
            good, rejected = screen_updates(
                [m for m in reports if isinstance(claims[m.sender], int) and 0 <= claims[m.sender] < k_count],
                lambda d, c=claims: exp.role_tensors(d, state_tensors(states[c[d]])),
            )  # fmt: skip
            for k in range(k_count):
                mine = [m for m in good if m.meta["cluster"] == k]
                if len(mine) < opts.min_reports:
                    continue
                w = [
                    float(m.meta["examples"]) if opts.weighting == "examples" else 1.0 for m in mine
                ]
                ref = state_tensors(states[k])
                for m in mine:
                    last_update[m.sender] = torch.cat([(m.tensors[n].float() - ref[n].float()).reshape(-1)
                                                       for n in sorted(ref)])  # fmt: skip
                new = aggs[k].aggregate(ref, [m.tensors for m in mine], w)
                exp.meter.compute(3.0 * sum(v.numel() for v in new.values()) * len(mine),
                                  after=done.closed_at, label="aggregate")  # fmt: skip
                with torch.no_grad():
                    for n, v in new.items():
                        states[k].params[n].copy_(v)
            for m in good:
                assignment[m.sender] = int(m.meta["cluster"])
            if opts.assign == "updates" and reassign and len(last_update) >= k_count:
                seen = sorted(last_update)
                labels = _kmeans(
                    torch.stack([last_update[d] for d in seen]), k_count, cfg.seed + rnd
                )
                assignment.update(dict(zip(seen, labels)))
            losses = [m.meta["losses"] for m in good]
            log_mean_losses(exp, losses, (rnd - 1) * spr + 1, rnd)
            sizes = [sum(1 for c in assignment.values() if c == k) for k in range(k_count)]
            exp.log_record("round", step, SERVER, round=rnd, participants=len(chosen),
                           reported=len(good), rejected=len(rejected), cluster_sizes=sizes,
                           **traffic.record(chosen))  # fmt: skip
            if step // every > (step - spr) // every or rnd == rounds:
                per_cluster = {k: exp.evaluate_state(st) for k, st in enumerate(states)}
                for k, ev in per_cluster.items():
                    exp.log_record("eval", step, f"cluster-{k}", round=rnd, **ev)
                per_device = {d: per_cluster[assignment[d]] for d in devices}
                last_eval = {m: mean([ev[m] for ev in per_device.values()]) for m in per_cluster[0]}
                exp.log_record("eval", step, "mean", round=rnd, **last_eval)
            bar.update(1, **{f"eval_{k}": v for k, v in last_eval.items() if k != "examples"})
            exp.maybe_checkpoint(
                step,
                lambda: {**{f"cluster-{k}": st for k, st in enumerate(states)}, **grid.snapshots(devices)},
                {"round": rnd, "assignment": dict(assignment),
                 "aggregators": [a.state_dict() for a in aggs]},
            )  # fmt: skip
    if not last_eval:
        per_cluster = {k: exp.evaluate_state(st) for k, st in enumerate(states)}
        per_device = {d: per_cluster[assignment[d]] for d in devices}
        last_eval = {m: mean([ev[m] for ev in per_device.values()]) for m in per_cluster[0]}
    return ParadigmResult(
        states={f"cluster-{k}": st for k, st in enumerate(states)},
        final_eval=last_eval,
        extra={"rounds": rounds, "clusters": dict(assignment), "per_device_eval": per_device,
               "cluster_sizes": [sum(1 for c in assignment.values() if c == k)
                                 for k in range(k_count)]},
    )  # fmt: skip


__all__ = ["ClusterDevice", "run"]
