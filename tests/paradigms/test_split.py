import pytest
import torch

from cotune.build import build_experiment
from cotune.data import BatchSampler
from cotune.run import run_experiment
from cotune.runtime.local import LocalEngine
from cotune.train import full_model_loss, train_step
from tests.paradigms.test_central_local import final_params, records

NO_DROPOUT = {"random_config": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}


def by_hand(cfg, order, tmp_path):
    """One optimizer over the devices' batches in the order they take turns (no split)."""
    exp, _ = build_experiment(cfg, tmp_path / "hand", quiet=True)
    shards = [exp.train_set.subset(idx) for idx in exp.parts]
    samplers = [
        BatchSampler(len(s), cfg.train.batch_size, cfg.seed + i) for i, s in enumerate(shards)
    ]
    state = exp.trainer.new_state(cfg.seed, exp.initial_params())
    loss_fn = full_model_loss(exp.forward, exp.task, exp.adapters.regularization_loss)
    losses = []
    with exp.trainer.activate(state):
        for k in order:
            batch = shards[k].batch(samplers[k].next_indices())
            losses.append(train_step(exp.trainer, state, loss_fn, [batch]).loss)
    return losses, state.params


@pytest.mark.parametrize("relay, turn_steps", [("server", 2), ("p2p", 1)])
def test_devices_taking_turns_equal_one_optimizer_over_their_batches(
    tiny_config, tmp_path, relay, turn_steps
):
    cfg = tiny_config(
        name="sl",
        model=NO_DROPOUT,
        devices={"count": 2},
        train={"steps": 4},
        eval={"every": 4, "max_examples": 16},
        paradigm={"name": "split", "options": {"cut": 1, "turn_steps": turn_steps, "relay": relay}},
    )
    run_dir = run_experiment(cfg, quiet=True, report=False)
    order = [(s // turn_steps) % 2 for s in range(4)]
    want_loss, want_params = by_hand(cfg, order, tmp_path)
    train = records(run_dir, "train", "mean")
    assert [r["device"] for r in train] == [f"device-{k}" for k in order]
    assert [r["loss"] for r in train] == pytest.approx(want_loss, abs=1e-5)
    got = final_params(run_dir)["server"]
    for k, v in want_params.items():
        torch.testing.assert_close(got[k], v, atol=1e-5, rtol=0)


def test_u_shaped_labels_never_leave_the_device(tiny_config, monkeypatch):
    seen = []
    original = LocalEngine._transmit

    def spy(self, msg, codec, in_reply_to=None):
        seen.append((msg.sender, msg.receiver, msg.kind, set(msg.tensors)))
        return original(self, msg, codec, in_reply_to)

    monkeypatch.setattr(LocalEngine, "_transmit", spy)
    opts = {"cut": 1, "u_shaped": True, "cut_top": 2, "aggregate_every": 2}
    cfg = tiny_config(
        name="u",
        paradigm={"name": "splitfed", "options": opts},
        train={"steps": 1},
        eval={"every": 1, "max_examples": 16},
    )
    run_experiment(cfg, quiet=True, report=False)
    up = [s for s in seen if s[0].startswith("device") and s[1] == "server"]
    assert up and all("labels" not in names for *_, names in up)
    # Four messages per device and step: activations up and down, gradients up and down.
    step_kinds = [
        (s[0][:6], s[2])
        for s in seen
        if s[2] in ("activations", "gradients") and "device-0" in (s[0], s[1])
    ]
    assert step_kinds[:4] == [("device", "activations"), ("server", "activations"),
                              ("device", "gradients"), ("server", "gradients")]  # fmt: skip


def test_u_shaped_one_device_equals_central(tiny_config):
    one = {
        "devices": {"count": 1},
        "model": NO_DROPOUT,
        "train": {"steps": 4},
        "eval": {"every": 4},
    }
    c = run_experiment(tiny_config(name="c", **one), quiet=True, report=False)
    opts = {"cut": 1, "u_shaped": True, "aggregate_every": 1}
    u = run_experiment(
        tiny_config(name="u1", paradigm={"name": "splitfed", "options": opts}, **one),
        quiet=True,
        report=False,
    )
    c_loss = [r["loss"] for r in records(c, "train", "server")]
    assert [r["loss"] for r in records(u, "train", "mean")] == pytest.approx(c_loss, abs=1e-5)
    pc, pu = final_params(c)["server"], final_params(u)["server"]
    for k in pc:
        torch.testing.assert_close(pu[k], pc[k], atol=1e-5, rtol=0)
