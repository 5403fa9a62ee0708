"""Roles and the in-process engine: dispatch, replies, isolation and byte accounting."""

import pytest
import torch

from cotune.errors import ProtocolError
from cotune.runtime import LocalEngine, Message, Role, Transfer, encode_message


class Server(Role):
    def __init__(self) -> None:
        super().__init__("server")
        self.seen: list[torch.Tensor] = []

    def on_update(self, msg: Message) -> Message:
        x = msg.tensors["x"]
        self.seen.append(x)
        x.mul_(100)  # the receiver may scribble on what it got
        return msg.reply("ack", {"y": x.sum().reshape(1)}, {"round": msg.meta.get("round")})

    def on_note(self, msg: Message) -> None:
        return None

    def on_echo(self, msg: Message) -> Message:
        return msg.reply("echo", msg.tensors, msg.meta)

    def on_misaddressed(self, msg: Message) -> Message:
        return Message("ack", "server", "someone-else")


def _engine(codec: str = "fp32") -> LocalEngine:
    eng = LocalEngine(codec=codec)
    eng.register(Server())
    return eng


def test_request_returns_reply_and_counts_encoded_bytes() -> None:
    eng = _engine()
    seen: list[Transfer] = []
    eng.add_listener(seen.append)
    msg = Message("update", "device-0", "server", {"x": torch.ones(4)}, {"round": 3, "step": 9})
    reply = eng.request(msg)
    assert reply.kind == "ack" and reply.receiver == "device-0"
    assert reply.tensors["y"].item() == 400.0
    req, rep = eng.transfers
    assert seen == eng.transfers
    assert req.nbytes == len(encode_message(msg)) and rep.in_reply_to == req.seq
    assert (req.sender, req.receiver, req.kind, req.codec) == (
        "device-0",
        "server",
        "update",
        "fp32",
    )
    assert req.round == 3 and req.step == 9 and rep.round == 3 and rep.step is None
    by = eng.bytes_by_role()
    assert by["device-0"] == {"up": req.nbytes, "down": rep.nbytes}
    assert by["server"] == {"up": rep.nbytes, "down": req.nbytes}
    assert eng.total_bytes() == req.nbytes + rep.nbytes


def test_receiver_gets_an_independent_copy() -> None:
    eng = _engine()
    x = torch.ones(4)
    eng.request(Message("update", "device-0", "server", {"x": x}))
    assert torch.equal(x, torch.ones(4))
    assert eng.roles["server"].seen[0].data_ptr() != x.data_ptr()


def test_request_many_keeps_order() -> None:
    eng = _engine()
    msgs = [
        Message("echo", f"device-{i}", "server", {"v": torch.tensor([i])}, {"i": i})
        for i in range(4)
    ]
    replies = eng.request_many(msgs)
    assert [r.meta["i"] for r in replies] == [0, 1, 2, 3]
    assert [r.receiver for r in replies] == [f"device-{i}" for i in range(4)]
    assert len(eng.transfers) == 8


def test_send_queues_reply_in_inbox_and_none_is_fine() -> None:
    eng = _engine()
    eng.send(Message("note", "device-1", "server"))
    assert eng.pull("device-1") == []
    eng.send(Message("echo", "device-1", "server", {}, {"k": 1}))
    (got,) = eng.pull("device-1")
    assert got.meta == {"k": 1} and eng.pull("device-1") == []
    assert len(eng.transfers) == 3


def test_request_without_reply_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="no reply"):
        _engine().request(Message("note", "device-1", "server"))


def test_misaddressed_reply() -> None:
    with pytest.raises(ProtocolError, match="back to the sender"):
        _engine().request(Message("misaddressed", "device-1", "server"))


def test_unknown_receiver_and_kind() -> None:
    eng = _engine()
    with pytest.raises(ProtocolError, match="registered roles: server"):
        eng.request(Message("update", "device-0", "nobody"))
    with pytest.raises(ProtocolError, match="kinds it handles: echo, misaddressed, note, update"):
        eng.request(Message("dance", "device-0", "server"))
    with pytest.raises(ProtocolError, match="already registered"):
        eng.register(Server())


def test_codec_default_argument_and_meta_override() -> None:
    x = torch.randn(256)
    sizes = {}
    for label, eng_codec, arg, meta in [
        ("default32", "fp32", None, {}),
        ("default16", "fp16", None, {}),
        ("arg", "fp32", "bf16", {}),
        ("meta", "fp16", "bf16", {"codec": "fp32"}),
    ]:
        eng = _engine(eng_codec)
        eng.request(Message("echo", "d", "server", {"x": x}, meta), codec=arg)
        req, rep = eng.transfers
        assert req.codec == rep.codec
        sizes[label] = (req.codec, req.nbytes)
    assert sizes["default32"][0] == "fp32" and sizes["default16"][0] == "fp16"
    assert sizes["arg"][0] == "bf16" and sizes["meta"][0] == "fp32"
    assert sizes["default32"][1] - sizes["default16"][1] >= 2 * 256 - 16
    with pytest.raises(ProtocolError, match="unknown codec"):
        LocalEngine(codec="int3")


class Observer(Role):
    """Answers with what it saw of its thread's state while handling."""

    def __init__(self) -> None:
        super().__init__("observer")

    def on_look(self, msg: Message) -> Message:
        from cotune.accel.compute import _KEPT
        from cotune.models import packing

        return msg.reply("seen", {}, {
            "grad": torch.is_grad_enabled(),
            "inference": torch.is_inference_mode_enabled(),
            "autocast": torch.is_autocast_enabled("cpu"),
            "padding_free": packing.requested(),
            "kept": _KEPT.get() is not None,
        })  # fmt: skip


FRESH = {"grad": True, "inference": False, "autocast": False, "padding_free": False,
         "kept": False}  # fmt: skip


def test_a_handler_runs_as_on_its_own_node_whatever_the_caller_is_doing() -> None:
    """A nested request made under the caller's no_grad, inference mode, autocast, a
    padding-free block and a checkpoint probe: the handler sees none of it (as it cannot when
    it runs in another process), and the caller's own state is back after the call."""
    from cotune.accel.compute import kept_for_checkpoint
    from cotune.models.packing import padding_free, requested

    eng = LocalEngine()
    eng.register(Observer())
    ask = Message("look", "device-0", "observer")
    assert eng.request(ask).meta == FRESH
    for caller in (
        torch.no_grad,
        torch.inference_mode,
        lambda: torch.autocast("cpu", dtype=torch.bfloat16),
        padding_free,
        kept_for_checkpoint,
    ):
        with caller():
            before = (torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), requested())
            assert eng.request(ask).meta == FRESH
            batch = eng.request_batch(
                [ask], lambda ms: [m.reply("seen", {}, Observer().on_look(m).meta) for m in ms]
            )
            assert batch[0].meta == FRESH
            assert (
                torch.is_grad_enabled(),
                torch.is_autocast_enabled("cpu"),
                requested(),
            ) == before


def test_a_handler_called_from_inside_an_autograd_function_forward_has_grad() -> None:
    """dlora's cloud asks a device for its LoRA branch from inside a custom Function's forward,
    where autograd turns grad off; on the device (another process) it is on."""
    eng = LocalEngine()
    eng.register(Observer())
    seen = {}

    class Remote(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            seen.update(eng.request(Message("look", "cloud", "observer")).meta)
            return x * 2

        @staticmethod
        def backward(ctx, g):  # noqa: ANN001, ANN205
            return g * 2

    Remote.apply(torch.ones(2, requires_grad=True)).sum().backward()
    assert seen == FRESH
