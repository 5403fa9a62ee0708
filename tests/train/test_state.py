import math

import pytest
import torch
from torch import nn

from cotune.config import TrainSection
from cotune.train.state import Trainer, lr_factor


def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    params = dict(model.named_parameters())
    cfg = TrainSection(lr=0.05, max_grad_norm=1.0, schedule="constant")
    return model, Trainer(params, cfg, total_steps=10)


def run_steps(model, trainer, state, xs):
    with trainer.activate(state):
        for x in xs:
            trainer.set_lr(state.step)
            model(x).pow(2).mean().backward()
            trainer.clip_and_step()
            state.step += 1


def test_interleaved_roles_equal_roles_trained_alone():
    xs = [torch.randn(5, 4, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    model, trainer = make()
    init = {k: p.data.clone() for k, p in trainer.params.items()}
    a, b = trainer.new_state(1, init), trainer.new_state(2, init)
    for i in range(3):  # interleave A and B, two steps each turn
        run_steps(model, trainer, a, xs[2 * i : 2 * i + 2])
        run_steps(model, trainer, b, xs[::-1][2 * i : 2 * i + 2])

    model2, trainer2 = make()
    a2 = trainer2.new_state(1, init)
    run_steps(model2, trainer2, a2, xs)
    b2 = trainer2.new_state(2, init)
    run_steps(model2, trainer2, b2, xs[::-1])
    for k in init:
        torch.testing.assert_close(a.params[k], a2.params[k], rtol=0, atol=0)
        torch.testing.assert_close(b.params[k], b2.params[k], rtol=0, atol=0)
    assert not torch.equal(a.params["0.weight"], b.params["0.weight"])
    assert a.optim["0.weight"]["exp_avg"].shape == (8, 4)


def test_activation_does_not_copy_and_restores_global_rng():
    model, trainer = make()
    s = trainer.new_state(0)
    before = torch.get_rng_state()
    with trainer.activate(s):
        assert trainer.params["0.weight"].data.data_ptr() == s.params["0.weight"].data_ptr()
        torch.rand(3)
    assert torch.equal(before, torch.get_rng_state())
    with pytest.raises(RuntimeError), trainer.activate(s), trainer.activate(s):
        pass


@pytest.mark.parametrize(
    "schedule,step,expect",
    [
        ("constant", 50, 1.0),
        ("linear", 10, 1.0),
        ("linear", 60, 0.5),
        ("cosine", 60, 0.5),
        ("linear", 110, 0.0),
    ],
)
def test_lr_schedule(schedule, step, expect):
    assert lr_factor(step, 110, 10, schedule) == pytest.approx(expect)
    assert lr_factor(0, 110, 10, schedule) == pytest.approx(0.1)
    assert math.isfinite(lr_factor(200, 110, 10, schedule))


@pytest.mark.parametrize("bad", ["missing", "rng"])
def test_a_state_that_does_not_fit_is_refused_before_the_model_is_touched(bad):
    from cotune.errors import CheckpointError

    model, trainer = make()
    before = {k: p.data_ptr() for k, p in trainer.params.items()}
    state = trainer.new_state(1)
    state.params = {k: torch.zeros_like(v) for k, v in state.params.items()}
    if bad == "missing":
        state.params.pop(next(reversed(state.params)))
    else:
        state.rng = torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(CheckpointError, match="lacks 1 trained|RNG state"), trainer.activate(state):
        pass
    assert all(p.data_ptr() == before[k] for k, p in trainer.params.items())
    with trainer.activate(trainer.new_state(2)):  # nothing was left active
        pass
