"""``RemoteRole``: the server's proxy for a role that lives on a device process; every call
(a local event, a snapshot, a restore, the measurement channel) is a control frame on its
node's stream, and what comes back is checked before the run uses it."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from cotune.deploy.frames import (
    MEASURE,
    RESTORE,
    SNAPSHOT,
    TICK,
)
from cotune.deploy.states import check_state, dump_state, load_state
from cotune.errors import PeerUnavailable, ProtocolError
from cotune.runtime.engine import Role
from cotune.runtime.messages import Message
from cotune.runtime.validate import finite_number

if TYPE_CHECKING:
    from cotune.deploy.server import GrpcEngine

log = logging.getLogger(__name__)


class RemoteRole(Role):
    """A role that lives on a device process; every call is a frame on its node's stream."""

    def __init__(self, role_id: str, engine: GrpcEngine, factory: str) -> None:
        super().__init__(role_id)
        self.engine, self.factory = engine, factory
        self.last_state: Any = None  # its state as last seen (checkpoints of a gone device)

    def handle(self, msg: Message) -> Message | None:
        raise ProtocolError(f"{self.role_id} is remote: messages go through the engine")

    def local_event(self, kind: str, meta: dict[str, Any]) -> Any:
        done = self.engine.control(self.role_id, TICK, {"kind": kind, "meta": meta})
        return done.header.get("result")

    def snapshot(self, *, if_built: bool = False) -> Any:
        """Its state, read from its node (``if_built``: None for a role its node has not built
        yet, or one away before it was ever read: it starts afresh, as checkpoints say)."""
        if self.engine.links_seen.get(self.role_id, True) is None:
            return None  # it never joined: no state to read (checkpoints leave it out)
        try:
            done = self.engine.control(self.role_id, SNAPSHOT, {"if_built": if_built})
            if done.header.get("none"):
                return None
            state = load_state(done.payload)
            check_state(state)
            self.last_state = state
        except PeerUnavailable:
            if self.last_state is None and not if_built:
                raise
            log.warning("%s is away: its last known state stands in", self.role_id)
        except ProtocolError as err:  # a bad state never reaches an evaluation or checkpoint
            if self.last_state is None and not if_built:
                raise PeerUnavailable(f"{self.role_id} sent a bad state: {err}") from None
            log.warning(
                "%s sent a bad state (%s): %s", self.role_id, err,
                "its last known state stands in" if self.last_state is not None
                else "left out (it starts afresh on resume)",
            )  # fmt: skip
        return self.last_state

    def snapshot_if_built(self) -> Any:
        return self.snapshot(if_built=True)

    def restore(self, state: Any) -> None:
        self.last_state = state
        self.engine.control(self.role_id, RESTORE, {}, dump_state(state))

    def measurements(self) -> dict[str, float]:
        try:
            values = self.engine.control(self.role_id, MEASURE, {}).header.get("values", {})
        except PeerUnavailable:
            return {}  # host measurements of a node that is away: none
        if not isinstance(values, dict):
            values = {"": values}
        kept = {
            str(k): float(v) for k, v in values.items() if finite_number(v)
        }  # a peer's measurements: numbers only (others are logged and left out)
        if len(kept) != len(values):
            log.warning("%s reported measurements that are not numbers: left out", self.role_id)
        return kept
