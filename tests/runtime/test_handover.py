"""The local engine hands a message over without writing its bytes: the receiver's copy and the
counted length must equal what the wire gives (``decode_message(encode_message(...))``)."""

import math

import pytest
import torch

from cotune.runtime.handover import hand_over
from cotune.runtime.message_decode import decode_message
from cotune.runtime.messages import Message, encode_message


def messages():
    g = torch.Generator().manual_seed(0)
    act = torch.randn(4, 7, 16, generator=g)
    yield Message("activations", "device-0", "server",
                  {"hidden": act, "attention_mask": torch.ones(4, 7, dtype=torch.long),
                   "labels": torch.tensor([0, 2, 1, 1])},
                  {"step": 3, "round": 1, "device_reg": 0.1 + 0.2, "loss": math.nan,
                   "pair": (1, 2.5), 7: "int key", "nested": {"x": [1e-300, -0.0]}})  # fmt: skip
    yield Message("update", "device-1", "server",
                  {"a": torch.randn(8, 3, generator=g).to(torch.bfloat16),
                   "b": torch.randn(3, generator=g).half(), "empty": torch.zeros(0, 5),
                   "flag": torch.tensor([True, False])}, {})  # fmt: skip
    same = torch.randn(5, generator=g)
    yield Message("twice", "server", "device-2", {"x": same, "y": same}, {"k": 1})
    yield Message("grad", "server", "device-0", {"grad": act[:2, :3]}, {"s": 1})  # a view


@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "int8", "topk0.25"])
def test_a_handed_over_message_is_the_decoded_wire_message_and_its_length(codec):
    for msg in messages():
        data = encode_message(msg, codec)
        want = decode_message(data)
        for _ in range(2):  # the second time the body's length comes from the memo
            got, size = hand_over(msg, codec)
            assert size == len(data)
            assert (got.kind, got.sender, got.receiver) == (want.kind, want.sender, want.receiver)
            assert got.meta == want.meta
            assert list(got.tensors) == list(want.tensors)
            for k, t in want.tensors.items():
                assert got.tensors[k].dtype == t.dtype and got.tensors[k].shape == t.shape
                assert torch.equal(got.tensors[k], t), (codec, msg.kind, k)
                assert got.tensors[k].is_contiguous()


def test_the_receiver_owns_its_tensors():
    msg = next(messages())
    got, _ = hand_over(msg)
    for k, t in msg.tensors.items():
        assert got.tensors[k].untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
    got.tensors["hidden"].add_(1.0)  # writing the copy leaves the sender's tensor alone
    assert not torch.equal(got.tensors["hidden"], msg.tensors["hidden"])
    assert got.meta["pair"] == [1, 2.5] and got.meta["loss"] is None  # went through JSON


def test_a_message_the_wire_refuses_is_refused_the_same_way():
    from cotune.errors import ProtocolError

    bad = Message("m", "a", "b", {"x": torch.zeros(2)}, {"obj": object()})
    with pytest.raises(ProtocolError, match="meta is not JSON-serialisable"):
        encode_message(bad)
    with pytest.raises(ProtocolError, match="meta is not JSON-serialisable"):
        hand_over(bad)
