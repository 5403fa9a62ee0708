"""``Trainer.step_many``: several roles' optimizer steps as one AdamW call equal each role's own
step, bit for bit, guards included."""

import copy

import pytest
import torch
from torch import nn

from cotune.config import TrainSection
from cotune.errors import DivergenceError
from cotune.train import Trainer


def setup(n_roles=3, **cfg):
    torch.manual_seed(0)
    params = {"a": nn.Parameter(torch.randn(4, 3)), "b": nn.Parameter(torch.randn(3))}
    trainer = Trainer(params, TrainSection(lr=0.05, warmup_steps=2, schedule="linear", **cfg), 10)
    states = [trainer.new_state(seed=i) for i in range(n_roles)]
    for i, s in enumerate(states):  # different starting points and step counts
        s.params["a"].add_(i * 0.1)
        s.step = [0, 0, 3][i % 3]
    grads = [{"a": torch.randn(4, 3), "b": torch.randn(3)} for _ in states]
    grads[1].pop("b")  # a role without a gradient for one tensor
    return trainer, states, grads


def one_at_a_time(trainer, states, grads, coefs):
    for state, g, coef in zip(states, grads, coefs):
        with trainer.activate(state):
            trainer.set_lr(state.step)
            for k, p in trainer.params.items():
                p.grad = g.get(k)
            trainer.step(coef, clip=False)
            state.step += 1


def test_joint_steps_equal_one_role_at_a_time_over_several_steps():
    trainer, states, grads = setup()
    twin = copy.deepcopy((trainer, states))
    coefs = [None, 0.5, 1.0]
    for step in range(3):
        g = [{k: v * (step + 1) for k, v in d.items()} for d in grads]
        trainer.step_many([(s, {k: v.clone() for k, v in d.items()}, c)
                           for s, d, c in zip(states, g, coefs)])  # fmt: skip
        one_at_a_time(twin[0], twin[1], [{k: v.clone() for k, v in d.items()} for d in g], coefs)
    for got, want in zip(states, twin[1]):
        assert got.step == want.step
        for k in got.params:
            assert torch.equal(got.params[k], want.params[k]), k
            mine, theirs = got.optim.get(k, {}), want.optim.get(k, {})
            assert set(mine) == set(theirs)  # none for a tensor the role never had a grad for
            for m in theirs:
                assert torch.equal(mine[m], theirs[m]), (k, m)


@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_a_role_with_a_non_finite_gradient_is_guarded_alone(mode):
    trainer, states, grads = setup(on_nonfinite=mode)
    twin = copy.deepcopy((trainer, states))
    grads[1]["a"][0, 0] = float("nan")
    updates = [(s, {k: v.clone() for k, v in d.items()}, None) for s, d in zip(states, grads)]
    if mode == "stop":
        with pytest.raises(DivergenceError, match="non-finite gradient.*at step 1"):
            trainer.step_many(updates)
        return
    trainer.step_many(updates)
    assert trainer.skipped == 1
    assert states[1].step == 1 and torch.equal(states[1].params["a"], twin[1][1].params["a"])
    one_at_a_time(twin[0], [twin[1][0], twin[1][2]], [grads[0], grads[2]], [None, None])
    for got, want in ((states[0], twin[1][0]), (states[2], twin[1][2])):
        assert torch.equal(got.params["a"], want.params["a"])


def test_roles_of_different_trainers_with_equal_settings_step_as_one_call(monkeypatch):
    """Every device builds its own trainer: their updates still join one AdamW call, and a
    single role's joint step equals its own ``step`` too."""
    from cotune.train.joint import step_roles

    trainer, states, grads = setup()
    other, _, _ = setup()  # same settings, its own Parameters
    twin = copy.deepcopy((trainer, states))
    calls = []
    real = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a: calls.append(1) or real(self))
    owners = [trainer, other, other]
    step_roles([(t, s, {k: v.clone() for k, v in g.items()}, 0.5)
                for t, s, g in zip(owners, states[:2], grads[:2])])  # fmt: skip
    assert len(calls) == 1  # both roles are at step 0: one learning rate, one call
    step_roles([(other, states[2], {k: v.clone() for k, v in grads[2].items()}, None)])
    one_at_a_time(twin[0], twin[1], grads, [0.5, 0.5, None])
    for got, want in zip(states, twin[1]):
        for k in got.params:
            assert torch.equal(got.params[k], want.params[k]), k


def test_a_joint_step_leaves_a_colocated_roles_pending_graph_intact():
    """Two roles' forwards, then one role's backward and update, then the other's backward:
    stepping the shared Parameter would break the second graph; a joint step does not."""
    from cotune.train.joint import step_roles

    trainer, states, _ = setup(n_roles=2)
    losses = []
    for s in states:
        with trainer.activate(s):  # the graph saves the Parameters themselves
            losses.append((trainer.params["a"] ** 2).sum() + (trainer.params["b"] ** 2).sum())
    for s, loss in zip(states, losses):
        with trainer.activate(s):
            loss.backward()
            g = {k: p.grad for k, p in trainer.params.items()}
        step_roles([(trainer, s, g, None)])  # before the other role's backward
    assert all(s.step == 1 for s in states)


@pytest.mark.parametrize("poison", [False, True])
def test_norms_the_caller_computed_stand_in_for_the_guards_own(poison):
    """``step_roles(norms=)``: a cohort passes the norms it clipped with; the update and the
    non-finite guard are those of computing them here."""
    from cotune.train.joint import step_roles

    trainer, states, grads = setup(on_nonfinite="skip")
    if poison:
        grads[2]["a"][1, 1] = float("inf")
    twin = copy.deepcopy((trainer, states))
    norms = [
        float(torch.nn.utils.get_total_norm([g[k] for k in trainer.params if k in g]))
        for g in grads
    ]
    given = step_roles([(trainer, s, {k: v.clone() for k, v in g.items()}, 0.5)
                        for s, g in zip(states, grads)], norms=norms)  # fmt: skip
    computed = step_roles([(twin[0], s, {k: v.clone() for k, v in g.items()}, 0.5)
                           for s, g in zip(twin[1], grads)])  # fmt: skip
    assert given == computed == [True, True, not poison]
    for got, want in zip(states, twin[1]):
        for k in got.params:
            assert torch.equal(got.params[k], want.params[k]), k
