"""Every example config in configs/ (one per paradigm, the demo's and the staged run) loads and
runs one step, exactly as written except for a tiny model and a tiny budget."""

from pathlib import Path

import pytest

from cotune.config import load_config
from cotune.paradigms import PARADIGMS
from cotune.run import run_experiment

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(
    p.relative_to(ROOT).as_posix() for p in ROOT.glob("configs/**/*.yaml") if "real" not in p.parts
)  # fmt: skip (configs/real: tests/test_recipes.py)


def test_every_paradigm_has_an_example_config():
    named = {load_config(ROOT / p).paradigm.name for p in EXAMPLES}
    assert set(PARADIGMS) <= named, sorted(set(PARADIGMS) - named)


@pytest.mark.parametrize("path", EXAMPLES)
def test_an_example_config_runs_one_step(path, tmp_path):
    cfg = load_config(ROOT / path)
    tiny = ["data.max_examples=240", "data.bpe_vocab_size=400", "eval.max_examples=16",
            f"output.dir={tmp_path}"]  # fmt: skip
    if not cfg.model.name_or_path.startswith("random:"):  # MiniLM's 6 blocks, tiny and random
        tiny += ["model.name_or_path=random:bert", "model.random_config.num_hidden_layers=6"]
    options = cfg.paradigm.options
    one_round = options.get("local_steps", 1) * options.get("tau", 1) if cfg.paradigm.name in (
        "fedavg", "hierfed", "fedbiot") else 1  # fmt: skip
    budget = [f"train.steps={one_round}", f"eval.every={one_round}", "train.warmup_steps=0"]
    if cfg.peft.stages:  # a staged run's steps are its stages' (kept as written)
        budget = []
    cfg = load_config(ROOT / path, [*tiny, *budget])
    run_dir = run_experiment(cfg, quiet=True, report=False)
    assert (run_dir / "summary.json").is_file()
