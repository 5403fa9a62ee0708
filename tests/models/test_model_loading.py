"""load_model: random families, pretrained directories, the bundled MiniLM, and the error cases."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from cotune.config import ModelSection
from cotune.errors import ModelError
from cotune.models import load_model

from .models_testlib import LAYERS, batch, tiny


def load(name: str, task: str = "classification", **kw):
    random_config = kw.pop("random_config", {})
    return load_model(ModelSection(name_or_path=name, task=task, random_config=random_config), **kw)


@pytest.mark.parametrize(
    ("kind", "family", "kv_heads"),
    [
        ("gpt2", "gpt2", 4),
        ("llama", "llama", 2),
        ("qwen2", "llama", 2),
        ("mistral", "llama", 2),
        ("bert", "bert", 4),
        ("roberta", "bert", 4),
    ],
)
def test_random_defaults(kind, family, kv_heads):
    lm = load(f"random:{kind}", num_labels=5, vocab_size=50)
    c = lm.model.config
    assert (lm.family, lm.model_type, lm.tokenizer, lm.num_labels) == (family, kind, None, 5)
    assert (lm.anatomy.num_layers, lm.anatomy.hidden_size, c.num_attention_heads) == (2, 64, 4)
    assert getattr(c, "num_key_value_heads", 4) == kv_heads
    assert (c.n_inner if kind == "gpt2" else c.intermediate_size) == 128
    assert c.max_position_embeddings >= 512 and c.vocab_size == 50
    assert (c.pad_token_id, c.eos_token_id) == (0, 1)  # the local BPE's <pad> and <eos>
    assert c._attn_implementation == "sdpa"
    assert not lm.model.training
    assert next(lm.model.parameters()).dtype == torch.float32


def test_random_config_overrides_and_aliases():
    lm = load(
        "random:gpt2", "causal_lm", vocab_size=40, random_config={"hidden_size": 32, "n_layer": 4}
    )
    assert (lm.anatomy.hidden_size, lm.anatomy.num_layers, lm.num_labels) == (32, 4, None)
    with pytest.raises(ModelError, match="'hiden_size' is not a field of LlamaConfig"):
        load("random:llama", random_config={"hiden_size": 32})


@pytest.mark.parametrize(
    ("kind", "width", "derived", "size"),
    [("gpt2", "n_embd", "n_inner", 1536), ("bert", "hidden_size", "intermediate_size", 1536),
     ("llama", "hidden_size", "intermediate_size", 1024),  # LLaMA: 8d/3 up to a multiple of 256
     ("qwen2", "hidden_size", "intermediate_size", 1024)],
)  # fmt: skip
def test_sizes_derived_from_an_overridden_width_follow_it(kind, width, derived, size):
    c = load(f"random:{kind}", vocab_size=50, random_config={width: 384}).model.config
    assert getattr(c, derived) == size
    # Given explicitly, a derived size is kept; the alias of the width counts as the width.
    c = load(f"random:{kind}", vocab_size=50, random_config={"hidden_size": 384, derived: 96})
    assert getattr(c.model.config, derived) == 96
    assert load(f"random:{kind}", vocab_size=50).model.config.to_dict()[derived] == 128


def test_seed_sets_the_init_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = load("random:llama", seed=3, vocab_size=50), load("random:llama", seed=3, vocab_size=50)
    c = load("random:llama", seed=4, vocab_size=50)
    assert torch.equal(torch.random.get_rng_state(), state)
    wa, wb, wc = (m.model.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_dtype():
    lm = load_model(ModelSection(name_or_path="random:bert", dtype="bfloat16"), vocab_size=50)
    assert next(lm.model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("kind", "task", "block1", "embeddings", "heads"),
    [
        (
            "gpt2",
            "classification",
            "transformer.h.1",
            ["transformer.wte", "transformer.wpe"],
            ["score"],
        ),
        ("gpt2", "causal_lm", "transformer.h.1", ["transformer.wte", "transformer.wpe"], []),
        ("qwen2", "classification", "model.layers.1", ["model.embed_tokens"], ["score"]),
        ("llama", "causal_lm", "model.layers.1", ["model.embed_tokens"], []),
        ("bert", "classification", "bert.encoder.layer.1", ["bert.embeddings"], ["classifier"]),
        (
            "roberta",
            "classification",
            "roberta.encoder.layer.1",
            ["roberta.embeddings"],
            ["classifier"],
        ),
    ],
)
def test_anatomy_paths(kind, task, block1, embeddings, heads):
    a = tiny(kind, task).anatomy
    model = a.model
    assert a.block_path(1) == block1 and model.get_submodule(block1) is a.block(1)
    assert a.embedding_paths() == embeddings and a.head_paths() == heads
    for path in embeddings + heads + a.output_paths():
        model.get_submodule(path)
        assert a.layer_of(path) is None
    assert a.layer_of(f"{block1}.something.weight") == 1
    assert a.layer_of(f"base_model.model.{block1}0.x") == 10
    assert a.layer_of(f"{a.blocks_path}") is None
    assert (a.final_norm is None) == (a.family == "bert")
    with pytest.raises(ModelError, match="out of range"):
        a.block(LAYERS)


def test_bad_segment_bounds():
    a = tiny("gpt2", "classification").anatomy
    for start, end in [(-1, 2), (2, 1), (0, LAYERS + 1), (1.0, 2)]:
        with pytest.raises(ModelError, match=rf"0 <= start <= end <= {LAYERS}"):
            a.segment(start, end)
    with pytest.raises(ModelError, match="is empty"):
        a.segment(1, 1)
    with pytest.raises(ModelError, match="start must be 0"):
        a.segment(1, 2, embed=True)
    with pytest.raises(ModelError, match=f"end must be {LAYERS}"):
        a.segment(0, 1, head=True)
    ids, mask, _ = batch("classification")
    with pytest.raises(ModelError, match="pass the Activations"):
        a.segment(1, LAYERS)(ids, mask)
    with pytest.raises(ModelError, match="pass input_ids"):
        a.full()(a.segment(0, 1)(ids, mask))


def test_bert_causal_lm_is_an_error():
    with pytest.raises(ModelError, match="cannot do causal_lm"):
        load("random:roberta", "causal_lm", vocab_size=50)


def test_unknown_families(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 32}))
    with pytest.raises(
        ModelError, match=r"unsupported model_type 't5'.*gpt2, llama, qwen2, mistral, bert, roberta"
    ):
        load(str(tmp_path))
    with pytest.raises(ModelError, match=r"random:t5.*allowed: gpt2"):
        load("random:t5")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load(str(empty))


def test_local_gpt2_dir_gets_eos_as_padding(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "a": 1, "b": 2, "<unk>": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(tmp_path)
    config = GPT2Config(
        vocab_size=4,
        n_layer=1,
        n_embd=16,
        n_head=2,
        n_positions=256,
        bos_token_id=0,
        eos_token_id=0,
    )
    GPT2LMHeadModel(config).save_pretrained(tmp_path)

    lm = load(str(tmp_path), "causal_lm")
    assert lm.model.config.pad_token_id == 0 and lm.tokenizer.pad_token_id == 0
    assert lm.family == "gpt2" and lm.tokenizer("a b").input_ids == [1, 2]
    # A pretrained vocabulary grows for a larger tokenizer but never shrinks.
    grown = load(str(tmp_path), "causal_lm", vocab_size=6).model
    assert grown.get_input_embeddings().num_embeddings == 6
    assert load(str(tmp_path), "causal_lm", vocab_size=2).model.config.vocab_size == 4


@pytest.mark.slow
def test_minilm_loads_and_splits():
    lm = load("minilm", num_labels=4, seed=0)
    assert (lm.family, lm.model_type, lm.num_labels, lm.anatomy.num_layers) == (
        "bert",
        "bert",
        4,
        6,
    )
    enc = lm.tokenizer(
        ["short", "a somewhat longer sentence about federated fine-tuning", "a mid length text"],
        padding=True,
        return_tensors="pt",
    )
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert mask.sum(-1).unique().numel() == 3  # unequal lengths, right-padded
    a = lm.anatomy
    with torch.no_grad():
        want = lm.model(input_ids=ids, attention_mask=mask).logits
        full = a.full()(ids, mask)
        split = a.segment(3, 6)(a.segment(0, 3)(ids, mask))
        u_shape = a.segment(6, 6)(a.segment(1, 6, head=False)(a.segment(0, 1)(ids, mask)))
    assert want.shape == (3, 4)
    for got in (full, split, u_shape):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_import_does_not_load_transformers():
    code = "import sys, cotune.models; sys.exit('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
