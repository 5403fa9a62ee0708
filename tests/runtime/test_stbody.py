"""The message body writer gives safetensors' own bytes, for every dtype a message carries;
the reader gives the library's tensors back, as views, and refuses what the library refuses."""

import json
import random
import struct

import pytest
import torch
from safetensors.torch import load, save

from cotune.runtime.stbody import BodyError, safetensors_pieces, safetensors_views

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool]  # fmt: skip


def random_tensor(rng: random.Random, dtype: torch.dtype) -> torch.Tensor:
    shape = [rng.randint(0, 4) for _ in range(rng.randint(0, 3))]  # 0-dim and empty included
    t = torch.randn(shape) * 100
    return (t > 0) if dtype == torch.bool else t.to(dtype)


@pytest.mark.parametrize("seed", range(40))
def test_pieces_join_to_the_librarys_bytes(seed):
    rng = random.Random(seed)
    tensors = {
        f"{rng.randint(0, 30)}:{rng.choice(['data', 'scale', 'idx', 'q', 'zz'])}": random_tensor(
            rng, rng.choice(DTYPES)
        )
        for _ in range(rng.randint(0, 8))
    }
    pieces = safetensors_pieces(tensors)
    assert pieces is not None
    joined = b"".join(pieces)
    assert joined == save(tensors)
    back = load(joined)
    for k, t in tensors.items():
        assert torch.equal(back[k], t)


def test_names_json_would_escape_go_to_the_library():
    assert safetensors_pieces({'a"b': torch.zeros(2)}) is None
    assert safetensors_pieces({"é": torch.zeros(2)}) is None
    assert safetensors_pieces({"0:data": torch.zeros(2, dtype=torch.complex64)}) is None
    assert b"".join(safetensors_pieces({})) == save({})


@pytest.mark.parametrize("seed", range(40))
def test_views_read_what_the_library_reads(seed):
    rng = random.Random(seed)
    tensors = {
        f"{i}:{rng.choice(['data', 'scale', 'q'])}": random_tensor(rng, rng.choice(DTYPES))
        for i in range(rng.randint(0, 8))
    }
    body = save(tensors, metadata={"format": "pt"} if seed % 2 else None)
    views = safetensors_views(memoryview(body))
    want = load(body)
    assert set(views) == set(want)
    for k, t in want.items():
        assert views[k].dtype == t.dtype and views[k].shape == t.shape
        assert torch.equal(views[k], t)


def body_with(header: dict, data: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


@pytest.mark.parametrize(
    "body, why",
    [
        (b"\x01\x00", "too short"),
        (struct.pack("<Q", 1000) + b"{}", "does not fit"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (struct.pack("<Q", 3) + b"{x}", "not JSON"),
        (body_with({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)), "is not {dtype"),
        (body_with({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
         "not supported"),
        (body_with({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, bytes(8)),
         "not a list of sizes"),
        (body_with({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
         "needs 12"),
        (body_with({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)),
         "starts at 4"),
        (body_with({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(12)),
         "body holds 12"),
        (body_with({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(4)),
         "body holds 4"),
        (body_with({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8)),
         "starts at 0"),
    ],
    ids=["short", "header-length", "array", "bad-json", "keys", "dtype", "shape", "size",
         "gap", "trailing", "truncated", "overlap"],
)  # fmt: skip
def test_a_malformed_body_is_refused_saying_what_is_wrong(body, why):
    with pytest.raises(BodyError, match=why):
        safetensors_views(body)
