import json
import math

import pytest
import torch

from cotune.errors import ConfigError, ProtocolError
from cotune.paradigms import splitting
from cotune.run import run_experiment
from tests.paradigms.test_central_local import (
    final_params,
    records,
    resumed_without_final_checkpoint,
)

# Dropout off: one full forward and two segments under different role RNGs draw differently.
FAMILIES = {
    "bert": ({"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}, ["query", "value"]),
    "gpt2": ({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}, ["c_attn"]),
    "llama": ({"attention_dropout": 0.0}, ["q_proj", "v_proj"]),
}


def family_config(
    tiny_config, family, name, paradigm, layers=2, task="classification", method="lora", **kw
):
    rc, targets = FAMILIES[family]
    return tiny_config(
        name=name,
        model={
            "name_or_path": f"random:{family}",
            "task": task,
            "random_config": {**rc, "num_hidden_layers": layers},
        },
        peft={"target_modules": targets, "method": method},
        paradigm=paradigm,
        **kw,
    )


# Four steps, a small eval set: the equivalences show from the first step on.
LEAN = {"train": {"steps": 4}, "eval": {"every": 4, "max_examples": 16}}


def run(cfg):
    return run_experiment(cfg, quiet=True, report=False)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_one_device_equals_central_step_for_step(tiny_config, family):
    one = {"devices": {"count": 1}, **LEAN}
    c = run(family_config(tiny_config, family, "c", {"name": "central"}, **one))
    sf = {"name": "splitfed", "options": {"cut": 1, "aggregate_every": 1}}
    s = run(family_config(tiny_config, family, "s", sf, **one))
    c_loss = [r["loss"] for r in records(c, "train", "server")]
    s_loss = [r["loss"] for r in records(s, "train", "mean")]
    assert len(s_loss) == 4
    assert s_loss == pytest.approx(c_loss, abs=1e-5)
    # Global-norm clipping across the cut: grad norms match central's too.
    c_norm = [r["grad_norm"] for r in records(c, "train", "server")]
    assert [r["grad_norm"] for r in records(s, "train", "mean")] == pytest.approx(c_norm, rel=1e-5)
    pc, ps = final_params(c)["server"], final_params(s)["server"]
    assert set(pc) == set(ps)
    for k in pc:
        torch.testing.assert_close(ps[k], pc[k], atol=1e-5, rtol=0)


def _splitfed(**options):
    return {"name": "splitfed", "options": {"cut": 1, "aggregate_every": 1, **options}}


ACCUMULATION_CASES = {
    "splitfed": ("bert", _splitfed()),
    "splitfed-gpt2": ("gpt2", _splitfed()),
    "split": ("bert", {"name": "split", "options": {"cut": 1}}),
    "u-shaped": ("bert", _splitfed(u_shaped=True)),
    "u-shaped-gpt2": ("gpt2", _splitfed(u_shaped=True)),
    "splitfed-pooled": ("bert", _splitfed(server_batch="pooled")),
    "splitfed-pooled-gpt2": ("gpt2", _splitfed(server_batch="pooled")),
    "u-shaped-pooled": ("bert", _splitfed(u_shaped=True, server_batch="pooled")),
    "u-shaped-pooled-gpt2": ("gpt2", _splitfed(u_shaped=True, server_batch="pooled")),
}


@pytest.mark.parametrize(
    "family, paradigm", list(ACCUMULATION_CASES.values()), ids=list(ACCUMULATION_CASES)
)
def test_gradient_accumulation_across_the_cut_equals_central(tiny_config, family, paradigm):
    """train.grad_accum: each gradient round trip brings the device's next micro-batch up (its
    graph freed first), both sides accumulate and step once with the global norm: one device
    equals central with the same accumulation, step for step (losses, norms, weights)."""
    one = {"devices": {"count": 1}, "train": {"steps": 3, "grad_accum": 3, "batch_size": 4},
           "eval": {"every": 3, "max_examples": 16}}  # fmt: skip
    task = "causal_lm" if family == "gpt2" else "classification"
    c = run(family_config(tiny_config, family, "c", {"name": "central"}, task=task, **one))
    s = run(family_config(tiny_config, family, "s", paradigm, task=task, **one))
    c_rec, s_rec = records(c, "train", "server"), records(s, "train", "mean")
    assert len(s_rec) == 3
    assert [r["loss"] for r in s_rec] == pytest.approx([r["loss"] for r in c_rec], abs=1e-5)
    c_norm = [r["grad_norm"] for r in c_rec]
    assert [r["grad_norm"] for r in s_rec] == pytest.approx(c_norm, rel=1e-5)
    pc, ps = final_params(c)["server"], final_params(s)["server"]
    assert set(pc) == set(ps)
    for k in pc:
        torch.testing.assert_close(ps[k], pc[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize("accum, server", [(1, "sequential"), (3, "sequential"), (3, "pooled")])
def test_u_shaped_with_a_regularized_method_equals_central(tiny_config, accum, server):
    """KaSA's regularizer is split across the cut (each side its own adapters'); the logged
    loss adds both sides' shares, as central's does (the server's share was left out)."""
    one = {"devices": {"count": 1}, "train": {"steps": 3, "grad_accum": accum, "batch_size": 4},
           "eval": {"every": 3, "max_examples": 16}}  # fmt: skip
    u = {"name": "splitfed", "options": {"cut": 1, "aggregate_every": 1, "u_shaped": True,
                                         "server_batch": server}}  # fmt: skip
    c = run(family_config(tiny_config, "bert", "c", {"name": "central"}, method="kasa", **one))
    s = run(family_config(tiny_config, "bert", "u", u, method="kasa", **one))
    c_loss = [r["loss"] for r in records(c, "train", "server")]
    assert [r["loss"] for r in records(s, "train", "mean")] == pytest.approx(c_loss, abs=1e-6)
    pc, ps = final_params(c)["server"], final_params(s)["server"]
    for k in pc:
        torch.testing.assert_close(ps[k], pc[k], atol=1e-5, rtol=0)


def test_device_adapters_are_the_sample_weighted_mean(tiny_config, monkeypatch):
    uploads = []
    original = splitting.SplitDevice.on_get_adapter

    def spy(self, msg):
        rep = original(self, msg)
        uploads.append((self.role_id, {k: v.clone() for k, v in rep.tensors.items()}))
        return rep

    monkeypatch.setattr(splitting.SplitDevice, "on_get_adapter", spy)
    cfg = tiny_config(
        name="agg",
        paradigm={"name": "splitfed", "options": {"cut": 1, "aggregate_every": 2}},
        partition={"scheme": "quantity"},
        **LEAN,
    )
    run_dir = run(cfg)
    sizes = json.loads((run_dir / "summary.json").read_text())["partition"]["sizes"]
    assert sizes[0] != sizes[1] and len(uploads) == 4  # two rounds x two devices
    (_, u0), (_, u1) = uploads[-2:]
    final = final_params(run_dir)["server"]
    w0, w1 = sizes[0] / sum(sizes), sizes[1] / sum(sizes)
    for k in u0:
        torch.testing.assert_close(final[k], w0 * u0[k] + w1 * u1[k], atol=1e-7, rtol=1e-6)
    assert not torch.equal(u0[k], u1[k])


def test_device_trainable_share_is_cut_over_layers(tiny_config):
    sf = {"name": "splitfed", "options": {"cut": 1, "aggregate_every": 2}}
    cfg = family_config(tiny_config, "gpt2", "share", sf, layers=4, task="causal_lm",
                        train={"steps": 2}, eval={"every": 2, "max_examples": 8})  # fmt: skip
    summary = json.loads((run(cfg) / "summary.json").read_text())
    extra, total = summary["extra"], summary["trainable_params"]
    # fedavg trains `total` on every device; splitfed with cut 1 of 4 holds a quarter of it.
    assert extra["device_trainable_params"] * 4 == total
    assert extra["device_trainable_params"] + extra["server_trainable_params"] == total
    roles = summary["costs"]["roles"]
    assert roles["device-0"]["flops"] > 0 and roles["server"]["flops"] > 0
    assert roles["device-0"]["memory_bytes"] > 0 and roles["device-0"]["memory_fits"]


@pytest.mark.parametrize("paradigm", ["splitfed", "splitfrozen"])
def test_a_bfloat16_base_trains_across_the_cut(tiny_config, paradigm):
    """model.dtype bfloat16: the cut carries bf16 activations, and the server's memory probe
    feeds its segment bf16 too (it fed float32 and the run stopped in the first matmul)."""
    sf = {"name": paradigm, "options": {"cut": 1} if paradigm == "splitfed" else {"max_cut": 1}}
    cfg = family_config(tiny_config, "bert", f"bf16-{paradigm}", sf, train={"steps": 2},
                        eval={"every": 2, "max_examples": 8})  # fmt: skip
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": "bfloat16"})})
    summary = json.loads((run(cfg) / "summary.json").read_text())
    assert math.isfinite(summary["final"]["loss"])
    assert summary["costs"]["roles"]["server"]["memory_bytes"] > 0


def test_per_device_server_copies_train(tiny_config):
    sf = {
        "name": "splitfed",
        "options": {"cut": 1, "aggregate_every": 2, "server_side": "per_device"},
    }
    summary = json.loads(
        (run(tiny_config(name="pd", paradigm=sf, **LEAN)) / "summary.json").read_text()
    )
    assert 0.0 <= summary["final"]["accuracy"] <= 1.0 and summary["sim_time_s"] > 0


@pytest.mark.parametrize(
    "options, match",
    [
        ({"cut": 5}, r"cut: 5 is outside the model"),
        ({"cut": 0}, r"paradigm.options.cut: Input should be greater than or equal to 1 \(got 0\)"),
        ({"cut": 2}, r"leaves the server nothing"),
        ({"cut": 1, "u_shaped": True, "cut_top": 1}, r"cut_top"),
        ({"cutt": 1}, r"paradigm.options.cutt: unknown option"),
    ],
)
def test_bad_cuts_are_config_errors(tiny_config, options, match):
    with pytest.raises(ConfigError, match=match):
        run(tiny_config(name="bad", paradigm={"name": "splitfed", "options": options}))


def corrupt_device_1(monkeypatch, how):
    original = splitting.SplitDevice.outgoing

    def outgoing(self, acts, labels):
        out = original(self, acts, labels)
        if self.role_id == "device-1":
            out = how(dict(out))
        return out

    monkeypatch.setattr(splitting.SplitDevice, "outgoing", outgoing)


def nan_hidden(out):
    out["hidden"] = out["hidden"].clone()
    out["hidden"][0, 0, 0] = float("nan")
    return out


@pytest.mark.parametrize(
    "how, match",
    [
        (nan_hidden, r"'device-1': tensor 'hidden': 1 NaN"),
        (
            lambda o: {**o, "hidden": o["hidden"][..., :-1]},
            r"'hidden': expected shape \[\*, \*, 64\]",
        ),
        (lambda o: {**o, "hidden": o["hidden"].double()}, r"expected dtype torch.float32"),
    ],
)
def test_bad_activations_stop_the_run(tiny_config, monkeypatch, how, match):
    corrupt_device_1(monkeypatch, how)
    sf = {"name": "splitfed", "options": {"cut": 1}}
    with pytest.raises(ProtocolError, match=match):
        run(tiny_config(name="nan", paradigm=sf, train={"steps": 1}))


@pytest.mark.parametrize(
    "where", ["device_reg", "u-loss", "u-loss-pooled", "pooled-norm", "norm-reply"]
)
def test_a_peers_bad_number_is_a_protocol_error_naming_it(tiny_config, monkeypatch, where):
    """Numbers a device puts in its messages' meta (its regularizer, its top's loss, its
    squared gradient norm) are checked like its tensors: a clear error, not a traceback."""
    opts = {"cut": 1, "cohort": False}
    if where == "device_reg":
        original = splitting.SplitDevice.upload

        def upload(self, *args):
            tensors, meta = original(self, *args)
            return tensors, {**meta, "device_reg": "lots"} if self.role_id == "device-1" else meta

        monkeypatch.setattr(splitting.SplitDevice, "upload", upload)
        match = "'activations' from 'device-1'.*meta 'device_reg' is 'lots'"
    elif where in ("u-loss", "u-loss-pooled"):
        opts.update(u_shaped=True)
        if where == "u-loss":
            opts.update(server_side="per_device")
        else:
            opts.update(server_batch="pooled")
        original = splitting.SplitDevice.on_activations

        def on_activations(self, msg):
            out = original(self, msg)
            out.meta["loss"] = "low"
            return out

        monkeypatch.setattr(splitting.SplitDevice, "on_activations", on_activations)
        match = "'gradients' from 'device-0'.*meta 'loss' is 'low'"
    else:
        if where == "pooled-norm":
            opts.update(server_batch="pooled")
        monkeypatch.setattr(splitting, "sq_norm", lambda grads: -1.0 if grads else 0.0)
        match = "meta 'device_sq' is -1.0, expected a finite number >= 0"
    sf = {"name": "splitfed", "options": opts}
    with pytest.raises(ProtocolError, match=match):
        run(tiny_config(name="bad-number", paradigm=sf, train={"steps": 1}))


def test_bad_activations_can_be_skipped(tiny_config, monkeypatch):
    corrupt_device_1(monkeypatch, nan_hidden)
    sf = {"name": "splitfed", "options": {"cut": 1, "on_bad_message": "skip"}}
    run_dir = run(
        tiny_config(
            name="skip", paradigm=sf, train={"steps": 2}, eval={"every": 2, "max_examples": 16}
        )
    )
    skips = records(run_dir, "skip")
    assert [(r["step"], r["role"]) for r in skips] == [(1, "device-1"), (2, "device-1")]
    assert "NaN" in skips[0]["error"]
    for v in final_params(run_dir)["server"].values():
        assert torch.isfinite(v).all()


@pytest.mark.parametrize(
    "paradigm",
    [
        {
            "name": "splitfed",
            "options": {"cut": 1, "aggregate_every": 3, "server_side": "per_device"},
        },
        # The cohort's "FLOPs known?" decisions come from the checkpointed FLOP counter.
        {"name": "splitfed", "options": {"cut": 1, "aggregate_every": 3, "server_batch": "pooled"}},
        {"name": "split", "options": {"cut": 1, "turn_steps": 1}},
        {"name": "splitfrozen", "options": {"cuts": [1, 1]}},
    ],
    ids=["splitfed-per-device", "splitfed-pooled-cohort", "split", "splitfrozen"],
)
def test_resume_mid_run_equals_uninterrupted(tiny_config, paradigm):
    cfg = tiny_config(
        name="res",
        paradigm=paradigm,
        train={"steps": 4},
        eval={"every": 2, "max_examples": 16},
        output={"checkpoint_every": 2, "keep_checkpoints": 100},
    )
    full = run(cfg)
    want = final_params(full)["server"]
    resumed = resumed_without_final_checkpoint(cfg, full)
    got = final_params(resumed)["server"]
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_devices_without_aggregation_train_as_local_devices(tiny_config, monkeypatch):
    """Per-device server copies and no FedAvg within the run: every device (with its server copy)
    trains alone on its shard, exactly as the `local` paradigm does. Catches a device backward
    that runs through another device's adapter weights (all forwards come before the backwards)."""
    uploads = {}
    original = splitting.SplitDevice.on_get_adapter

    def spy(self, msg):
        rep = original(self, msg)
        uploads[self.role_id] = {k: v.clone() for k, v in rep.tensors.items()}
        return rep

    monkeypatch.setattr(splitting.SplitDevice, "on_get_adapter", spy)
    bert = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    common = dict(model={"random_config": bert}, partition={"scheme": "dirichlet", "alpha": 0.3},
                  **LEAN)  # fmt: skip
    sf = {"name": "splitfed",
          "options": {"cut": 1, "aggregate_every": 100, "server_side": "per_device"}}  # fmt: skip
    run(tiny_config(name="sf", paradigm=sf, **common))
    local = final_params(run(tiny_config(name="loc", paradigm={"name": "local"}, **common)))
    assert set(uploads) == {"device-0", "device-1"}
    for dev, got in uploads.items():
        for k, v in got.items():
            torch.testing.assert_close(v, local[dev][k], atol=1e-5, rtol=0)


BERT_NO_DROPOUT = {
    "random_config": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
}


def _cohort_runs(tiny_config, monkeypatch, options, family="bert", new_shape_at=None, train=None):
    """The run with the cohort on and off; ``new_shape_at``: at that step the second device's
    batch shape counts as never seen (dynamic padding meeting a new length)."""
    from cotune.paradigms import split_cohort

    calls = []
    original = split_cohort.DeviceCohort.forward

    def spy(self, devices, step, rnd):
        if step == new_shape_at:
            real_known, asked = self.flops.known, []

            def known(key, dims):  # asked per device in order: (fwd, bwd), (fwd, bwd), ...
                asked.append(key)
                return None if len(asked) == 3 else real_known(key, dims)

            self.flops.known = known
            try:
                together = original(self, devices, step, rnd)
            finally:
                del self.flops.known
            calls.append((step, len(together), len(devices)))
            return together
        together = original(self, devices, step, rnd)
        if together:
            calls.append((step, len(together), len(devices)))
        return together

    monkeypatch.setattr(split_cohort.DeviceCohort, "forward", spy)
    # Whether the cohort's passes (forward, and backward where blocks recompute) ran packed.
    packed_passes = []
    real_groups = split_cohort.row_groups

    def groups(*args):
        from cotune.models import packing

        packed_passes.append(packing.requested())
        return real_groups(*args)

    monkeypatch.setattr(split_cohort, "row_groups", groups)
    out = {}
    for together in (True, False):
        sf = {"name": "splitfed", "options": {"cut": 1, "aggregate_every": 3, **options,
                                              "cohort": together}}  # fmt: skip
        task = "causal_lm" if family == "gpt2" else "classification"
        out[together] = run(family_config(tiny_config, family, f"co{together}", sf, task=task,
                                          devices={"count": 3},
                                          train={"steps": 8, **(train or {})},
                                          eval={"every": 8, "max_examples": 16}))  # fmt: skip
    assert set(packed_passes) == {bool((train or {}).get("padding_free"))}
    return out, calls


@pytest.mark.parametrize(
    "family, options, train",
    [
        ("bert", {"server_batch": "pooled"}, None),
        ("bert", {"server_batch": "sequential", "clip": "per_side"}, None),
        ("gpt2", {"server_batch": "pooled"}, None),  # causal LM: per-token labels, padded pooling
        ("bert", {"server_batch": "pooled"}, {"gradient_checkpointing": True}),
        # Padding-free: the joint batch's packed tokens split by member, FLOPs by real tokens.
        ("bert", {"server_batch": "pooled"}, {"padding_free": True}),
        ("gpt2", {"server_batch": "pooled"}, {"padding_free": True}),
        (
            "bert",
            {"server_batch": "sequential", "clip": "per_side"},
            {"padding_free": True, "gradient_checkpointing": True},
        ),
    ],
    ids=[
        "pooled",
        "sequential",
        "pooled-gpt2-lm",
        "checkpointed",
        "padding-free",
        "padding-free-gpt2-lm",
        "padding-free-checkpointed",
    ],
)
def test_device_cohort_equals_one_device_at_a_time(
    tiny_config, monkeypatch, family, options, train
):
    """Once the device shapes' FLOPs are known, the devices run as one batch: same losses, same
    adapters, same FLOPs charged to every device, same bytes (checkpointed blocks recompute
    with each member's tensors)."""
    out, calls = _cohort_runs(tiny_config, monkeypatch, options, family, train=train)
    assert calls and max(calls)[0] == 8  # the cohort took over once the device shapes were counted
    a, b = (records(out[x], "train", "mean") for x in (True, False))
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-5)
    pa, pb = final_params(out[True])["server"], final_params(out[False])["server"]
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], atol=1e-5, rtol=1e-4)
    sa, sb = (json.loads((out[x] / "summary.json").read_text())["costs"] for x in (True, False))
    for role in ("device-0", "device-1", "device-2", "server"):
        assert sa["roles"][role]["flops"] == sb["roles"][role]["flops"], role
        for key in ("bytes_up", "bytes_down"):
            assert sa["roles"][role][key] == sb["roles"][role][key], (role, key)


def test_a_device_with_a_new_batch_shape_runs_beside_the_cohort(tiny_config, monkeypatch):
    """A step in which one device's batch has a length the FLOP counter has not seen: that
    device runs (and is counted) on its own, the others still as one batch; the run equals
    one device at a time."""
    out, calls = _cohort_runs(tiny_config, monkeypatch, {"server_batch": "pooled"},
                              new_shape_at=4)  # fmt: skip
    assert (4, 2, 3) in calls and (5, 3, 3) in calls
    a, b = (records(out[x], "train", "mean") for x in (True, False))
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-5)
    pa, pb = final_params(out[True])["server"], final_params(out[False])["server"]
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], atol=1e-5, rtol=1e-4)
    sa, sb = (json.loads((out[x] / "summary.json").read_text()) for x in (True, False))
    assert sa["sim_time_s"] == pytest.approx(sb["sim_time_s"], rel=1e-9)
    for role in ("device-0", "device-1", "device-2", "server"):
        ra, rb = sa["costs"]["roles"][role], sb["costs"]["roles"][role]
        assert (ra["flops"], ra["bytes_up"], ra["bytes_down"]) == (
            rb["flops"], rb["bytes_up"], rb["bytes_down"]), role  # fmt: skip


def test_pooled_server_with_one_device_equals_central(tiny_config):
    one = {"devices": {"count": 1}, **LEAN}
    c = run(family_config(tiny_config, "bert", "c", {"name": "central"}, **one))
    sf = {"name": "splitfed", "options": {"cut": 1, "aggregate_every": 1, "server_batch": "pooled"}}
    s = run(family_config(tiny_config, "bert", "s", sf, **one))
    c_loss = [r["loss"] for r in records(c, "train", "server")]
    assert [r["loss"] for r in records(s, "train", "mean")] == pytest.approx(c_loss, abs=1e-5)
    c_norm = [r["grad_norm"] for r in records(c, "train", "server")]
    assert [r["grad_norm"] for r in records(s, "train", "mean")] == pytest.approx(c_norm, rel=1e-5)
    pc, ps = final_params(c)["server"], final_params(s)["server"]
    for k in pc:
        torch.testing.assert_close(ps[k], pc[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize("u_shaped", [False, True], ids=["label-sharing", "u-shaped"])
def test_pooled_cut_gradient_is_the_devices_own_loss_gradient(tiny_config, monkeypatch, u_shaped):
    """Step 1 (same server weights in both modes): under pooling every device receives the cut
    gradient the sequential server sends the device it serves first (U-shaped: each device's
    top got its own slice of the middle's output and sent back its own loss's gradient)."""
    got: dict[str, list[torch.Tensor]] = {}
    original = splitting.SplitDevice.on_gradients

    def spy(self, msg):
        if msg.meta["step"] == 1:
            got.setdefault(self.opts.server_batch, []).append(msg.tensors["grad"].clone())
        return original(self, msg)

    monkeypatch.setattr(splitting.SplitDevice, "on_gradients", spy)
    for mode in ("sequential", "pooled"):
        opts = {"cut": 1, "server_batch": mode, "cohort": False, "u_shaped": u_shaped}
        run(tiny_config(name=mode, paradigm={"name": "splitfed", "options": opts},
                        model=BERT_NO_DROPOUT, train={"steps": 1},
                        eval={"every": 1, "max_examples": 8}))  # fmt: skip
    seq, pooled = got["sequential"], got["pooled"]
    assert len(seq) == len(pooled) == 2
    matches = [torch.allclose(seq[0], p, atol=1e-6) for p in pooled if p.shape == seq[0].shape]
    assert any(matches)
    assert not torch.allclose(seq[1], pooled[1], atol=1e-6) or seq[1].shape != pooled[1].shape


def test_a_bad_u_turn_under_the_pooled_server_can_be_skipped(tiny_config, monkeypatch):
    """U-shaped, pooled, ``on_bad_message: skip``: a device whose top sends back a NaN gradient
    leaves that step (logged, told so); the others' step goes on and the weights stay finite."""
    original = splitting.SplitDevice.on_activations

    def on_activations(self, msg):
        out = original(self, msg)
        if self.role_id == "device-1":
            out.tensors["grad"] = torch.full_like(out.tensors["grad"], float("nan"))
        return out

    monkeypatch.setattr(splitting.SplitDevice, "on_activations", on_activations)
    sf = {"name": "splitfed", "options": {"cut": 1, "u_shaped": True, "server_batch": "pooled",
                                          "on_bad_message": "skip"}}  # fmt: skip
    run_dir = run(tiny_config(name="skip-u", paradigm=sf, train={"steps": 2},
                              eval={"every": 2, "max_examples": 16}))  # fmt: skip
    skips = records(run_dir, "skip")
    assert [(r["step"], r["role"]) for r in skips] == [(1, "device-1"), (2, "device-1")]
    assert "NaN" in skips[0]["error"]
    train = records(run_dir, "train", "mean")
    assert [r["step"] for r in train] == [1, 2] and all(math.isfinite(r["loss"]) for r in train)
    for v in final_params(run_dir)["server"].values():
        assert torch.isfinite(v).all()


def test_pooled_server_needs_a_shared_server_side(tiny_config):
    sf = {"name": "splitfed",
          "options": {"cut": 1, "server_batch": "pooled", "server_side": "per_device"}}  # fmt: skip
    with pytest.raises(ConfigError, match="server_batch"):
        run(tiny_config(name="bad", paradigm=sf))


@pytest.mark.parametrize("coef, batched", [(0.01, False), (0.0, True)])
def test_router_balance_loss_keeps_devices_one_at_a_time(tiny_config, monkeypatch, coef, batched):
    """MoSLD's load-balancing loss is computed from the last forward's router inputs: a batched
    forward would mix the devices' rows into it, so the cohort stands aside while it is on."""
    from cotune.paradigms import split_cohort

    ran = []
    original = split_cohort.DeviceCohort.forward
    monkeypatch.setattr(
        split_cohort.DeviceCohort,
        "forward",
        lambda self, *a: ran.append(True) or original(self, *a),
    )
    sf = {"name": "splitfed", "options": {"cut": 1, "server_batch": "pooled"}}
    peft = {"method": "mosld", "options": {"balance_coef": coef}}
    run(tiny_config(name=f"bal{coef}", paradigm=sf, peft=peft, model=BERT_NO_DROPOUT,
                    devices={"count": 3}, train={"steps": 3}, eval={"every": 3, "max_examples": 8}))  # fmt: skip
    assert bool(ran) is batched


def test_aggregation_period_in_client_batches_as_the_reference_counts(tiny_config):
    """SplitLoRA's reference counts the period in client batches: with 2 devices, every 4 batches
    is every 2 steps; every 3 batches aggregates in the steps where the count passes 3 and 6."""

    def splitfed(name, every, unit):
        opts = {"cut": 1, "aggregate_every": every, "aggregate_unit": unit}
        return run(tiny_config(name=name, paradigm={"name": "splitfed", "options": opts},
                               devices={"count": 2}, **LEAN))  # fmt: skip

    steps, batches = splitfed("steps", 2, "steps"), splitfed("batches", 4, "client_batches")
    assert [r["loss"] for r in records(batches, "train", "mean")] == [
        r["loss"] for r in records(steps, "train", "mean")
    ]
    odd = splitfed("odd", 3, "client_batches")
    # Batches 2, 4, 6, 8 after steps 1-4: aggregations end steps 2 and 3 (and the last, 4).
    assert [r["round"] for r in records(odd, "train", "mean")] == [1, 1, 2, 3]


@pytest.mark.parametrize("pooled", [False, True], ids=["sequential", "pooled-cohort"])
def test_a_step_costs_one_local_event_and_finishes_only_where_needed(
    tiny_config, monkeypatch, pooled
):
    """A device finishes a step at the start of its next: one `step` event per step, a
    `finish` only before aggregation (every 3 steps), evaluation (step 4) and the end; the
    records still carry every step's gradient norm, and the result equals finishing each step
    in its own event (the old protocol, forced by an evaluation after every step)."""
    from cotune.sim.grid import SimulatedGrid

    kinds: list[str] = []
    tick = SimulatedGrid.tick

    def counted(self, role_ids, kind, meta=None):
        kinds.append(kind)
        return tick(self, role_ids, kind, meta)

    monkeypatch.setattr(SimulatedGrid, "tick", counted)
    options = {"cut": 1, "aggregate_every": 3}
    if pooled:
        options.update(server_batch="pooled", cohort=True)
    paradigm = {"name": "splitfed", "options": options}
    lazy = run(tiny_config(name="lazy", paradigm=paradigm, train={"steps": 7},
                           eval={"every": 4, "max_examples": 16}))  # fmt: skip
    assert kinds.count("step") == 7
    assert kinds.count("finish") == 4  # steps 3, 4, 6 and 7
    kinds.clear()
    eager = run(tiny_config(name="eager", paradigm=paradigm, train={"steps": 7},
                            eval={"every": 1, "max_examples": 16}))  # fmt: skip
    assert kinds.count("finish") == 7
    a, b = records(lazy, "train", "mean"), records(eager, "train", "mean")
    assert [r["step"] for r in a] == list(range(1, 8))
    assert all(r["grad_norm"] is not None for r in a)
    for x, y in zip(a, b):
        assert (x["loss"], x["grad_norm"], x["lr"]) == (y["loss"], y["grad_norm"], y["lr"])
    want, got = final_params(eager)["server"], final_params(lazy)["server"]
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_gradient_accumulation_makes_the_cohort_stand_aside(tiny_config, caplog):
    import logging

    from cotune.paradigms import fed_cohort

    accum = {"train": {"grad_accum": 2, "steps": 2}, "eval": {"every": 2, "max_examples": 8}}
    fed_cohort._told.discard("train.grad_accum > 1")
    with caplog.at_level(logging.INFO, logger="cotune.paradigms.fed_cohort"):
        # (per-side clipping: a sequential server with global clipping has no cohort anyway)
        opts = {"cut": 1, "cohort": True, "clip": "per_side"}
        run(tiny_config(name="acc-cohort", paradigm={"name": "splitfed", "options": opts},
                        **accum))  # fmt: skip
    assert "train.grad_accum > 1, so split steps run device by device" in caplog.text


@pytest.mark.parametrize("server_batch", ["sequential", "pooled"])
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_bad_later_micro_batch_stops_the_run_or_skips_the_devices_step(
    tiny_config, monkeypatch, policy, server_batch
):
    """With train.grad_accum the second micro-batch comes up as a gradient's reply: checked
    like the first; skipped, the device's whole step goes (both sides' accumulated gradients)."""
    calls = {"n": 0}
    original = splitting.SplitDevice._next_micro

    def spy(self, msg, micro):
        calls["n"] += 1
        return original(self, msg, micro)

    monkeypatch.setattr(splitting.SplitDevice, "_next_micro", spy)
    first = splitting.SplitDevice.outgoing

    def outgoing(self, acts, labels):
        out = first(self, acts, labels)
        # device-1's micro-batches after the first (the ones sent as replies) carry a NaN
        return nan_hidden(dict(out)) if self.role_id == "device-1" and calls["n"] else out

    monkeypatch.setattr(splitting.SplitDevice, "outgoing", outgoing)
    opts = {"cut": 1, "on_bad_message": policy, "server_batch": server_batch, "cohort": False}
    sf = {"name": "splitfed", "options": opts}
    cfg = tiny_config(name=f"micro-{policy}-{server_batch}", paradigm=sf,
                      train={"steps": 2, "grad_accum": 2}, eval={"every": 2, "max_examples": 8})  # fmt: skip
    if policy == "stop":
        with pytest.raises(ProtocolError, match=r"'device-1': tensor 'hidden': 1 NaN"):
            run(cfg)
        return
    run_dir = run(cfg)
    skips = records(run_dir, "skip")
    assert [r["role"] for r in skips] and {r["role"] for r in skips} == {"device-1"}
    assert all("NaN" in r["error"] for r in skips)
    for v in final_params(run_dir)["server"].values():
        assert torch.isfinite(v).all()
