"""`cotune infer RUN_DIR --prompt ...` on a run's fine-tuned causal LM."""

from __future__ import annotations

import json

import pytest
import yaml

from cotune.cli import main
from cotune.errors import ConfigError
from cotune.infer.command import parse_cut
from tests.conftest import tiny_config_dict


def _causal_run(tmp_path):
    cfg = tiny_config_dict(
        tmp_path, name="lm",
        model={"name_or_path": "random:gpt2", "task": "causal_lm", "max_length": 32,
               "random_config": {"n_layer": 4}},
        data={"dataset": "austen", "view": "text", "labels": [], "max_examples": 80},
        peft={"target_modules": ["c_attn"]}, train={"steps": 2}, eval={"every": 2, "max_examples": 8},
    )  # fmt: skip
    p = tmp_path / "lm.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(p), "--quiet"]) == 0
    return tmp_path / "runs" / "lm"


def test_infer_generates_with_a_distilled_drafter_and_prints_each_tokens_time(tmp_path, capsys):
    run_dir = _causal_run(tmp_path)
    capsys.readouterr()
    args = ["infer", str(run_dir), "--prompt", "It is a truth", "--max-new-tokens", "6",
            "--drafter-steps", "5", "--json", str(tmp_path / "out.json")]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert text.startswith("It is a truth") and "simulated TTFT" in text and "acceptance" in text
    res = json.loads((tmp_path / "out.json").read_text())
    # Six tokens, unless this random model ends its text sooner (then with <eos>, and said so).
    n = len(res["tokens"])
    assert 0 < n <= 6 and res["finish_reason"] in ("eos", "length")
    assert n == 6 or res["finish_reason"] == "eos"
    assert len(res["simulated"]["token_times_s"]) == n and len(res["host"]["token_times_s"]) == n
    assert res["simulated"]["device_profile"] == "phone-mid" and res["messages"] > 0
    assert res["prefill_chunk"] in [c["chunk"] for c in res["prefill_chunk_ttft_s"]]
    drafter = run_dir / "drafter" / "cut-1-1"
    assert json.loads((drafter / "drafter.json").read_text())["steps"] == 5
    # Again: the drafter is found, not distilled anew; greedy output is the same.
    assert main([*args[:-2], "--json", str(tmp_path / "again.json")]) == 0
    assert "distilling" not in capsys.readouterr().err
    assert json.loads((tmp_path / "again.json").read_text())["tokens"] == res["tokens"]


def test_infer_refuses_what_it_cannot_do(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--cut: expected N_IN,N_OUT"):
        parse_cut("1")
    assert main(["infer", str(tmp_path), "--prompt", "x"]) == 2
    assert "not a cotune run directory" in capsys.readouterr().err


def test_a_run_trained_on_conversations_is_prompted_with_one(tmp_path, capsys):
    """data.chat_template: the prompt goes in as the user's turn with the assistant's opened
    (the template saved with the run's tokenizer); --raw-prompt gives the text as written."""

    cfg = tiny_config_dict(
        tmp_path, name="chat",
        model={"name_or_path": "random:gpt2", "task": "causal_lm", "max_length": 96,
               "random_config": {"n_layer": 3}},
        data={"dataset": "fortunes", "view": "instruct", "labels": [], "max_examples": 40,
              "chat_template": "chatml"},
        peft={"target_modules": ["c_attn"]}, train={"steps": 1}, eval={"every": 1, "max_examples": 4},
    )  # fmt: skip
    p = tmp_path / "chat.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(p), "--quiet"]) == 0
    run_dir = tmp_path / "runs" / "chat"
    base = ["infer", str(run_dir), "--prompt", "Quote: hi", "--max-new-tokens", "2",
            "--gamma", "0"]  # fmt: skip
    capsys.readouterr()
    assert main([*base, "--json", str(tmp_path / "chat.json")]) == 0
    assert capsys.readouterr().out.startswith("<|im_start|>user\nQuote: hi")
    assert main([*base, "--raw-prompt", "--json", str(tmp_path / "raw.json")]) == 0
    chat, raw = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("chat", "raw"))
    assert chat["model_input"] == "<|im_start|>user\nQuote: hi<|im_end|>\n<|im_start|>assistant\n"
    assert raw["model_input"] == "Quote: hi" and chat["prompt"] == raw["prompt"] == "Quote: hi"
