import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs two pytest workers on CI's two cores: an idle OpenMP thread must sleep, not
# spin on the core the other worker needs (read when torch loads, so before any test imports it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Tests that start servers, device processes or Ray, and the runs they compare against (cached in
# test_engines), stay together on one worker (pytest-xdist's --dist loadgroup).
SERIAL_GROUP = ("tests/deploy/", "tests/paradigms/test_engines.py")


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA is (scripts/gpu_check.sh); elsewhere they are skipped.
    Process-starting tests form one xdist group (see SERIAL_GROUP)."""
    import torch

    for item in items:
        if item.nodeid.startswith(SERIAL_GROUP):
            item.add_marker(pytest.mark.xdist_group("serial"))

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run scripts/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_config_dict(tmp_path, **sections):
    """A run that trains a 2-layer random model for a handful of steps (about a second)."""
    base = {
        "name": "tiny",
        "seed": 0,
        "model": {"name_or_path": "random:bert", "task": "classification", "max_length": 32},
        "data": {
            "dataset": "fortunes",
            "labels": ["computers", "politics", "science"],
            "max_examples": 240,
            "bpe_vocab_size": 400,
        },
        "partition": {"scheme": "iid"},
        "devices": {"count": 2},
        "peft": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
        "paradigm": {"name": "central"},
        "train": {"steps": 6, "batch_size": 8, "lr": 5e-3, "warmup_steps": 1},
        "eval": {"every": 3, "batch_size": 32, "max_examples": 48},
        "output": {"dir": str(tmp_path / "runs")},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            base.setdefault(key, {}).update(value)
        else:
            base[key] = value
    return base


@pytest.fixture
def tiny_config(tmp_path):
    from cotune.config import config_from_dict

    def make(**sections):
        return config_from_dict(tiny_config_dict(tmp_path, **sections))

    return make
