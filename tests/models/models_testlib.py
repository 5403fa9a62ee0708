"""Shared helpers for the cotune.models tests: tiny random models and right-padded batches."""

from __future__ import annotations

import functools

import torch

from cotune.config import ModelSection
from cotune.models import LoadedModel, load_model

VOCAB = 97
LAYERS = 3
DECODERS = ("gpt2", "llama", "qwen2", "mistral")
ENCODERS = ("bert", "roberta")
CASES = [(f, "classification") for f in DECODERS + ENCODERS] + [(f, "causal_lm") for f in DECODERS]


def make_tiny(kind: str, task: str, **random_config: object) -> LoadedModel:
    """A tiny random model with 3 blocks (so a three-way split has three non-empty parts)."""
    cfg = ModelSection(
        name_or_path=f"random:{kind}",
        task=task,
        random_config={"num_hidden_layers": LAYERS, **random_config},
    )
    return load_model(cfg, num_labels=3, vocab_size=VOCAB, seed=0)


def batch(
    task: str, lengths: tuple[int, ...] = (7, 5, 3), seed: int = 1
) -> tuple[torch.Tensor, ...]:
    """A right-padded batch of unequal lengths; real tokens avoid the special ids (pad 0, eos 1)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    if task == "classification":
        labels = torch.randint(0, 3, (len(lengths),), generator=g)
    else:
        labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


# Shared between tests (loading is the slow part); tests that modify a model use make_tiny.
tiny = functools.cache(make_tiny)
