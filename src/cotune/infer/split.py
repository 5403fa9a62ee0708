"""The U-shaped cut of a decoder for inference (HAT): the device keeps the input blocks (embeddings
and the first ``n_in`` blocks) and the output blocks (the last ``n_out`` blocks, final norm and
head), so raw tokens and the next-token distribution never leave it; the cloud runs the middle.

Both sides keep a key/value cache of their own blocks. They talk only through messages
(``middle`` up: the input blocks' hidden states and the position they start at; ``middle_out``
down: the middle's hidden states), encoded to bytes as on a real link, so the traffic per token
is measured, not estimated. The position sent up doubles as the rollback: the cloud first cuts
its cache back to it, which is how a rejected draft's positions are undone on the cloud.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from cotune.errors import ConfigError, ProtocolError
from cotune.infer.cache import KVCache
from cotune.infer.timeline import FlopMemo
from cotune.models.base import Anatomy
from cotune.runtime.message_decode import decode_message
from cotune.runtime.messages import Message, encode_message
from cotune.runtime.validate import check_activation

if TYPE_CHECKING:
    from cotune.runtime.grid import Grid

DEVICE, CLOUD = "device-0", "server"


@dataclass(frozen=True)
class UCut:
    """Blocks on the device before (``n_in``) and after (``n_out``) the cloud's middle."""

    n_in: int = 1
    n_out: int = 1

    def check(self, num_layers: int) -> None:
        if self.n_in < 1 or self.n_out < 1 or self.n_in + self.n_out >= num_layers:
            raise ConfigError(
                f"infer cut: n_in={self.n_in}, n_out={self.n_out} must each be >= 1 and leave the "
                f"cloud at least one of the model's {num_layers} blocks"
            )


class Blocks:
    """Blocks ``[start, end)`` of a decoder run on new positions against their own cache."""

    def __init__(self, anatomy: Anatomy, start: int, end: int) -> None:
        self.anatomy, self.start, self.end = anatomy, start, end
        self.cache = KVCache()

    def __call__(self, hidden: Tensor, pos: int) -> Tensor:
        """``hidden`` ``[1,q,D]`` at positions ``pos..pos+q-1``; the cache must hold ``pos``."""
        if self.cache.length() != pos:
            raise ProtocolError(
                f"blocks [{self.start}, {self.end}): run at position {pos} but the cache holds "
                f"{self.cache.length()} positions"
            )
        ctx = self.anatomy.decode_context(hidden, pos)
        for i in range(self.start, self.end):
            hidden = self.anatomy.run_block_cached(i, hidden, ctx, self.cache)
        return hidden


class CloudMiddle:
    """The cloud's side: the middle blocks and one cache per device it serves (its session,
    keyed by the sender). ``on_middle`` is its one handler; a device's upload at position 0
    opens a fresh session for it."""

    role_id = CLOUD

    def __init__(self, anatomy: Anatomy, cut: UCut) -> None:
        cut.check(anatomy.num_layers)
        self.anatomy, self.cut = anatomy, cut
        self.sessions: dict[str, Blocks] = {}
        self.flops = FlopMemo()  # kept across requests: counting stops once laws are known

    def session(self, device: str, pos: int) -> Blocks:
        """``device``'s middle blocks, cut back to ``pos`` (a rejected draft's positions undone)."""
        L = self.anatomy.num_layers
        if pos == 0:
            self.sessions[device] = Blocks(self.anatomy, self.cut.n_in, L - self.cut.n_out)
        blocks = self.sessions.get(device)
        held = 0 if blocks is None else blocks.cache.length()
        if blocks is None or not 0 <= pos <= held:
            raise ProtocolError(
                f"middle: position {pos} is beyond the {held} cached positions of {device}"
            )
        blocks.cache.crop(pos)
        return blocks

    def request(self, msg: Message) -> tuple[Tensor, int]:
        """A ``middle`` request's hidden states ``[1,q,D]`` and position, or ProtocolError."""
        pos = msg.meta.get("pos")
        hidden = msg.tensors.get("hidden")
        if not isinstance(pos, int) or isinstance(pos, bool) or hidden is None:
            raise ProtocolError(
                f"middle: needs meta.pos (int) and a [1,q,D] 'hidden', got {msg.describe()}"
            )
        check_activation(f"{msg.describe()}: tensor 'hidden'", hidden,
                         shape=(1, None, self.anatomy.hidden_size))  # fmt: skip
        if hidden.size(1) < 1:
            raise ProtocolError(f"{msg.describe()}: tensor 'hidden' holds no position")
        return hidden, pos

    @torch.no_grad()
    def _answer(self, msg: Message, hidden: Tensor, pos: int) -> Message:
        out = self.session(msg.sender, pos)(hidden, pos)
        return Message("middle_out", CLOUD, msg.sender, {"hidden": out}, {"pos": pos})

    def counted_middle(self, on: bool, msg: Message) -> tuple[Message, int]:
        """``on_middle`` and its FLOPs (0 when ``on`` is false), counted until known."""
        hidden, pos = self.request(msg)
        return self.flops.run(on, ("middle", hidden.size(1)), pos, self._answer, msg, hidden, pos)

    def on_middle(self, msg: Message) -> Message:
        return self._answer(msg, *self.request(msg))


@dataclass
class LinkStats:
    """Messages and encoded bytes each way, and the positions sent up."""

    messages: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    positions_up: int = 0
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (up, down) per exchange
    cloud_flops: list[int] = field(default_factory=list)  # per exchange (when counted)

    def add(self, up: int, down: int, messages: int = 2) -> None:
        """One exchange: ``up`` and ``down`` encoded bytes over ``messages`` messages."""
        self.messages += messages
        self.bytes_up += up
        self.bytes_down += down
        self.sizes.append((up, down))


class MessageLink:
    """The device's line to the cloud: every message encoded and decoded as on a real link
    (in-process: the cloud's handler runs in this process)."""

    def __init__(self, cloud: CloudMiddle, codec: str = "fp32", count_flops: bool = False) -> None:
        self.cloud, self.codec, self.count_flops = cloud, codec, count_flops
        self.stats = LinkStats()

    def request(self, msg: Message) -> Message:
        up = encode_message(msg, self.codec)
        request = decode_message(up)
        reply, flops = self.cloud.counted_middle(self.count_flops, request)
        down = encode_message(reply, self.codec)
        s = self.stats
        s.add(len(up), len(down))
        s.positions_up += int(msg.tensors["hidden"].size(1))
        s.cloud_flops.append(flops)
        return decode_message(down)


class Link(Protocol):
    """The device's line to the cloud: one request, its reply; what went over it."""

    stats: LinkStats

    def request(self, msg: Message) -> Message: ...


class GridLink:
    """The device's line to the cloud role over a Grid (any engine): each exchange is a nested
    request from the device's role. Bytes are the encoded lengths of the very messages sent
    and received (with the link's codec, as the engine encodes them); the cloud's FLOPs are
    its own node's report (0 here). ``on_reply`` sees every reply (its simulated ``arrival``)."""

    def __init__(
        self,
        grid: Grid,
        codec: str = "fp32",
        on_reply: Callable[[Message], None] | None = None,
    ) -> None:
        self.grid, self.codec, self.on_reply = grid, codec, on_reply
        self.stats = LinkStats()

    def request(self, msg: Message) -> Message:
        up = len(encode_message(msg, self.codec))
        reply = self.grid.request(msg, codec=self.codec)
        if self.on_reply is not None:
            self.on_reply(reply)
        s = self.stats
        s.add(up, len(encode_message(reply, self.codec)))
        s.positions_up += int(msg.tensors["hidden"].size(1))
        s.cloud_flops.append(0)
        return reply


class DeviceEnds:
    """The device's input and output blocks of a U-shaped split, each with its cache.
    ``role_id``: who the device is on the link (its messages' sender)."""

    def __init__(self, anatomy: Anatomy, cut: UCut, link: Link, role_id: str = DEVICE) -> None:
        if anatomy.task != "causal_lm":
            raise ConfigError(
                "infer: a U-shaped split generates text: model.task must be causal_lm"
            )
        cut.check(anatomy.num_layers)
        L = anatomy.num_layers
        self.anatomy, self.cut, self.link, self.role_id = anatomy, cut, link, role_id
        self.inputs = Blocks(anatomy, 0, cut.n_in)
        self.outputs = Blocks(anatomy, L - cut.n_out, L)

    @torch.no_grad()
    def input_hidden(self, ids: Tensor, pos: int) -> Tensor:
        """Embeddings + input blocks on ``ids`` ``[1,q]`` at ``pos`` (extends the input cache)."""
        return self.inputs(self.anatomy.embed_at(ids, pos), pos)

    @torch.no_grad()
    def middle(self, hidden: Tensor, pos: int) -> Tensor:
        reply = self.link.request(
            Message("middle", self.role_id, CLOUD, {"hidden": hidden}, {"pos": pos})
        )
        if reply.kind == "middle_error":  # the cloud refused the upload: it says why
            raise ProtocolError(
                f"the cloud refused {self.role_id}'s upload: {reply.meta.get('error')}"
            )
        if reply.kind != "middle_out" or reply.tensors.get("hidden") is None:
            raise ProtocolError(f"expected middle_out from the cloud, got {reply.describe()}")
        return reply.tensors["hidden"]

    @torch.no_grad()
    def output_logits(self, hidden: Tensor, pos: int) -> Tensor:
        """Output blocks + norm + head on the middle's hidden states: logits ``[q, V]``."""
        self.outputs.cache.crop(pos)
        return self.anatomy.run_head(self.outputs(hidden, pos), None)[0]

    def logits(self, ids: Tensor, pos: int) -> Tensor:
        """The full model's logits for ``ids`` at ``pos``, computed across the cut."""
        self.inputs.cache.crop(pos)
        return self.output_logits(self.middle(self.input_hidden(ids, pos), pos), pos)
