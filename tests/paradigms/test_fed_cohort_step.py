"""The cohort's optimizer steps (``fed_cohort.apply_grads_many``): one joint AdamW call for all
members equals each member's own ``Trainer.step`` bit for bit: weights, moments, step counts,
reported gradient norms (clipping active), and the divergence guards per member."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cotune.config import TrainSection
from cotune.errors import DivergenceError
from cotune.paradigms.fed_cohort import apply_grads_many
from cotune.train import Trainer


class Meter:
    def __init__(self) -> None:
        self.charged: list[tuple[int, int]] = []

    def compute(self, flops, round, label):
        self.charged.append((flops, round))


def members(n=4, **cfg):
    torch.manual_seed(0)
    params = {"a": nn.Parameter(torch.randn(4, 3)), "b": nn.Parameter(torch.randn(3)),
              "c": nn.Parameter(torch.randn(2, 2))}  # fmt: skip
    section = TrainSection(lr=0.05, warmup_steps=2, schedule="linear", **cfg)
    trainer = Trainer(params, section, 10)
    devices = []
    for i in range(n):
        state = trainer.new_state(seed=i)
        state.params["a"].add_(i * 0.1)
        state.step = [0, 1, 3, 0][i % 4]
        devices.append(SimpleNamespace(role_id=f"device-{i}", state=state,
                                       ctx=SimpleNamespace(meter=Meter())))  # fmt: skip
    # Large gradients so max_grad_norm clips some members; one lacks a tensor's gradient.
    grads = [{k: torch.randn_like(p) * (0.3 + i) for k, p in params.items()} for i in range(n)]
    grads[1].pop("b")
    return trainer, devices, grads


def alone(trainer, device, grads, loss):
    """What the cohort did before: the member's own step through its trainer."""
    with trainer.activate(device.state):
        lr = trainer.set_lr(device.state.step)
        for k, p in trainer.params.items():
            p.grad = grads.get(k)
        try:
            norm = trainer.clip_and_step(loss=loss)
        except DivergenceError as err:
            raise err.for_role(device.role_id) from None
        device.state.step += 1
    return lr, norm


def check_equal(got, want):
    for g, w in zip(got, want):
        assert g.state.step == w.state.step
        for k in w.state.params:
            assert torch.equal(g.state.params[k], w.state.params[k]), (g.role_id, k)
            theirs = w.state.optim.get(k, {})
            assert set(g.state.optim.get(k, {})) == set(theirs)
            for m in theirs:
                assert torch.equal(g.state.optim[k][m], theirs[m]), (g.role_id, k, m)


@pytest.mark.parametrize("max_norm", [1.0, None], ids=["clipped", "unclipped"])
def test_joint_steps_equal_each_members_own_step(max_norm):
    trainer, devices, grads = members(max_grad_norm=max_norm)
    twin_trainer, twins = copy.deepcopy((trainer, devices))
    losses = [0.5, 0.7, 0.9, 1.1]
    for rnd in range(3):  # moments and schedules carry over between steps
        g = [{k: v * (rnd + 1) for k, v in d.items()} for d in grads]
        out = apply_grads_many(devices, trainer, [{k: v.clone() for k, v in d.items()} for d in g],
                               losses, [10, 20, 30, 40], [4, 4, 4, 4], rnd)  # fmt: skip
        want = [alone(twin_trainer, t, {k: v.clone() for k, v in d.items()}, x)
                for t, d, x in zip(twins, g, losses)]  # fmt: skip
        assert [(r.lr, r.grad_norm) for r in out] == want
        assert [r.flops for r in out] == [10, 20, 30, 40] and [r.loss for r in out] == losses
        check_equal(devices, twins)
    if max_norm is not None:
        assert sum(r.grad_norm > max_norm for r in out) >= 2  # clipping really happened
    assert devices[2].ctx.meter.charged == [(30, 0), (30, 1), (30, 2)]


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_a_non_finite_member_is_skipped_alone_or_stops_the_run_naming_it(what):
    trainer, devices, grads = members(on_nonfinite="skip")
    twin_trainer, twins = copy.deepcopy((trainer, devices))
    losses = [0.5, 0.7, 0.9, 1.1]
    if what == "loss":
        losses[2] = math.nan
    else:
        grads[2]["a"][0, 0] = math.inf
    mine = [{k: v.clone() for k, v in d.items()} for d in grads]  # the step clips in place
    out = apply_grads_many(devices, trainer, mine, losses, [1] * 4, [4] * 4, 0)
    want = [alone(twin_trainer, t, {k: v.clone() for k, v in d.items()}, x)
            for t, d, x in zip(twins, grads, losses)]  # fmt: skip
    assert [(r.lr, r.grad_norm) for r in out] == want
    assert out[2].grad_norm is None and trainer.skipped == twin_trainer.skipped == 1
    check_equal(devices, twins)

    trainer, devices, grads = members(on_nonfinite="stop")
    if what == "loss":
        losses[2] = math.nan
    else:
        grads[2]["a"][0, 0] = math.inf
    with pytest.raises(DivergenceError, match=f"non-finite {what}.*in role 'device-2'"):
        apply_grads_many(devices, trainer, grads, losses, [1] * 4, [4] * 4, 0)
