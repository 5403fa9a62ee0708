"""The FlopCounter's learned FLOP law must reproduce torch's own count exactly."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from cotune.config import ModelSection, PeftSection
from cotune.models import load_model, task_loss
from cotune.peft import inject_adapters
from cotune.sim.costs import FlopCounter


def exact(fn, *args):
    with FlopCounterMode(display=False) as mode:
        fn(*args)
    return int(mode.get_total_flops())


def test_learned_law_matches_counted_flops_for_new_shapes():
    for family, task in (("bert", "classification"), ("gpt2", "causal_lm"), ("llama", "causal_lm")):
        loaded = load_model(
            ModelSection(name_or_path=f"random:{family}", task=task), num_labels=3, vocab_size=300
        )
        inject_adapters(
            loaded.model,
            PeftSection(target_modules=[".*(query|value|c_attn|q_proj|v_proj)$"]),
            anatomy=loaded.anatomy,
            head_paths=loaded.anatomy.head_paths(),
        )
        forward = loaded.anatomy.full()

        def step(ids, forward=forward, task=task):
            logits = forward(ids, torch.ones_like(ids))
            labels = (
                torch.zeros(ids.shape[0], dtype=torch.long) if task == "classification" else ids
            )
            task_loss(logits, labels, task).backward()

        counter = FlopCounter()
        for shape in ((4, 9), (4, 17), (2, 11), (3, 5)):  # three to solve, one to verify
            ids = torch.randint(2, 300, shape)
            counter.run("k", step, ids, dims=shape)
        assert counter.has_law("k"), family
        for shape in ((5, 13), (8, 31), (1, 2)):
            ids = torch.randint(2, 300, shape)
            _, predicted = counter.run("k", step, ids, dims=shape)
            assert predicted == exact(step, ids), (family, shape)


def test_no_law_without_dims_or_when_verification_fails():
    counter = FlopCounter()
    weird = {(1, 1): 5, (2, 1): 7, (1, 2): 11, (3, 3): 1}
    for dims, flops in weird.items():
        counter._learn("w", dims, flops)
    assert not counter.has_law("w")
