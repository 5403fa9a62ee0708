"""train.gradient_checkpointing: the same gradients, more FLOPs, less (estimated) memory."""

import torch

from cotune.accel.compute import Compute, set_compute
from cotune.config import PeftSection, RunConfig
from cotune.models import load_model, task_loss
from cotune.peft import inject_adapters
from cotune.sim.costs import FlopCounter
from cotune.sim.memory import MemoryProbe


def model_and_adapters():
    cfg = RunConfig.model_validate(
        {
            "model": {
                "name_or_path": "random:llama",
                "task": "causal_lm",
                "max_length": 32,
                "random_config": {"num_hidden_layers": 4},
            }
        }
    )
    lm = load_model(cfg.model, vocab_size=64, seed=0)
    adapters = inject_adapters(lm.model, PeftSection(r=4, target_modules=["q_proj", "v_proj"]))
    lm.model.train()
    return lm, adapters


def grads_and_flops(lm, adapters, ids):
    counter = FlopCounter()

    def step(x):
        loss = task_loss(lm.anatomy.full()(x), x, "causal_lm")
        loss.backward()
        return float(loss.detach())

    _, flops = counter.run("k", step, ids)
    grads = {n: p.grad.clone() for n, p in adapters.named_trainable().items()}
    for p in adapters.parameters():
        p.grad = None
    return grads, flops


def test_checkpointed_blocks_give_the_same_gradients_for_more_flops():
    lm, adapters = model_and_adapters()
    ids = torch.randint(0, 64, (2, 16))
    plain, plain_flops = grads_and_flops(lm, adapters, ids)
    set_compute(lm.model, Compute(checkpointing=True))
    ckpt, ckpt_flops = grads_and_flops(lm, adapters, ids)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-7)
    # Every block's forward runs twice: more counted FLOPs (the simulator's time sees them).
    assert ckpt_flops > plain_flops * 1.15


def test_memory_estimate_counts_checkpointing_honestly():
    lm, _ = model_and_adapters()
    ids = torch.ones(4, 32, dtype=torch.long)
    full = lm.anatomy.full()
    plain = MemoryProbe().estimate("m", lm.model, full, ids, ids.clone())
    set_compute(lm.model, Compute(checkpointing=True))
    ckpt = MemoryProbe().estimate("m", lm.model, full, ids, ids.clone())
    assert ckpt.weights == plain.weights and ckpt.optimizer == plain.optimizer
    # Block inputs kept plus one block recomputed: well below keeping every block's tensors,
    # but not zero.
    boundary = 4 * 4 * 32 * lm.anatomy.hidden_size * 4  # 4 blocks' fp32 inputs
    assert boundary < ckpt.activations < plain.activations
