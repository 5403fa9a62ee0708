"""Secure aggregation in a fedavg round (``paradigm.options.secure_aggregation``; secagg.py).

Around the usual ``train`` exchange the driver runs SecAgg's extra steps as real messages:
``sa_keys`` (public keys up), ``sa_share`` (the neighbours' keys down, encrypted Shamir shares up,
routed by the server into the ``train`` message), the masked update instead of the adapter, and
``sa_unmask`` (who dropped and who survived down, the needed shares up). The server sums the
masked vectors, removes the masks and gets Σ nᵤ·Δᵤ and Σ nᵤ — never a single device's update.
A device that fails after sharing (or sends a malformed masked vector) is a dropout: its
pairwise masks are rebuilt from its neighbours' shares.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from cotune.errors import ProtocolError
from cotune.runtime.ids import SERVER
from cotune.runtime.messages import Message
from cotune.secagg import (
    FIELD,
    Quantizer,
    SecAggClient,
    SecAggServer,
    flatten,
    neighbours,
    unflatten,
)

log = logging.getLogger(__name__)


def _to_wire(y: torch.Tensor) -> torch.Tensor:
    """Z_{2³²} values as int32 (two's complement): 4 bytes each on the wire."""
    return torch.where(y >= FIELD // 2, y - FIELD, y).to(torch.int32)


def _from_wire(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64) % FIELD


class SecureRound:
    """One round's protocol on the driver's side."""

    def __init__(self, grid: Any, opts: Any, rnd: int, seed: int, weighting: str) -> None:
        self.grid, self.opts, self.rnd, self.weighting = grid, opts, rnd, weighting
        self.seed = f"{seed}:{rnd}".encode()
        self.server: SecAggServer | None = None
        self.shared: set[str] = set()

    def setup(self, chosen: list[str]) -> tuple[list[str], dict[str, dict[str, Any]]]:
        """Keys and shares: the devices still in, and each one's ``train`` meta addition."""
        grid, o = self.grid, self.opts
        got = grid.gather(grid.submit_many(
            [Message("sa_keys", SERVER, d, {}, {"round": self.rnd}) for d in chosen], round=self.rnd))  # fmt: skip
        keys = {r.role: [r.message.meta.get("c_pk"), r.message.meta.get("s_pk")]
                for r in got.ok if r.message is not None}  # fmt: skip
        members = sorted(keys)
        nbrs = neighbours(members, o.neighbors, self.seed)
        holders = 1 + min((len(v) for v in nbrs.values()), default=0)
        t = o.threshold or max(2, math.ceil(2 * holders / 3))
        if len(members) < 2 or t > holders:
            raise ProtocolError(
                f"secure aggregation round {self.rnd}: {len(members)} devices answered; "
                f"threshold {t} needs at least {t} holders per secret"
            )
        self.server = SecAggServer(self.rnd, t, keys, nbrs)
        msgs = [Message("sa_share", SERVER, d, {}, {"round": self.rnd, "threshold": t,
                        "nbrs": nbrs[d], "keys": {v: keys[v] for v in [d, *nbrs[d]]}})
                for d in members]  # fmt: skip
        got = grid.gather(grid.submit_many(msgs, round=self.rnd))
        outgoing = {
            r.role: r.message.meta.get("shares", {}) for r in got.ok if r.message is not None
        }
        self.shared = set(outgoing)
        inbox = self.server.route(outgoing)
        sa = {"range": o.range, "bits": o.bits, "weight": self.weighting}
        extra = {d: {"sa": {"in": inbox[d], **sa}} for d in members if d in self.shared}
        return sorted(extra), extra

    def aggregate(
        self, reports: list[Message], glob: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
        """The weighted mean update from the masked reports (None when nothing could be
        unmasked) and the round record's ``secagg_*`` fields."""
        assert self.server is not None
        n = sum(v.numel() for v in glob.values()) + 1
        masked = {}
        for m in reports:
            t = m.tensors.get("masked")
            if (
                m.sender in self.shared
                and t is not None
                and t.dtype == torch.int32
                and t.shape == (n,)
            ):
                masked[m.sender] = _from_wire(t)
        survived = sorted(masked)
        dropped = sorted(self.shared - set(survived))
        got = self.grid.gather(self.grid.submit_many(
            [Message("sa_unmask", SERVER, d, {}, {"round": self.rnd, "dropped": dropped,
                                                  "survived": survived}) for d in survived],
            round=self.rnd))  # fmt: skip
        revealed = {
            r.role: r.message.meta.get("shares", {}) for r in got.ok if r.message is not None
        }
        fields = {"secagg_survived": len(survived), "secagg_dropped": len(dropped)}
        if not survived:
            return None, fields
        try:
            total = self.server.unmasked_sum(masked, revealed, self.shared)
        except ProtocolError as e:  # too many dropped: this round's sum cannot be unmasked
            log.warning("secure aggregation round %d: %s; no update this round", self.rnd, e)
            return None, {**fields, "secagg_failed": 1}
        q = Quantizer(self.opts.range, self.opts.bits)
        summed, weight = q.decode(total)
        if weight <= 0:
            return None, fields
        if weight * ((1 << (q.bits - 1)) - 1) >= FIELD // 2:
            raise ProtocolError(
                f"secure aggregation: {weight} examples overflow {q.bits}-bit values in a "
                "32-bit sum; lower secure_aggregation.bits or use weighting: uniform"
            )
        mean = unflatten((summed / weight).float(), glob)
        return {k: glob[k] + mean[k].to(glob[k].dtype) for k in glob}, fields


class SecAggDevice:
    """The device's handlers (mixed into ``FedDevice``): one ``SecAggClient`` per round."""

    _secagg: dict[int, SecAggClient]

    def on_sa_keys(self, msg: Message) -> Message:
        client = SecAggClient(self.role_id, int(msg.meta["round"]))  # type: ignore[attr-defined]
        self._secagg = {client.round: client}
        return Message("sa_keys_ok", msg.receiver, msg.sender, {}, client.advertise())

    def _client(self, msg: Message) -> SecAggClient:
        client = getattr(self, "_secagg", {}).get(int(msg.meta["round"]))
        if client is None:
            raise ProtocolError(
                f"{msg.receiver}: {msg.kind} for round {msg.meta.get('round')} before sa_keys"
            )
        return client

    def on_sa_share(self, msg: Message) -> Message:
        shares = self._client(msg).share(
            msg.meta["keys"], msg.meta["nbrs"], int(msg.meta["threshold"])
        )
        return Message("sa_shares", msg.receiver, msg.sender, {}, {"shares": shares})

    def secure_report(
        self, tensors: dict[str, torch.Tensor], msg: Message, weight: int
    ) -> dict[str, torch.Tensor]:
        """The masked update (Δ = tensors − the round's global, weighted by ``weight``)."""
        client = self._client(msg)
        sa = msg.meta["sa"]
        client.receive(sa["in"])
        delta = flatten(tensors) - flatten({k: msg.tensors[k] for k in tensors})
        encoded = Quantizer(float(sa["range"]), int(sa["bits"])).encode(delta, weight)
        return {"masked": _to_wire(client.masked(encoded))}

    def on_sa_unmask(self, msg: Message) -> Message:
        client = self._client(msg)
        shares = client.unmask(list(msg.meta["dropped"]), list(msg.meta["survived"]))
        self._secagg = {}
        return Message("sa_revealed", msg.receiver, msg.sender, {}, {"shares": shares})
