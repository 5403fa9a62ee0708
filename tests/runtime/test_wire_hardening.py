"""A buggy or hostile peer (run safety, case 10): every header field is validated, and a fuzzer
checks that any damaged message decodes to the exact original or raises ``ProtocolError``."""

import copy
import json
import random
import struct

import pytest
import torch

from cotune.errors import ProtocolError
from cotune.runtime import Message
from cotune.runtime.message_decode import decode_message
from cotune.runtime.messages import (
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    checksum,
    encode_message,
)

_HEADER = struct.Struct("<4sHHIQ")


def sample(codec):
    g = torch.Generator().manual_seed(0)
    return encode_message(
        Message(
            "activations",
            "device-1",
            "server",
            {
                "hidden": torch.randn(2, 3, 4, generator=g),
                "attention_mask": torch.ones(2, 3, dtype=torch.long),
            },
            {"step": 3, "loss": 0.5, "tags": ["a", "b"]},
        ),
        codec,
    )


def split(data):
    _, _, _, js_len, body_len = _HEADER.unpack_from(data)
    js = data[HEADER_SIZE : HEADER_SIZE + js_len]
    body = data[HEADER_SIZE + js_len : HEADER_SIZE + js_len + body_len]
    return json.loads(js), body


def rebuild(doc, body, raw_js=None):
    """A frame with a correct CRC around a (mutated) header: only the decoder's checks stand."""
    js = raw_js if raw_js is not None else json.dumps(doc, separators=(",", ":")).encode()
    payload = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(js), len(body)) + js + body
    return payload + struct.pack("<I", checksum(payload))


def same(a: Message, b: Message) -> bool:
    if (a.kind, a.sender, a.receiver, a.meta) != (b.kind, b.sender, b.receiver, b.meta):
        return False
    if list(a.tensors) != list(b.tensors):
        return False
    return all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        for x, y in zip(a.tensors.values(), b.tensors.values())
    )


def mutate(doc, **entry_changes):
    d = copy.deepcopy(doc)
    d["tensors"][0].update(entry_changes)
    return d


@pytest.mark.parametrize(
    "codec, change, match",
    [
        ("fp32", {"name": ["hidden"]}, r"tensors\[0\]\.name: must be a string"),
        ("fp32", {"name": 7}, r"tensors\[0\]\.name: must be a string"),
        ("int8", {"dtype": "int64"}, r"field 'codec' is 'int8', but a int64 tensor"),
        ("topk0.5", {"dtype": "int32"}, r"field 'codec' is 'topk0.5', but a int32 tensor"),
        ("topk0.5", {"shape": [2, 3, 40]}, r"keeps 120 of 240"),
        ("topk0.5", {"side": {"k": 12, "scale": 1.0, "extra": 1}}, r"field 'side'"),
        ("fp32", {"side": {"bogus": 1}}, r"field 'side'"),
        ("fp32", {"shape": [2, -3, 4]}, r"field 'shape' must be a list of sizes >= 0"),
        ("fp32", {"shape": [2, 3, True]}, r"field 'shape'"),
        ("fp32", {"dtype": "complex64"}, r"field 'dtype' 'complex64' is not one of"),
        ("fp32", {"parts": ["data", "more"]}, r"field 'parts'"),
        ("fp16", {"codec": "fp32"}, r"field 'codec' is 'fp32', but a float32 tensor in a 'fp16'"),
        ("fp32", {"codec": "nope"}, r"field 'codec': unknown codec"),
        ("fp32", {"shape": [3, 2, 4]}, r"data is torch.float32\[2, 3, 4\], header says"),
    ],
)
def test_each_bad_header_field_is_a_protocol_error(codec, change, match):
    doc, body = split(sample(codec))
    with pytest.raises(ProtocolError, match=match):
        decode_message(rebuild(mutate(doc, **change), body))


def test_nonfinite_metadata_literals_are_refused():
    doc, body = split(sample("fp32"))
    js = json.dumps(doc, separators=(",", ":")).replace('"loss":0.5', '"loss":NaN').encode()
    with pytest.raises(ProtocolError, match="non-finite number NaN"):
        decode_message(rebuild(None, body, raw_js=js))
    js = json.dumps(doc, separators=(",", ":")).replace('"loss":0.5', '"loss":1e999').encode()
    with pytest.raises(ProtocolError, match="overflows"):
        decode_message(rebuild(None, body, raw_js=js))


def test_unknown_or_missing_top_level_fields_are_refused():
    doc, body = split(sample("fp32"))
    for d in ({**doc, "extra": 1}, {k: v for k, v in doc.items() if k != "meta"}):
        with pytest.raises(ProtocolError, match="metadata fields are wrong"):
            decode_message(rebuild(d, body))
    with pytest.raises(ProtocolError, match="'sender' must be a string"):
        decode_message(rebuild({**doc, "sender": 3}, body))


def test_nan_meta_is_sent_as_null():
    data = encode_message(Message("report", "device-1", "server", {}, {"loss": float("nan")}))
    assert decode_message(data).meta == {"loss": None}


def structured_mutations(doc, rng):
    """Header edits a correct decoder must catch (types, enums, lengths, consistency)."""
    bad_values = [None, 1, -1, 1.5, True, "x", [], {}, [1], ["a"], {"a": 1}, "float32", "int8"]
    d = copy.deepcopy(doc)
    entry = d["tensors"][rng.randrange(len(d["tensors"]))]
    kind = rng.randrange(5)
    if kind == 0:  # a tensor field replaced by a value of the wrong type or meaning
        key = rng.choice(["name", "codec", "dtype", "shape", "parts", "side"])
        pool = [v for v in bad_values if v != entry[key]]
        if key == "name":  # another string would be a valid (different) name
            pool = [v for v in pool if not isinstance(v, str)]
        entry[key] = rng.choice(pool)
    elif kind == 1:  # a tensor field dropped, or an unknown one added
        if rng.random() < 0.5:
            entry.pop(rng.choice(list(entry)))
        else:
            entry["zzz"] = 1
    elif kind == 2:  # a top-level field of the wrong type
        key = rng.choice(["kind", "sender", "receiver", "codec", "meta", "tensors"])
        wrong = (str, dict) if key == "meta" else (str,)  # same type: a valid other message
        d[key] = rng.choice([v for v in bad_values if not isinstance(v, wrong)])
    elif kind == 3:  # a shape whose element count differs from the body's
        shape = list(entry["shape"])
        i = rng.randrange(len(shape))
        shape[i] = shape[i] + rng.choice([1, 2, 5])
        entry["shape"] = shape
    else:  # the tensor list reordered against the body, or cut short
        if rng.random() < 0.5 and len(d["tensors"]) > 1:
            d["tensors"].reverse()
        else:
            d["tensors"].pop()
    return d


@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "int8", "topk0.5"])
def test_fuzz_every_damaged_message_is_original_or_protocol_error(codec):
    rng = random.Random(hash(codec) % 1000)
    data = sample(codec)
    original = decode_message(data)
    doc, body = split(data)
    outcomes = {"same": 0, "error": 0}

    def check(blob):
        try:
            got = decode_message(blob)
        except ProtocolError:
            outcomes["error"] += 1
            return
        assert same(got, original), "a damaged message decoded to something else"
        outcomes["same"] += 1

    for _ in range(150):  # random byte flips (the CRC must catch them)
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        check(bytes(b))
    for _ in range(60):  # truncations and extensions
        n = rng.randrange(len(data))
        check(data[:n])
        check(data + bytes(rng.randint(1, 8)))
    for _ in range(250):  # structured header mutations behind a correct CRC
        check(rebuild(structured_mutations(doc, rng), body))
    # Bit flips in the body's own (safetensors) header behind a correct CRC. Flipped tensor
    # *values* would be a valid different message: only the CRC can tell, as tested above.
    st_header = 8 + int.from_bytes(body[:8], "little")
    for _ in range(150):
        b = bytearray(body)
        b[rng.randrange(st_header)] ^= 1 << rng.randrange(8)
        check(rebuild(doc, bytes(b)))
    assert outcomes["error"] > 0
