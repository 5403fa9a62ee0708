"""The real-model recipe (configs/real/, docs/recipes/real-model.md) end to end on a tiny
Qwen2 checkpoint directory laid out like a downloaded one (config, safetensors, tokenizer):
central, fedavg and splitfed exactly as configured, shrunk only in size and steps."""

import json
from pathlib import Path

import pytest

from cotune.config import load_config
from cotune.run import run_experiment

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from cotune.config import DataSection
    from cotune.data import load_task_data

    path = tmp_path_factory.mktemp("qwen-tiny")
    data = load_task_data(DataSection(dataset="austen", view="text"), "causal_lm", 0)
    texts = [e.text for e in data.train[:400]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"])
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(path)
    config = Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, eos_token_id=0, bos_token_id=0,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["central", "fedavg", "splitfed", "instruct"])
def test_the_real_model_recipe_runs_from_a_local_directory(qwen_dir, tmp_path, recipe):
    cfg = load_config(
        ROOT / f"configs/real/qwen05b_{recipe}.yaml",
        overrides=[
            f"model.name_or_path={qwen_dir}",
            "model.max_length=32",  # an instruction's prompt loses its start, not its answer
            "data.max_examples=120",
            "devices.count=2",
            "train.steps=4",
            "train.batch_size=2",
            "train.device=cpu",
            "eval.every=2",
            "eval.max_examples=8",
            f"output.dir={tmp_path}",
        ],
    )
    assert cfg.train.autocast == "bf16" and cfg.model.dtype == "bfloat16"
    run_dir = run_experiment(cfg, quiet=True, report=False)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["perplexity"] > 1
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
