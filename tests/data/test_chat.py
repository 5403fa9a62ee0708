"""Instruction data in a chat format (``data.chat_template``): each prompted example as a
conversation rendered by the template, the loss on the assistant's turn only."""

import json

import pytest

from cotune.config import DataSection, config_from_dict
from cotune.data import load_task_data
from cotune.data.batching import IGNORE_INDEX, encode_dataset
from cotune.data.chat import BUILTIN, ChatFormat, resolve_chat
from cotune.data.tokenizer import Tokenizer, build_tokenizer, train_bpe
from cotune.errors import ConfigError, DataError
from tests.data.test_instructions import central_lm_sections

CHATML = BUILTIN["chatml"]
QA = [
    {"question": f"Q: what is {i} plus {i}?\nA:", "answer": f" {2 * i}, of course."}
    for i in range(30)
]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa_data(tmp_path, rows=QA):
    section = DataSection(dataset=str(write(tmp_path / "qa.jsonl", rows)), text_field="answer",
                          prompt_field="question")  # fmt: skip
    return load_task_data(section, "causal_lm", seed=0)


def instruct_tokenizer(texts):
    """What an instruct checkpoint ships: a fast tokenizer whose turn markers are special
    tokens, with its own chat template (ChatML, as Qwen's)."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=train_bpe(texts, 300), eos_token="<eos>",
                                 pad_token="<pad>",
                                 additional_special_tokens=["<|im_start|>", "<|im_end|>"])  # fmt: skip
    hf.chat_template = CHATML.read_text()
    return build_tokenizer(hf, [], 0)


def test_rows_are_the_conversations_transformers_renders_and_only_the_answer_is_learnt(tmp_path):
    d = qa_data(tmp_path)
    tok = instruct_tokenizer([e.text for e in d.train])
    tok.chat = resolve_chat("tokenizer", "Answer briefly.", tok, "an-instruct-model")
    enc = encode_dataset(d.train, tok, 128, "causal_lm")
    for row, e in enumerate(d.train[:8]):
        system = {"role": "system", "content": "Answer briefly."}
        user = {"role": "user", "content": e.prompt.strip()}
        answer = {"role": "assistant", "content": e.text[len(e.prompt) :].strip()}
        want = tok.hf.apply_chat_template([system, user, answer], tokenize=True)["input_ids"]
        asked = tok.hf.apply_chat_template([system, user], tokenize=True,
                                           add_generation_prompt=True)["input_ids"]  # fmt: skip
        ids, n = enc.ids[row], enc.prompt_lens[row]
        assert ids == want and ids[:n] == asked  # the prompt ends where the answer begins
        b = enc.batch([row])
        learnt = b.labels[0][b.labels[0] != IGNORE_INDEX].tolist()
        assert tok.hf.decode(learnt) == f"{answer['content']}<|im_end|>\n"  # learns to stop


def test_a_template_file_renders_for_the_local_bpe_too(tmp_path):
    d = qa_data(tmp_path)
    tok = build_tokenizer(None, [e.text for e in d.train], 300)
    tok.chat = resolve_chat(str(CHATML), None, tok, "random:gpt2")
    enc = encode_dataset(d.train, tok, 256, "causal_lm")
    e, ids, n = d.train[0], enc.ids[0], enc.prompt_lens[0]
    assert tok.bpe.decode(ids[:n]) == f"<|im_start|>user\n{e.prompt.strip()}<|im_end|>\n" \
        "<|im_start|>assistant\n"  # fmt: skip
    assert tok.decode(ids[n:]) == f"{e.text[len(e.prompt) :].strip()}<|im_end|>\n"


def test_a_long_prompt_loses_the_start_of_its_words_not_the_turn_markers(tmp_path):
    rows = [{"question": "context " * (80 + i) + f"Q{i}: how many?", "answer": f" {i} apples"}
            for i in range(8)]  # fmt: skip
    d = qa_data(tmp_path, rows)
    tok = instruct_tokenizer([e.text for e in d.train])
    tok.chat = resolve_chat("tokenizer", "Be brief.", tok, "an-instruct-model")
    enc = encode_dataset(d.train, tok, 56, "causal_lm")
    for row, e in enumerate(d.train):
        ids, n = enc.ids[row], enc.prompt_lens[row]
        assert len(ids) <= 56 < len(tok.encode([e.text], 1 << 30)[0])
        text = tok.hf.decode(ids, skip_special_tokens=False)
        assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
        assert "how many?<|im_end|>\n<|im_start|>assistant\n" in text  # the prompt's end
        assert tok.hf.decode(ids[n:]) == f"{e.text[len(e.prompt) :].strip()}<|im_end|>\n"
        assert "context context" not in text[:60]  # the words' start went, the header stayed


def test_bad_chat_settings_name_the_field(tmp_path):
    bpe = build_tokenizer(None, ["some text to train on"] * 10, 300)
    with pytest.raises(DataError, match=r"data.chat_template: 'tokenizer' asks for the template "
                       r"of 'random:gpt2', but cotune's locally trained BPE has none"):  # fmt: skip
        resolve_chat("tokenizer", None, bpe, "random:gpt2")
    with pytest.raises(DataError, match=r"data.chat_template: cannot read template file .*nope"):
        resolve_chat(str(tmp_path / "nope.jinja"), None, bpe, "random:gpt2")
    (tmp_path / "empty.jinja").write_text("  \n")
    with pytest.raises(DataError, match=r"data.chat_template: template file .*empty.jinja.* empty"):
        resolve_chat(str(tmp_path / "empty.jinja"), None, bpe, "random:gpt2")
    bpe.chat = ChatFormat("{{ raise_exception('system messages are not supported') }}")
    with pytest.raises(DataError, match="the template failed to render: .*not supported"):
        encode_dataset(qa_data(tmp_path).train, bpe, 64, "causal_lm")
    base = {"model": {"name_or_path": "random:bert", "task": "classification"}}
    with pytest.raises(ConfigError, match="data.chat_template: conversations are for"):
        config_from_dict({**base, "data": {"chat_template": "tokenizer"}})
    with pytest.raises(ConfigError, match="data.system_prompt: a system message needs a chat"):
        config_from_dict({"model": {"name_or_path": "random:gpt2", "task": "causal_lm"},
                          "data": {"system_prompt": "hi"}})  # fmt: skip


def test_a_run_trains_on_conversations_and_saves_its_template(tiny_config):
    """End to end: the instruct view through ChatML; the run's tokenizer keeps the template
    (cotune's and transformers' loaders both read it); data without prompts is refused."""
    from transformers import AutoTokenizer

    from cotune.run import run_experiment

    sections = central_lm_sections(96)
    chat = {"chat_template": "chatml", "system_prompt": "Name the file."}  # shipped, by name
    cfg = tiny_config(name="chat", data={"dataset": "fortunes", "view": "instruct", "labels": [],
                                         "max_examples": 40, **chat}, **sections)  # fmt: skip
    run_dir = run_experiment(cfg, quiet=True, report=False)
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r["event"] == "train" and "loss" in r]
    assert len(losses) == 2 and all(x == x for x in losses)
    saved = Tokenizer.load(run_dir / "tokenizer")
    assert saved.chat == ChatFormat(CHATML.read_text(), "Name the file.")
    assert AutoTokenizer.from_pretrained(run_dir / "tokenizer").chat_template == CHATML.read_text()
    plain = tiny_config(name="plain", data={"dataset": "fortunes", "labels": [], **chat},
                        **sections)  # fmt: skip
    with pytest.raises(DataError, match="data.chat_template: the training data has no prompts"):
        run_experiment(plain, quiet=True, report=False)
