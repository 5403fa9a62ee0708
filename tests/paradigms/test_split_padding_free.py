"""``train.padding_free`` in split learning: each side's blocks run on the real tokens only
(activations still cross the cut padded, zeros at the padding), giving the padded run's losses
to float rounding, the same bytes, and fewer counted FLOPs on both sides.

Compared over the first steps only: AdamW divides each gradient element by its own running
magnitude, so elements whose true gradient is ~0 turn rounding differences into updates of
the learning rate's order, and later losses drift apart by ~1e-3 (as any two summation orders
would)."""

import json

import pytest
import torch

from cotune.run import run_experiment
from cotune.rundir import latest_checkpoint

CASES = {
    "splitfed": {"name": "splitfed", "options": {"cut": 1, "cohort": False}},
    "splitfed-pooled": {
        "name": "splitfed", "options": {"cut": 1, "server_batch": "pooled", "cohort": False}},
    "splitfed-ushaped": {"name": "splitfed", "options": {
        "cut": 1, "u_shaped": True, "cohort": False, "server_side": "per_device"}},
    "split": {"name": "split", "options": {"cut": 1, "turn_steps": 2}},
    "splitfrozen": {"name": "splitfrozen", "options": {"cuts": [1, 1]}},
}  # fmt: skip


def outcome(run_dir):
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r["event"] == "train" and "loss" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    payload = torch.load(latest_checkpoint(run_dir), weights_only=False)
    return losses, summary, payload["states"]


# A causal-LM head (the server's, or a U-shaped device's top) computes its logits and loss
# for the real tokens only: quotes of unequal lengths, so batches carry padding.
CAUSAL = {
    "model": {"name_or_path": "random:gpt2", "task": "causal_lm", "max_length": 48},
    "data": {"dataset": "fortunes", "labels": [], "max_examples": 60},
    "peft": {"target_modules": ["c_attn"]},
}
LM_CASES = ["splitfed", "splitfed-pooled", "splitfed-ushaped", "splitfrozen"]


@pytest.mark.parametrize(
    ("case", "task"),
    [(c, "classification") for c in sorted(CASES)] + [(c, "causal_lm") for c in LM_CASES],
)
def test_padding_free_split_steps_equal_padded_ones_with_fewer_flops(tiny_config, case, task):
    got = {}
    for packed in (False, True):
        sections = CAUSAL if task == "causal_lm" else {}
        cfg = tiny_config(name=f"{case}-{task}-{packed}", paradigm=CASES[case],
                          train={"padding_free": packed, "steps": 3}, **sections)  # fmt: skip
        got[packed] = outcome(run_experiment(cfg, quiet=True, report=False))
    (padded, s0, w0), (packed, s1, w1) = got[False], got[True]
    assert len(padded) == len(packed) > 0
    # A vocabulary-wide loss (~6 nats here) drifts more in absolute terms by its third step.
    rtol = 1e-4 if task == "causal_lm" else 1e-5
    torch.testing.assert_close(torch.tensor(packed), torch.tensor(padded), atol=1e-5, rtol=rtol)
    assert set(w1) == set(w0)
    assert s1["bytes"] == s0["bytes"]  # the cut's tensors keep their padded shape
    flops = {p: s["costs"]["roles"] for p, s in ((False, s0), (True, s1))}
    assert flops[True]["server"]["flops"] < flops[False]["server"]["flops"]
    for role in [r for r in flops[False] if r.startswith("device-")]:
        assert flops[True][role]["flops"] < flops[False][role]["flops"], role
