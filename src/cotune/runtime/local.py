"""In-process engine: roles run in this Python process, but every message is still a message.

The receiver gets what it would decode from the wire (its own tensors, never the sender's,
metadata that went through JSON), and each transfer is counted as the length of the encoded
message — exactly what a network engine would send. With ``wire=True`` (the isolated engine,
which proves the contract) the bytes are written and decoded; otherwise they are only measured
(``runtime.handover``), which gives the same message and length.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from torch.utils._python_dispatch import _disable_current_modes

from cotune.errors import PeerUnavailable, ProtocolError
from cotune.runtime.engine import Engine, Role
from cotune.runtime.handover import hand_over
from cotune.runtime.message_decode import decode_message
from cotune.runtime.messages import Message, encode_message

T = TypeVar("T")


@contextlib.contextmanager
def own_node() -> Iterator[None]:
    """A handler computes on its own node, as it must when it runs in another process: a FLOP
    counter running in the caller (a cloud counting its forward while it asks a device for a
    branch) must not count the handler's work as the caller's, and the caller's grad mode (an
    ``autograd.Function``'s forward runs without grad), inference mode and autocast are not the
    handler's either. Context variables are reset by ``on_own_node``."""
    import torch

    with contextlib.ExitStack() as stack:
        stack.enter_context(_disable_current_modes())
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        for kind in _AUTOCAST_KINDS:
            if torch.is_autocast_enabled(kind):
                stack.enter_context(torch.autocast(kind, enabled=False))
        yield


_AUTOCAST_KINDS = ("cpu", "cuda")


def on_own_node(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in ``own_node()`` and in a fresh context, so the caller's context variables
    (a padding-free block, the inputs a checkpointed block keeps) do not reach it either."""
    return contextvars.Context().run(_in_own_node, fn, *args)


def _in_own_node(fn: Callable[..., T], *args: Any) -> T:
    with own_node():
        return fn(*args)


def build_on_node(factory: Callable[[Any], Role], ctx: Any) -> Role:
    """``factory(ctx)``, built as on its own node whenever it happens (roles are built on first
    use): outside any FLOP counter of the caller, and leaving the caller's random stream as it
    was (a role's memory probe runs a forward that draws dropout masks)."""
    import torch

    rng = torch.get_rng_state()
    try:
        return on_own_node(factory, ctx)
    finally:
        torch.set_rng_state(rng)


class LocalEngine(Engine):
    """Runs each handler synchronously in the caller's thread, in the order of the calls."""

    colocated = True

    def __init__(self, codec: str = "fp32", *, wire: bool = True) -> None:
        super().__init__(codec)
        self.wire = wire

    def _transmit(
        self, msg: Message, codec: str | None, in_reply_to: int | None = None
    ) -> tuple[Message, int]:
        """Encode, count, decode: returns the receiver's copy and the transfer's seq."""
        chosen = self._codec_for(msg, codec)
        if self.wire:
            data = encode_message(msg, chosen)
            received, size = decode_message(data), len(data)
        else:
            received, size = hand_over(msg, chosen)
        transfer = self._record(msg, size, chosen, in_reply_to)
        return self._place(received), transfer.seq

    def _exchange(self, msg: Message, codec: str | None) -> Message | None:
        role = self._receiver(msg)
        delivered, seq = self._transmit(msg, codec)
        if self.on_deliver is not None:
            self.on_deliver(delivered)
        reply = on_own_node(role.handle, delivered)
        if reply is None:
            return None
        return self._answer(role, msg, delivered, reply, seq, codec)

    def _answer(
        self,
        role: Role,
        msg: Message,
        delivered: Message,
        reply: object,
        seq: int,
        codec: str | None,
    ) -> Message:
        """Check ``role``'s reply to ``msg`` and carry it back (or raise PeerUnavailable)."""
        if not isinstance(reply, Message):
            raise ProtocolError(
                f"role {role.role_id!r} answered {msg.describe()} with {type(reply).__name__}, "
                "expected a Message or None"
            )
        if reply.sender != msg.receiver or reply.receiver != msg.sender:
            raise ProtocolError(
                f"role {role.role_id!r} answered {msg.describe()} with a {reply.describe()}; "
                "a reply must go from the receiver back to the sender (use msg.reply(...))"
            )
        if self.before_reply is not None:
            why = self.before_reply(role.role_id, delivered, reply)
            if why is not None:
                raise PeerUnavailable(why)
        received, _ = self._transmit(reply, codec, in_reply_to=seq)
        if self.on_deliver is not None:
            self.on_deliver(received)
        return received

    def request_batch(
        self,
        msgs: Sequence[Message],
        handler: Callable[[list[Message]], Sequence[Message]],
        *,
        codec: str | None = None,
    ) -> list[Message | PeerUnavailable]:
        """Deliver every request, let ``handler`` answer them all at once (colocated roles
        batching their work), carry each reply back. Each message and reply is encoded and
        counted exactly as one ``request`` would; a reply its peer could not send comes back
        as the ``PeerUnavailable`` that one ``request`` would raise."""
        roles = [self._receiver(m) for m in msgs]
        delivered = []
        for m in msgs:
            d, seq = self._transmit(m, codec)
            if self.on_deliver is not None:
                self.on_deliver(d)
            delivered.append((d, seq))
        replies = list(on_own_node(handler, [d for d, _ in delivered]))
        if len(replies) != len(msgs):
            raise ProtocolError(f"a batch handler answered {len(replies)} of {len(msgs)} requests")
        out: list[Message | PeerUnavailable] = []
        for role, m, (d, seq), reply in zip(roles, msgs, delivered, replies):
            try:
                out.append(self._answer(role, m, d, reply, seq, codec))
            except PeerUnavailable as err:
                out.append(err)
        return out

    def send(self, msg: Message, *, codec: str | None = None) -> None:
        reply = self._exchange(msg, codec)
        if reply is not None:
            self._inbox[msg.sender].append(reply)

    def request(self, msg: Message, *, codec: str | None = None) -> Message:
        reply = self._exchange(msg, codec)
        if reply is None:
            raise ProtocolError(
                f"{msg.describe()} was sent as a request but the handler returned no reply"
            )
        return reply
