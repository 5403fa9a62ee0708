"""The grid a device's roles see on a device process (``DeviceGrid``): their own messages go
to the server (or through it); what only the driver may do (rounds, gathers, starting roles)
is refused, naming it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cotune.errors import PeerUnavailable, ProtocolError
from cotune.runtime.engine import Role
from cotune.runtime.grid import Future, Gathered, Grid, Reply
from cotune.runtime.messages import Message
from cotune.runtime.node import Meter

if TYPE_CHECKING:
    from cotune.deploy.device import DeviceNode


class DeviceGrid(Grid):
    """The grid a device's roles use for their own messages (to the server, or through it)."""

    colocated = False

    def __init__(self, node: DeviceNode) -> None:
        self.node = node

    def send(self, msg: Message, *, codec: str | None = None) -> None:
        self.node.call(msg, codec, request=False)

    def submit(self, msg: Message, *, codec: str | None = None, round: int | None = None) -> Future:
        fut = Future(msg, round)
        try:
            fut._reply = Reply(msg.receiver, "ok", self.node.call(msg, codec, request=True))
        except PeerUnavailable as err:
            fut._reply = Reply(msg.receiver, "failed", error=str(err))
        return fut

    def gather(self, futures: list[Future], *, quorum: int | None = None,
               deadline_s: float | None = None) -> Gathered:  # fmt: skip
        return Gathered([f.result() for f in futures])

    def _not_here(self, what: str) -> Any:
        raise ProtocolError(f"grid.{what} is the server's: a device role cannot call it")

    def node_ids(self, prefix: str = "device-") -> list[str]:
        return self._not_here("node_ids")

    def node_info(self, role_id: str) -> dict[str, Any]:
        return self._not_here("node_info")

    def start(self, role_id: str, factory: Any) -> None:
        self._not_here("start")

    def context(self, role_id: str) -> Any:
        return self._not_here("context")

    def meter(self, role_id: str) -> Meter:
        return self._not_here("meter")

    def tick(self, role_ids: list[str], kind: str, meta: dict[str, Any] | None = None) -> list[Any]:
        return self._not_here("tick")

    def host(self, role: Role) -> None:
        self._not_here("host")

    def snapshot(self, role_id: str) -> Any:
        return self._not_here("snapshot")

    def restore(self, role_id: str, state: Any) -> None:
        self._not_here("restore")

    def measurements(self, role_id: str) -> dict[str, float]:
        return self._not_here("measurements")

    @property
    def transfers(self) -> Any:
        return self._not_here("transfers")

    def add_listener(self, listener: Any) -> None:
        self._not_here("add_listener")
