"""The message body writer gives safetensors' own bytes, for every dtype a message carries."""

import random

import pytest
import torch
from safetensors.torch import load, save

from cotune.runtime.stbody import safetensors_pieces

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
