import json

import pytest
import torch

from cotune.errors import ConfigError, ProtocolError
from cotune.paradigms import splitfrozen
from cotune.run import run_experiment
from cotune.runtime.local import LocalEngine
from tests.paradigms.test_central_local import records


def frozen(tiny_config, name, layers=2, **kw):
    opts = kw.pop("options", {"cuts": [1, 1]})
    return tiny_config(
        name=name,
        model={"random_config": {"num_hidden_layers": layers}},
        paradigm={"name": "splitfrozen", "options": opts},
        **kw,
    )


def test_devices_never_change_and_never_hear_from_the_server(tiny_config, monkeypatch):
    seen, snapshots = [], {}
    transmit = LocalEngine._transmit

    def spy(self, msg, codec, in_reply_to=None):
        seen.append((msg.sender, msg.receiver, msg.kind))
        return transmit(self, msg, codec, in_reply_to)

    send = splitfrozen.FrozenDevice.tick_step

    def snap(self, meta):
        # The weights the device actually computes with, as the shared model holds them.
        with self.ctx.model.trainer.activate(self.state):
            now = {k: v.detach().clone() for k, v in self.segment.named_parameters()}
        snapshots.setdefault(self.role_id, []).append(now)
        return send(self, meta)

    monkeypatch.setattr(LocalEngine, "_transmit", spy)
    monkeypatch.setattr(splitfrozen.FrozenDevice, "tick_step", snap)
    run_dir = run_experiment(
        frozen(tiny_config, "fz", train={"steps": 3}, eval={"every": 3, "max_examples": 16}),
        quiet=True,
        report=False,
    )
    # The server tells each device its cut once, before training; then only uploads travel.
    told = [s for s in seen if s[0] == "server"]
    assert [s[2] for s in told] == ["configure", "configure"] and seen[:2] == told
    assert {s[2] for s in seen[2:]} == {"activations"}
    for snaps in snapshots.values():
        assert len(snaps) == 3
        for k, v in snaps[0].items():
            assert torch.equal(v, snaps[-1][k]), k
    train = records(run_dir, "train", "mean")
    assert len(train) == 3 and all(r["loss"] > 0 for r in train)
    # Pipelined, a device streams its next batch while the server trains on the previous one;
    # without pipelining it waits for the server's ack each step, so the run takes longer.
    monkeypatch.undo()
    cfg = frozen(tiny_config, "nopipe", train={"steps": 3}, eval={"every": 3, "max_examples": 16},
                 options={"cuts": [1, 1], "pipeline": False})  # fmt: skip
    slow = run_experiment(cfg, quiet=True, report=False)
    fast_s = json.loads((run_dir / "summary.json").read_text())["sim_time_s"]
    assert json.loads((slow / "summary.json").read_text())["sim_time_s"] > fast_s


def test_cuts_follow_device_speed_and_memory(tiny_config, tmp_path):
    profiles = tmp_path / "profiles.yaml"
    # "squeezed" is as fast as the laptop but has memory for the embeddings and 1 block only
    # (estimates of this model: 0.63 MB with 1 block, 0.77 MB with 2).
    profiles.write_text("squeezed: {base: laptop-cpu, memory_bytes: 700000}\n")
    cfg = frozen(
        tiny_config,
        "het",
        layers=4,
        options={"max_cut": 3},
        devices={"count": 3, "profiles": ["laptop-cpu", "phone-low", "squeezed"],
                 "profile_file": str(profiles)},
        train={"steps": 2},
        eval={"every": 2, "max_examples": 8},
    )  # fmt: skip
    summary = json.loads(
        (run_experiment(cfg, quiet=True, report=False) / "summary.json").read_text()
    )
    cuts = summary["extra"]["cuts"]
    assert cuts[0] == 3 and cuts[1] == 0 and 0 < cuts[2] < 3
    roles = summary["costs"]["roles"]
    assert roles["device-0"]["flops"] > roles["device-2"]["flops"] > roles["device-1"]["flops"]
    assert all(roles[f"device-{i}"]["memory_fits"] for i in range(3))


def test_segment_that_does_not_fit_is_a_clear_error(tiny_config, tmp_path):
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text("tiny: {base: phone-low, memory_bytes: 1000}\n")
    cfg = frozen(tiny_config, "oom", devices={"count": 2, "profiles": ["phone-mid", "tiny"],
                                              "profile_file": str(profiles)})  # fmt: skip
    with pytest.raises(
        ConfigError,
        match=r"device-1 \(profile 'tiny'\).*needs .* MiB but the profile allows 0.00 MiB",
    ):
        run_experiment(cfg, quiet=True, report=False)


def test_cut_leaving_the_server_nothing_is_an_error(tiny_config):
    with pytest.raises(ConfigError, match=r"cut 2 of device-1 .*leaves the server nothing"):
        run_experiment(
            frozen(tiny_config, "c2", options={"cuts": [1, 2]}), quiet=True, report=False
        )


def test_bad_activations_stop_or_are_skipped(tiny_config, monkeypatch):
    original = splitfrozen.FrozenDevice.outgoing

    def outgoing(self, acts, labels):
        out = original(self, acts, labels)
        if self.role_id == "device-1":
            out["labels"] = out["labels"][:-1]  # one label short of the batch
        return out

    monkeypatch.setattr(splitfrozen.FrozenDevice, "outgoing", outgoing)
    lean = {"train": {"steps": 1}, "eval": {"every": 1, "max_examples": 8}}
    with pytest.raises(ProtocolError, match=r"'device-1': tensor 'labels': expected shape \[8\]"):
        run_experiment(frozen(tiny_config, "stop", **lean), quiet=True, report=False)
    opts = {"cuts": [1, 1], "on_bad_message": "skip"}
    run_dir = run_experiment(
        frozen(tiny_config, "skip", options=opts, **lean), quiet=True, report=False
    )
    assert [r["role"] for r in records(run_dir, "skip")] == ["device-1"]


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "acknowledged"])
def test_gradient_accumulation_equals_the_larger_batch(tiny_config, pipeline):
    """train.grad_accum: a device uploads grad_accum batches a step, each on its own (a frozen
    forward keeps no graph), and the server takes one update per grad_accum uploads. With one
    device, 2 x batch 4 is the run of batch 8 to float rounding, in twice the messages."""
    from cotune.rundir import latest_checkpoint

    out = {}
    for accum, batch in ((2, 4), (1, 8)):
        cfg = frozen(tiny_config, f"acc{accum}", devices={"count": 1},
                     options={"cuts": [1], "pipeline": pipeline},
                     train={"steps": 3, "grad_accum": accum, "batch_size": batch},
                     eval={"every": 3, "max_examples": 16})  # fmt: skip
        out[accum] = run_experiment(cfg, quiet=True, report=False)
    a, b = (records(out[k], "train", "mean") for k in (2, 1))
    assert len(a) == 3 and [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-5)
    wa, wb = (torch.load(latest_checkpoint(out[k]), weights_only=False)["states"]["server"]
              for k in (2, 1))  # fmt: skip
    for k, v in wb["params"].items():
        torch.testing.assert_close(wa["params"][k], v, atol=1e-5, rtol=1e-4)
    sa, sb = (json.loads((out[k] / "summary.json").read_text()) for k in (2, 1))
    assert sa["messages"] == sb["messages"] + 3 * (2 if not pipeline else 1)  # uploads (+ acks)
