import json
import shutil

import pytest
import torch

from cotune.errors import CheckpointError, DataError, RunDirError
from cotune.run import latest_checkpoint, run_experiment


def records(run_dir, event, role=None):
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["event"] == event and (role is None or r["role"] == role):
            out.append(r)
    return out


def kill_after(run_dir, step):
    """Simulate a run killed right after its step-``step`` checkpoint: later checkpoints go."""
    keep = f"step-{step:07d}"
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    assert any(c.name == keep for c in ckpts), [c.name for c in ckpts]
    for c in ckpts:
        if c.name > keep:
            shutil.rmtree(c)


def resumed_without_final_checkpoint(cfg, full):
    """Resume ``full`` (a finished run of ``cfg``) with its final checkpoint gone: what a run
    killed just before its end continues from."""
    shutil.rmtree(sorted((full / "checkpoints").iterdir())[-1])
    return run_experiment(cfg, resume=True, quiet=True, report=False)


def final_params(run_dir):
    payload = torch.load(latest_checkpoint(run_dir), weights_only=False)
    return {role: s["params"] for role, s in payload["states"].items()}


def test_central_trains_and_writes_run_dir(tiny_config):
    # A small training set the model can fit quickly, so "the loss goes down" is not noise.
    cfg = tiny_config(train={"steps": 12, "lr": 3e-2}, eval={"every": 6}, data={"max_examples": 24})
    run_dir = run_experiment(cfg, quiet=True)
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "report.html",
        "report.md",
        "labels.json",
    ):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    train = records(run_dir, "train", "server")
    assert [r["step"] for r in train] == list(range(1, 13))
    assert sum(r["loss"] for r in train[-4:]) < sum(r["loss"] for r in train[:4])
    evals = records(run_dir, "eval", "server")
    assert [r["step"] for r in evals] == [6, 12] and 0.0 <= evals[-1]["accuracy"] <= 1.0
    summary = json.loads((run_dir / "summary.json").read_text())
    # Centralized training moves every device's raw shard up to the server, and that is counted.
    assert summary["bytes"]["up"] > 0 and summary["final"]["accuracy"] == evals[-1]["accuracy"]
    assert summary["partition"]


def test_local_trains_each_device_separately(tiny_config):
    run_dir = run_experiment(
        tiny_config(name="loc", paradigm={"name": "local"}), quiet=True, report=False
    )
    roles = {r["role"] for r in records(run_dir, "eval")}
    assert roles == {"device-0", "device-1", "mean"}
    params = final_params(run_dir)
    assert set(params) == {"device-0", "device-1"}
    k = next(k for k in params["device-0"] if "lora_B" in k)
    assert not torch.equal(params["device-0"][k], params["device-1"][k])
    assert (run_dir / "adapter" / "device-1" / "adapter_config.json").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    # Local training never moves an adapter: only small control messages cross.
    assert summary["bytes"]["total"] < 20_000


def test_local_with_one_device_equals_central(tiny_config):
    one = {"devices": {"count": 1}}
    c = run_experiment(tiny_config(name="c", **one), quiet=True, report=False)
    lo = run_experiment(
        tiny_config(name="l", paradigm={"name": "local"}, **one), quiet=True, report=False
    )
    c_loss = [r["loss"] for r in records(c, "train", "server")]
    l_loss = [r["loss"] for r in records(lo, "train", "mean")]
    assert c_loss == pytest.approx(l_loss, abs=1e-6)
    pc, pl = final_params(c)["server"], final_params(lo)["device-0"]
    for k in pc:
        torch.testing.assert_close(pc[k], pl[k], atol=1e-6, rtol=0)


def test_same_seed_same_result(tiny_config):
    a = run_experiment(tiny_config(name="a"), quiet=True, report=False)
    b = run_experiment(tiny_config(name="b"), quiet=True, report=False)
    assert [r["loss"] for r in records(a, "train")] == [r["loss"] for r in records(b, "train")]


def test_resume_reaches_the_same_result(tiny_config):
    cfg = tiny_config(
        name="r",
        paradigm={"name": "local"},
        train={"steps": 8},
        eval={"every": 2},
        output={"checkpoint_every": 4, "keep_checkpoints": 100},
    )
    full = run_experiment(cfg, quiet=True, report=False)
    want = final_params(full)
    # Simulate a kill after the step-4 checkpoint: drop the final checkpoint and the later results.
    summary_before = json.loads((full / "summary.json").read_text())
    kill_after(full, 4)
    (full / "summary.json").unlink()
    resumed = run_experiment(cfg, resume=True, quiet=True, report=False)
    got = final_params(resumed)
    for role in want:
        for k in want[role]:
            torch.testing.assert_close(got[role][k], want[role][k], atol=0, rtol=0)
    steps = [r["step"] for r in records(resumed, "train", "mean")]
    assert steps == list(range(1, 9))
    summary = json.loads((resumed / "summary.json").read_text())
    # The simulated clock and byte counts carry on from the checkpoint.
    assert summary["sim_time_s"] == pytest.approx(summary_before["sim_time_s"])
    assert summary["bytes"] == summary_before["bytes"]
    with pytest.raises(RunDirError, match="already finished"):
        run_experiment(cfg, resume=True, quiet=True, report=False)


def test_existing_run_dir_is_not_clobbered(tiny_config):
    cfg = tiny_config(name="keep")
    run_dir = run_experiment(cfg, quiet=True, report=False)
    before = (run_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(RunDirError, match="--overwrite"):
        run_experiment(cfg, quiet=True, report=False)
    assert (run_dir / "metrics.jsonl").read_bytes() == before
    run_experiment(cfg, overwrite=True, quiet=True, report=False)


def test_checkpoint_from_another_config_is_refused(tiny_config):
    cfg = tiny_config(name="ck")
    run_experiment(cfg, quiet=True, report=False)
    other = tiny_config(name="ck", train={"lr": 0.5})
    with pytest.raises(CheckpointError, match=r"train.lr"):
        run_experiment(other, resume=True, quiet=True, report=False)


def test_bad_data_file_leaves_no_run_dir(tiny_config, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    cfg = tiny_config(name="bad", data={"dataset": str(bad), "labels": []})
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        run_experiment(cfg, quiet=True, report=False)
    assert not (tmp_path / "runs" / "bad").exists()


def test_empty_partition_is_an_error(tiny_config):
    with pytest.raises(DataError):
        run_experiment(tiny_config(name="e", devices={"count": 500}), quiet=True, report=False)


def test_bad_model_leaves_no_run_dir(tiny_config, tmp_path):
    from cotune.errors import ModelError

    with pytest.raises(ModelError):
        run_experiment(
            tiny_config(name="m", model={"name_or_path": str(tmp_path / "nowhere")}),
            quiet=True,
            report=False,
        )
    assert not (tmp_path / "runs" / "m").exists()


NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def test_gradient_accumulation_equals_the_larger_batch(tiny_config):
    model = {"random_config": NO_DROPOUT}
    big = run_experiment(
        tiny_config(name="big", model=model, train={"batch_size": 8, "grad_accum": 1}),
        quiet=True,
        report=False,
    )
    acc = run_experiment(
        tiny_config(name="acc", model=model, train={"batch_size": 4, "grad_accum": 2}),
        quiet=True,
        report=False,
    )
    # The sampler's order depends only on (seed, epoch): two micro-batches of 4 are the batch of 8.
    lb = [r["loss"] for r in records(big, "train", "server")]
    la = [r["loss"] for r in records(acc, "train", "server")]
    assert la == pytest.approx(lb, abs=1e-5)
    pb, pa = final_params(big)["server"], final_params(acc)["server"]
    for k in pb:
        torch.testing.assert_close(pa[k], pb[k], atol=1e-5, rtol=1e-4)


def test_time_to_target_is_reported(tiny_config):
    cfg = tiny_config(name="tt", eval={"target_accuracy": 0.01})
    summary = json.loads(
        (run_experiment(cfg, quiet=True, report=False) / "summary.json").read_text()
    )
    assert summary["time_to_target"]["step"] == 3
    assert summary["time_to_target"]["sim_time_s"] > 0


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda t: t["input_ids"].fill_(10**6), "token ids must lie in"),
        (lambda t: t["labels"].fill_(99), "tensor 'labels' must hold one of"),
        (
            lambda t: t["lengths"][:2].copy_(
                torch.tensor([-1, t["lengths"][0] + t["lengths"][1] + 1])
            ),
            "negative row length",
        ),
        (lambda t: t.update(input_ids=t["input_ids"].float()), "1-D integer tensor"),
        (lambda t: t["pad_id"].fill_(7), "pad id 7"),
        (lambda t: t.pop("labels"), "lack"),
    ],
)
def test_a_data_owners_bad_upload_is_left_out_of_the_pool(
    tiny_config, monkeypatch, caplog, damage, why
):
    """A data owner's upload is checked before the server trains on it: a bad one (ids past
    the vocabulary, unknown classes, negative lengths, floats, another pad id, missing labels)
    is logged naming the owner and left out; the run trains on the others' data."""
    from cotune.paradigms import central

    real = central.DataOwner.on_get_data

    def on_get_data(self, msg):
        out = real(self, msg)
        if self.role_id == "device-1":
            damage(out.tensors)
        return out

    monkeypatch.setattr(central.DataOwner, "on_get_data", on_get_data)
    pooled, receive = [], central.CentralServer.receive
    monkeypatch.setattr(
        central.CentralServer, "receive",
        lambda self, pool, senders: pooled.extend(senders) or receive(self, pool, senders),
    )  # fmt: skip
    cfg = tiny_config(name="bad-owner", devices={"count": 3}, train={"steps": 2}, eval={"every": 2})
    run_experiment(cfg, quiet=True, report=False)
    assert "left out of the pool: message 'data' from 'device-1'" in caplog.text
    assert why in caplog.text
    assert [s for s, _ in pooled] == ["device-0", "device-2"]


def test_a_data_owners_upload_must_count_its_examples():
    from cotune.data import EncodedDataset
    from cotune.errors import ProtocolError
    from cotune.paradigms.central import check_upload
    from cotune.runtime import Message

    data = EncodedDataset([[1, 2, 3], [4]], [0, 1], "classification", 0)
    msg = Message("data", "device-0", "server", data.to_tensors(), {"examples": 3})
    with pytest.raises(ProtocolError, match="meta 'examples' says 3, it holds 2"):
        check_upload(msg, task="classification", vocab=10, classes=2, pad_id=0)
    msg.meta["examples"] = 2
    check_upload(msg, task="classification", vocab=10, classes=2, pad_id=0)
