"""fedavg's device cohort (paradigm.options.cohort): one batch per local step of a round's
devices, the same run as one by one to float precision, with the same messages and costs."""

import json

import pytest
import torch

from cotune.run import run_experiment
from tests.paradigms.test_central_local import final_params

CAUSAL = {
    "model": {"name_or_path": "random:llama", "task": "causal_lm"},
    "data": {"dataset": "austen", "view": "text", "labels": [], "max_examples": 60},
    "peft": {"target_modules": ["q_proj", "v_proj"]},
    "devices": {"count": 3},
    "train": {"steps": 6, "grad_accum": 2},
}


def fedavg(tiny_config, name, cohort, extra=None, **sections):
    options = {"local_steps": 3, "cohort": cohort, **(extra or {})}
    cfg = tiny_config(name=name, paradigm={"name": "fedavg", "options": options}, **sections)
    run_dir = run_experiment(cfg, quiet=True, report=False)
    return run_dir, json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("extra", [{}, {"prox_mu": 0.1}], ids=["fedavg", "fedprox"])
def test_cohort_rounds_equal_one_by_one_to_float_precision(tiny_config, extra):
    a_dir, a = fedavg(tiny_config, "seq", False, extra, **CAUSAL)
    b_dir, b = fedavg(tiny_config, "cohort", True, extra, **CAUSAL)
    pa, pb = final_params(a_dir), final_params(b_dir)
    for k in pa["server"]:
        torch.testing.assert_close(pb["server"][k], pa["server"][k], rtol=1e-4, atol=1e-6)
    assert b["final"]["loss"] == pytest.approx(a["final"]["loss"], rel=1e-5)
    # The same messages, bytes, counted FLOPs and simulated time.
    assert a["bytes"] == b["bytes"] and a["messages"] == b["messages"]
    assert b["sim_time_s"] == pytest.approx(a["sim_time_s"], rel=1e-9)
    assert b["costs"]["total"]["flops"] == a["costs"]["total"]["flops"]


def test_causal_lm_cohort_computes_the_real_tokens_logits_as_one_by_one(tiny_config, monkeypatch):
    """train.padding_free with a causal-LM head: the cohort projects each member's real tokens
    only onto the vocabulary, as the one-by-one steps do; both learn what the padded run
    learns, with fewer FLOPs."""
    sizes = cohort_sizes(monkeypatch)
    quotes = {"dataset": "fortunes", "labels": [], "max_examples": 60}  # unequal lengths
    packed = {**CAUSAL, "data": quotes,
              "train": {**CAUSAL["train"], "padding_free": True, "steps": 12}}  # fmt: skip
    from cotune.models import Segment

    rows, real = [], Segment.packed_logits

    def spy(self, inputs, attention_mask=None):
        if torch.is_grad_enabled():  # training steps (evaluation runs its own batches)
            rows.append(int(inputs.shape[0]))
        return real(self, inputs, attention_mask)

    monkeypatch.setattr(Segment, "packed_logits", spy)
    a_dir, a = fedavg(tiny_config, "seq-lm-pf", False, **packed)
    one = set(rows)
    b_dir, b = fedavg(tiny_config, "cohort-lm-pf", True, **packed)
    assert sizes and set(sizes) == {3}
    assert one and max(rows) == 3 * max(one)  # the joint batch's head ran packed too
    same_run(a_dir, a, b_dir, b)
    padded = {**CAUSAL, "data": quotes, "train": {**CAUSAL["train"], "steps": 12}}
    c_dir, c = fedavg(tiny_config, "seq-lm", False, **padded)
    assert a["final"]["loss"] == pytest.approx(c["final"]["loss"], rel=1e-4)
    assert a["costs"]["total"]["flops"] < c["costs"]["total"]["flops"]


def same_run(a_dir, a, b_dir, b, role="server"):
    """Two runs of one job, one by one and as cohorts: equal to float precision, with the
    same messages, bytes, counted FLOPs and simulated time."""
    pa, pb = final_params(a_dir), final_params(b_dir)
    for k in pa[role]:
        torch.testing.assert_close(pb[role][k], pa[role][k], rtol=1e-4, atol=1e-6)
    assert b["final"]["loss"] == pytest.approx(a["final"]["loss"], rel=1e-5)
    assert a["bytes"] == b["bytes"] and a["messages"] == b["messages"]
    assert b["sim_time_s"] == pytest.approx(a["sim_time_s"], rel=1e-9)
    assert b["costs"]["total"]["flops"] == a["costs"]["total"]["flops"]


def test_a_trained_classification_head_runs_once_per_device_in_the_cohort(tiny_config, monkeypatch):
    sizes = cohort_sizes(monkeypatch)
    a_dir, a = fedavg(tiny_config, "seq-head", False, devices={"count": 3})
    assert sizes == []
    b_dir, b = fedavg(tiny_config, "cohort-head", True, devices={"count": 3})
    assert sizes and set(sizes) == {3}  # batched, head and all
    same_run(a_dir, a, b_dir, b)


def run_pair(tiny_config, paradigm, options, **sections):
    out = []
    for cohort in (False, True):
        cfg = tiny_config(
            name=f"{paradigm}-{cohort}",
            paradigm={"name": paradigm, "options": {**options, "cohort": cohort}},
            **sections,
        )
        run_dir = run_experiment(cfg, quiet=True, report=False)
        out += [run_dir, json.loads((run_dir / "summary.json").read_text())]
    return out


@pytest.mark.parametrize("depth", [1, 2], ids=["top-block", "whole-model"])
def test_hierfed_group_members_train_as_one_cohort(tiny_config, monkeypatch, depth):
    sizes = cohort_sizes(monkeypatch)
    options = {"num_groups": 1, "controller": "fixed", "tau": 2, "depth": depth,
               "local_steps": 2}  # fmt: skip
    pair = run_pair(tiny_config, "hierfed", options, devices={"count": 3},
                    train={"steps": 8})  # fmt: skip
    assert sizes and set(sizes) == {3}
    same_run(*pair)


def test_fedbiot_devices_holding_one_emulator_train_as_one_cohort(tiny_config, monkeypatch):
    sizes = cohort_sizes(monkeypatch)
    sections = {
        "model": {"name_or_path": "random:gpt2", "task": "causal_lm",
                  "random_config": {"n_layer": 4}},
        "data": {"labels": []},
        "peft": {"target_modules": ["c_attn"]},
        "devices": {"count": 3},
        "train": {"steps": 6},
        "eval": {"every": 3, "max_examples": 16},
    }  # fmt: skip
    options = {"public_examples": 40, "local_steps": 3, "initial_align_steps": 2,
               "align_steps": 1}  # fmt: skip
    pair = run_pair(tiny_config, "fedbiot", options, **sections)
    assert sizes and set(sizes) == {3}
    same_run(*pair)


def test_cohort_under_dropouts_still_drops_the_same_devices(tiny_config):
    avail = {"devices": {"count": 3, "availability": {"kind": "random", "drop_p": 0.4}}}
    sections = {**CAUSAL, **avail}
    _, a = fedavg(tiny_config, "seq-drop", False, **sections)
    _, b = fedavg(tiny_config, "cohort-drop", True, **sections)
    assert a["bytes"] == b["bytes"]
    assert b["final"]["loss"] == pytest.approx(a["final"]["loss"], rel=1e-5)


def cohort_sizes(monkeypatch):
    """The number of devices in every joint batch a cohort runs (filled as the run goes)."""
    from cotune.paradigms import fed_cohort

    sizes = []
    real = fed_cohort._pad_cat

    def spy(batches, task):
        sizes.append(len(batches))
        return real(batches, task)

    monkeypatch.setattr(fed_cohort, "_pad_cat", spy)
    return sizes


def test_the_cohort_really_batches_the_devices(tiny_config, monkeypatch):
    sizes = cohort_sizes(monkeypatch)
    fedavg(tiny_config, "spy", True, **CAUSAL)
    # 2 rounds x 3 local steps x 2 micro-batches; the first step of a new shape runs one by one.
    assert sizes and set(sizes) == {3} and len(sizes) >= 6


def test_cohort_rows_bounds_each_pass_and_changes_nothing_else(tiny_config, monkeypatch):
    """``cohort_rows`` = two devices' batches: four devices run as two cohorts of two, and the
    run is the one-by-one run to float precision (messages, bytes, FLOPs, simulated time)."""
    sizes = cohort_sizes(monkeypatch)
    sections = {**CAUSAL, "devices": {"count": 4}}
    a_dir, a = fedavg(tiny_config, "seq-rows", False, **sections)
    rows = 2 * CAUSAL["train"].get("batch_size", 8)
    b_dir, b = fedavg(tiny_config, "rows", True, {"cohort_rows": rows}, **sections)
    assert sizes and set(sizes) == {2}
    same_run(a_dir, a, b_dir, b)


def test_padding_free_cohort_equals_padding_free_one_by_one(tiny_config, monkeypatch):
    """train.padding_free in a cohort (packed row groups, the head's first tokens only):
    the one-by-one padding-free run to float precision, FLOPs and simulated time included."""
    sizes = cohort_sizes(monkeypatch)
    # Steps run one by one until the (B, T, N) FLOP law is verified; then as cohorts.
    train = {"padding_free": True, "steps": 12}
    a_dir, a = fedavg(tiny_config, "seq-pf", False, devices={"count": 3}, train=train)
    b_dir, b = fedavg(tiny_config, "cohort-pf", True, devices={"count": 3}, train=train)
    assert sizes and set(sizes) == {3}
    same_run(a_dir, a, b_dir, b)


def test_padding_free_learns_what_the_padded_run_learns_with_fewer_flops(tiny_config):
    a_dir, a = fedavg(tiny_config, "padded", True, devices={"count": 3})
    b_dir, b = fedavg(tiny_config, "packed", True, devices={"count": 3},
                      train={"padding_free": True})  # fmt: skip
    pa, pb = final_params(a_dir), final_params(b_dir)
    for k in pa["server"]:
        torch.testing.assert_close(pb["server"][k], pa["server"][k], rtol=1e-4, atol=1e-6)
    assert b["final"]["accuracy"] == a["final"]["accuracy"]
    assert a["bytes"] == b["bytes"] and a["messages"] == b["messages"]
    assert 0 < b["costs"]["total"]["flops"] < 0.9 * a["costs"]["total"]["flops"]


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_cohort_with_gradient_checkpointing_equals_one_by_one(
    tiny_config, monkeypatch, padding_free
):
    """Checkpointed blocks recompute in backward: each member's rows must still run through
    its own adapter tensors then."""
    sizes = cohort_sizes(monkeypatch)
    train = {"gradient_checkpointing": True, "padding_free": padding_free, "steps": 12}
    a_dir, a = fedavg(tiny_config, "seq-ckpt", False, devices={"count": 3}, train=train)
    b_dir, b = fedavg(tiny_config, "cohort-ckpt", True, devices={"count": 3}, train=train)
    assert sizes and set(sizes) == {3}
    same_run(a_dir, a, b_dir, b)
