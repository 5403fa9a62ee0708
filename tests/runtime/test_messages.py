"""Encoded form of messages: exact round trips, codecs, and every kind of damage."""

import struct

import pytest
import torch

from cotune.errors import ProtocolError
from cotune.runtime import Message, decode_message, encode_message
from cotune.runtime.codecs import Codec, get_codec, register_codec
from cotune.runtime.messages import HEADER_SIZE, checksum


def _msg(**tensors: torch.Tensor) -> Message:
    return Message("update", "device-3", "server", tensors, {"round": 2, "step": 7, "note": "hi"})


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _sample() -> Message:
    g = torch.Generator().manual_seed(0)
    return _msg(
        w=torch.randn(6, 5, generator=g),
        wt=torch.randn(5, 6, generator=g).t(),  # non-contiguous
        d=torch.randn(3, generator=g, dtype=torch.float64),
        ids=torch.arange(-4, 8, dtype=torch.int64).reshape(3, 4),
        i8=torch.tensor([-128, 0, 127], dtype=torch.int8),
        mask=torch.tensor([[True, False], [False, True]]),
        scalar=torch.tensor(3.25),
        special=torch.tensor([float("nan"), float("inf"), -0.0]),
        empty=torch.zeros(0, 4),
        bf=torch.randn(4, generator=g).to(torch.bfloat16),
    )


def test_fp32_round_trip_is_bitwise() -> None:
    msg = _sample()
    out = decode_message(encode_message(msg))
    assert (out.kind, out.sender, out.receiver, out.meta) == (
        msg.kind,
        msg.sender,
        msg.receiver,
        msg.meta,
    )
    assert list(out.tensors) == list(msg.tensors)
    for name, t in msg.tensors.items():
        o = out.tensors[name]
        assert o.dtype == t.dtype and o.shape == t.shape, name
        assert torch.equal(_bits(o), _bits(t)), name


def test_empty_message_and_nested_meta() -> None:
    msg = Message("ping", "server", "device-0", {}, {"a": [1, 2.5, None], "b": {"c": "é"}})
    out = decode_message(encode_message(msg))
    assert out.tensors == {} and out.meta == msg.meta


def test_a_messages_size_does_not_depend_on_its_float_values() -> None:
    # Two runs equal to float precision (a cohort vs one device at a time) must count the same
    # bytes: floats go at a fixed width, and every float64 still comes back exactly.
    values = [0.1, 1 / 3, -2.5e-300, 1e300, 0.0, -0.0, 5e-324, 123456.789, -7.0]
    sizes = set()
    for v in values:
        msg = Message("update", "device-0", "server", {}, {"loss": v, "losses": [v, -v]})
        data = encode_message(msg)
        sizes.add(len(data))
        out = decode_message(data).meta
        assert out["loss"] == v and str(out["loss"]) == str(v) and out["losses"] == [v, -v]
    assert len(sizes) == 1


def test_same_tensor_twice_and_views_encode() -> None:
    base = torch.randn(4, 4)
    out = decode_message(encode_message(_msg(a=base, b=base, row=base[1])))
    assert torch.equal(out.tensors["a"], base) and torch.equal(out.tensors["b"], base)
    assert torch.equal(out.tensors["row"], base[1])


def test_decoded_tensors_are_writable_and_independent() -> None:
    src = torch.ones(3)
    out = decode_message(encode_message(_msg(x=src)))
    out.tensors["x"].add_(1)
    assert torch.equal(src, torch.ones(3))


@pytest.mark.parametrize(("codec", "bound"), [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_cast_codecs_halve_bytes_and_stay_within_bound(codec: str, bound: float) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 64, generator=g)
    ids = torch.arange(10)
    msg = _msg(x=x, ids=ids)
    full, half = encode_message(msg, "fp32"), encode_message(msg, codec)
    out = decode_message(half)
    assert out.tensors["x"].dtype == torch.float32
    assert torch.equal(out.tensors["ids"], ids)  # integers are never cast
    rel = ((out.tensors["x"] - x).abs() / x.abs()).max().item()
    assert rel <= bound
    assert get_codec(codec).rel_error_bound == bound
    body_saving = len(full) - len(half)
    assert abs(body_saving - x.numel() * 2) < 64  # only JSON codec names differ slightly


def test_fp16_overflow_is_an_error() -> None:
    with pytest.raises(ProtocolError, match="bf16"):
        encode_message(_msg(x=torch.tensor([1e6])), "fp16")


def test_unknown_codec() -> None:
    with pytest.raises(ProtocolError, match="registered codecs: .*fp16"):
        encode_message(_msg(x=torch.ones(1)), "int3")


def test_bad_kind_and_meta() -> None:
    with pytest.raises(ProtocolError, match="kind"):
        Message("Bad-Kind", "a", "b")
    with pytest.raises(ProtocolError, match="JSON"):
        encode_message(Message("x", "a", "b", {}, {"obj": object()}))


@pytest.mark.parametrize("where", ["magic", "header", "json", "body", "crc"])
def test_any_flipped_byte_is_detected(where: str) -> None:
    data = bytearray(encode_message(_sample()))
    js_len = struct.unpack_from("<I", data, 8)[0]
    pos = {
        "magic": 0,
        "header": 5,
        "json": HEADER_SIZE + js_len // 2,
        "body": len(data) - 40,
        "crc": len(data) - 2,
    }[where]
    data[pos] ^= 0x5A
    with pytest.raises(ProtocolError):
        decode_message(bytes(data))


def test_crc_error_names_kind_and_sender() -> None:
    data = bytearray(encode_message(_sample()))
    data[-40] ^= 1
    with pytest.raises(ProtocolError, match=r"'update' from 'device-3'.*CRC32C"):
        decode_message(bytes(data))


def test_truncation_at_several_points() -> None:
    data = encode_message(_sample())
    for n in (0, 3, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 10, len(data) // 2, len(data) - 1):
        with pytest.raises(ProtocolError, match="truncated"):
            decode_message(data[:n])


def test_trailing_bytes_and_wrong_magic() -> None:
    data = encode_message(_sample())
    with pytest.raises(ProtocolError, match="3 trailing bytes"):
        decode_message(data + b"xyz")
    with pytest.raises(ProtocolError, match="not a cotune message"):
        decode_message(b"PK\x03\x04" + data[4:])


def test_unknown_codec_in_header_is_a_protocol_error() -> None:
    # Re-frame a valid message whose JSON names a codec this process does not know.

    data = encode_message(_msg(x=torch.ones(2)), "fp16")
    patched = data[:-4].replace(b'"codec":"fp16","dtype"', b'"codec":"fp99","dtype"')
    assert patched != data[:-4]
    patched += struct.pack("<I", checksum(patched))
    with pytest.raises(ProtocolError, match="unknown codec 'fp99'"):
        decode_message(patched)


def test_format_1_messages_with_zlib_crc32_are_still_read() -> None:
    data = encode_message(_msg(x=torch.arange(6.0)), "fp32")
    old = bytearray(data[:-4])
    struct.pack_into("<H", old, 4, 1)  # the version field
    old += struct.pack("<I", checksum(bytes(old), version=1))
    assert torch.equal(decode_message(bytes(old)).tensors["x"], torch.arange(6.0))
    old[-1] ^= 0xFF
    with pytest.raises(ProtocolError, match=r"checksum \(CRC32\) mismatch"):
        decode_message(bytes(old))


class _HalfAndScale(Codec):
    """A toy two-part codec with side data, standing in for int8 per-channel later."""

    name = "toy_scaled"
    rel_error_bound = 2.0**-11

    def encode(self, tensor):
        scale = tensor.abs().amax().clamp_min(1e-12)
        return {"q": (tensor / scale).half(), "scale": scale.reshape(1)}, {"axis": None}

    def decode(self, parts, side, dtype, shape):
        assert side == {"axis": None}
        return (parts["q"].to(dtype) * parts["scale"].to(dtype)).reshape(shape)


def test_registered_codec_with_parts_and_side_data() -> None:
    register_codec(_HalfAndScale(), replace=True)
    x = torch.randn(8, 3)
    out = decode_message(encode_message(_msg(x=x, n=torch.arange(3)), "toy_scaled"))
    torch.testing.assert_close(out.tensors["x"], x, rtol=1e-3, atol=1e-3)
    assert torch.equal(out.tensors["n"], torch.arange(3))


def test_the_header_document_is_wire_json_of_the_whole_document():
    """``wire_parts`` assembles the header from cached pieces; it must equal encoding the
    document in one go, for plain and lossy codecs, odd metadata and repeated messages."""
    import json as _json

    from cotune.runtime.messages import _wire_tensors, finite_or_none, wire_json, wire_parts

    msgs = [
        Message("activations", "device-1", "server",
                {"hidden": torch.randn(2, 3, 4), "labels": torch.tensor([1, 0])},
                {"step": 3, "loss": float("nan"), "nested": {"a": [1, 2.5, None]}}),
        Message("norm", "device-2", "server", {}, {"device_sq": 0.25}),
        Message("update", "device-3", "server", {"w": torch.randn(5, 5)}, {"round": 1}),
    ]  # fmt: skip
    for codec in ("fp32", "fp16", "int8", "topk0.5"):
        for msg in msgs + msgs:  # the second time from the caches
            js, _ = wire_parts(msg, codec)
            entries, _ = _wire_tensors(msg, codec)
            doc = {"kind": msg.kind, "sender": msg.sender, "receiver": msg.receiver,
                   "codec": codec, "meta": finite_or_none(msg.meta), "tensors": entries}  # fmt: skip
            assert js == wire_json(doc).encode()
            assert _json.loads(js)["meta"] == _json.loads(wire_json(finite_or_none(msg.meta)))


def test_decoded_tensors_own_their_memory_whatever_the_input_buffer():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    data = bytearray(encode_message(Message("k", "server", "device-0", {"x": t}), "fp32"))
    for received in (bytes(data), memoryview(data), data):
        got = decode_message(received).tensors["x"]
        got.add_(1)  # writable
        assert torch.equal(decode_message(bytes(data)).tensors["x"], t)
    got = decode_message(memoryview(data)).tensors["x"]
    data[-40:-4] = bytes(36)  # the sender's buffer reused: what was decoded stays
    assert torch.equal(got, t)
