"""A fingerprint of a model's pretrained weights, so that a deployed device can tell whether it
holds the server's frozen base.

A device loads the base itself, from its own copy of the checkpoint, or builds a ``random:``
model from the run's seed with its own transformers: a different file at the configured path,
or a release that initialises random models otherwise, gives another base that trains without
an error, against adapters and cut activations made for the server's. The server sends its
digest with the welcome; a device whose own differs does not join (``deploy/device.py``).
"""

from __future__ import annotations

import json
from typing import Any

import crc32c
import torch
from torch import nn


def weights_digest(model: nn.Module) -> dict[str, str]:
    """CRC32C of every parameter's bytes, by name (taken before adapters are injected or the
    model is placed: what was loaded, whatever the node's device or quantization)."""
    out = {}
    for name, p in model.named_parameters():
        if p.is_meta:
            continue
        raw = p.detach().cpu().contiguous().view(-1).view(torch.uint8)  # bytes, any dtype
        out[name] = f"{crc32c.crc32c(raw.numpy()):08x}"
    return out


#: The welcome's entry for the tokenizer, beside the tensors' (no parameter name has a space).
VOCABULARY = "tokenizer vocabulary"


def vocabulary_digest(tokenizer: Any) -> str:
    """CRC32C of a tokenizer's vocabulary (token -> id, added tokens included) with its pad and
    eos ids: what turns a device's own text into the ids the server's model reads. ``tokenizer``
    is cotune's (``data.tokenizer.Tokenizer``: an HF tokenizer or the run's own BPE)."""
    source = tokenizer.hf if tokenizer.hf is not None else tokenizer.bpe
    vocab = sorted(source.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    text = json.dumps([vocab, tokenizer.pad_id, tokenizer.eos_id], ensure_ascii=False)
    return f"{crc32c.crc32c(text.encode()):08x}"


def digest_differences(ours: dict[str, str], theirs: dict[str, str]) -> list[str]:
    """The tensor names whose digests differ, or that only one side has (sorted)."""
    return sorted(n for n in ours.keys() | theirs.keys() if ours.get(n) != theirs.get(n))


def library_versions() -> dict[str, str]:
    """The releases that decide what a base is and computes: shown beside a mismatch (the
    modules' own versions, which a run from a source tree has too)."""
    import transformers

    import cotune

    return {
        "cotune": cotune.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
