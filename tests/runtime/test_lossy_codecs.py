"""int8 and top-k codecs: bounds, byte savings on a real-sized activation, edge cases, names."""

from __future__ import annotations

import pytest
import torch

from cotune.errors import ProtocolError
from cotune.runtime import Message, decode_message, encode_message
from cotune.runtime.codecs import get_codec
from cotune.runtime.messages import checksum
from cotune.runtime.validate import check_activation

ACT_SHAPE = (8, 128, 384)  # batch x tokens x MiniLM hidden size


def _act(seed: int = 0) -> torch.Tensor:
    """Activation-like: heavy-ish tails and a few outlier features, as in real hidden states."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ACT_SHAPE, generator=g) * torch.rand(ACT_SHAPE[-1], generator=g).add(0.2)
    x[..., [7, 100]] *= 20
    return x


def _round_trip(codec: str, **tensors: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
    data = encode_message(Message("activations", "device-1", "server", tensors), codec)
    return decode_message(data).tensors, len(data)


@pytest.mark.parametrize("codec", ["int8", "topk0.1", "topk:0.01", "topk1.0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_round_trip_within_stated_bound(codec: str, dtype: torch.dtype) -> None:
    x = _act()[:2].to(dtype)
    out, _ = _round_trip(codec, x=x)
    got = out["x"]
    assert got.dtype == dtype and got.shape == x.shape
    err = (got.double() - x.double()).abs()
    assert bool((err <= get_codec(codec).abs_error_bound(x)).all())


def test_int8_error_is_half_a_step_of_the_channel_max() -> None:
    x = _act()
    out, _ = _round_trip("int8", x=x)
    amax = x.abs().amax(dim=(0, 1))
    rel = ((out["x"] - x).abs().amax(dim=(0, 1)) / amax).max().item()
    assert rel <= get_codec("int8").rel_error_bound * (1 + 1e-5)
    assert get_codec("int8").rel_error_bound == 1 / 254


def test_topk_keeps_the_largest_and_zeroes_the_rest() -> None:
    x = _act()
    out, _ = _round_trip("topk0.1", x=x)
    got = out["x"]
    kept = got != 0
    k = get_codec("topk0.1").k_for(x.numel())  # type: ignore[attr-defined]
    assert int(kept.sum()) == k == 39322
    assert x[~kept].abs().max() <= x[kept].abs().min()  # nothing dropped beats anything kept
    rel = ((got[kept] - x[kept]).abs() / x[kept].abs()).max().item()
    assert rel <= 2.0**-11 * (1 + 2.0**-10)


def test_bytes_really_shrink_on_an_activation() -> None:
    x = _act()
    raw = x.numel() * 4
    sizes = {c: _round_trip(c, x=x)[1] for c in ("fp32", "int8", "topk0.1", "topk0.01")}
    assert raw < sizes["fp32"] < raw + 1024  # header + JSON + CRC only
    # int8: 1 byte per element + one fp32 scale per feature (384 x 4 B).
    assert abs(sizes["int8"] - (x.numel() + 4 * 384)) < 1024
    assert 3.9 < sizes["fp32"] / sizes["int8"] < 4.0
    # top-k 10%: 2 B fp16 value + 4 B int32 index per kept element -> 4 / 0.6 = 6.7x.
    assert abs(sizes["topk0.1"] - 39322 * 6) < 1024
    assert 6.5 < sizes["fp32"] / sizes["topk0.1"] < 6.7
    assert sizes["fp32"] / sizes["topk0.01"] > 60


def test_only_floating_tensors_are_coded() -> None:
    ids = torch.arange(-5, 5)
    mask = torch.tensor([True, False])
    small = torch.tensor([1, 2], dtype=torch.int8)
    for codec in ("int8", "topk0.1"):
        out, _ = _round_trip(codec, ids=ids, mask=mask, small=small)
        assert torch.equal(out["ids"], ids) and torch.equal(out["mask"], mask)
        assert torch.equal(out["small"], small) and out["small"].dtype == torch.int8


@pytest.mark.parametrize("codec", ["int8", "topk0.1"])
def test_zeros_empty_and_scalar_tensors(codec: str) -> None:
    zero_channel = torch.randn(4, 3)
    zero_channel[:, 1] = 0
    cases = {
        "zeros": torch.zeros(5, 6),
        "zero_channel": zero_channel,
        "empty": torch.zeros(0, 384),
        "empty_last": torch.zeros(3, 0),
        "scalar": torch.tensor(-2.5),
        "scalar0": torch.tensor(0.0),
    }
    out, _ = _round_trip(codec, **cases)
    for name, t in cases.items():
        assert out[name].shape == t.shape and out[name].dtype == t.dtype, name
    assert torch.equal(out["zeros"], cases["zeros"])
    assert torch.equal(out["zero_channel"][:, 1], torch.zeros(4))
    assert out["scalar"].item() == pytest.approx(-2.5, rel=1e-3)  # one value: its own max
    assert out["scalar0"].item() == 0.0


@pytest.mark.parametrize("codec", ["int8", "topk0.1", "topk"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_is_refused_naming_the_tensor(codec: str, bad: float) -> None:
    x = torch.randn(4, 8)
    x[1, 2] = bad
    with pytest.raises(ProtocolError, match=r"'activations' from 'device-1'.*tensor 'hidden'.*NaN"):
        _round_trip(codec, hidden=x, ids=torch.arange(3))


def test_codec_names_parse_and_validate() -> None:
    assert get_codec("topk").name == "topk0.1"
    assert get_codec("topk:0.05") is get_codec("topk0.05")
    assert get_codec("topk:0.05").name == "topk0.05"
    for bad in ("topk0", "topk:1.5", "topkx", "topk:", "topk-0.1", "topk:nan", "topk 0.1"):
        with pytest.raises(ProtocolError, match=r"valid forms: topk .*topk<fraction>"):
            get_codec(bad)
    with pytest.raises(ProtocolError, match=r"registered codecs: .*int8.*parameterized: topk"):
        get_codec("int4")


def test_a_damaged_topk_message_is_a_protocol_error() -> None:
    import struct

    data = encode_message(Message("grad", "server", "device-0", {"g": torch.randn(10)}), "topk0.5")
    patched = data[:-4].replace(b'"k":5', b'"k":6')
    assert patched != data[:-4]
    patched += struct.pack("<I", checksum(patched))
    with pytest.raises(ProtocolError, match="cannot decode 'g'"):
        decode_message(patched)


def test_check_activation() -> None:
    x = torch.randn(2, 5, 8)
    assert check_activation("tensor 'hidden'", x, shape=(None, None, 8), dtype=torch.float32) is x
    with pytest.raises(
        ProtocolError, match=r"tensor 'hidden'.*expected shape \[\*, \*, 16\], got \[2, 5, 8\]"
    ):
        check_activation("tensor 'hidden'", x, shape=(None, None, 16))
    with pytest.raises(ProtocolError, match=r"expected shape \[2, 5\], got \[2, 5, 8\]"):
        check_activation("h", x, shape=(2, 5))
    with pytest.raises(ProtocolError, match="expected dtype torch.bfloat16, got torch.float32"):
        check_activation("h", x, dtype=torch.bfloat16)
    x[0, 0, :3] = float("nan")
    x[1, 1, 1] = float("-inf")
    with pytest.raises(ProtocolError, match=r"message 'fwd' from 'd1': 3 NaN and 1 inf values"):
        check_activation("message 'fwd' from 'd1'", x)
    assert check_activation("h", x, allow_nonfinite=True) is x
    with pytest.raises(ProtocolError, match="expected a tensor"):
        check_activation("h", [1.0])  # type: ignore[arg-type]
