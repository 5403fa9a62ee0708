import json

import pytest
import torch

from cotune.build import build_experiment
from cotune.errors import ConfigError, DataError
from cotune.run import run_experiment
from tests.paradigms.test_central_local import records


def lm(tiny_config, name, devices=2, layers=4, **options):
    return tiny_config(
        name=name,
        model={
            "name_or_path": "random:gpt2",
            "task": "causal_lm",
            "random_config": {"n_layer": layers},
        },
        data={"labels": []},
        peft={"target_modules": ["c_attn"]},
        paradigm={"name": "fedbiot", "options": {"public_examples": 40, **options}},
        devices={"count": devices},
        train={"steps": 4},
        eval={"every": 2, "max_examples": 16},
    )


def test_emulator_layers_and_sharing(tiny_config, tmp_path):
    from cotune.paradigms.emulator import build_models

    cfg = lm(tiny_config, "emu", layers=6)
    exp, _ = build_experiment(cfg, tmp_path / "x", quiet=True)
    m = build_models(exp.model, adapter_layers=2, keep_layers=None, drop_ratio=0.5, mode="lora")
    assert m.kept == [0, 3] and m.adapter_blocks == [4, 5]
    assert m.emulator_layers == 4 and exp.loaded.anatomy.num_layers == 6
    emu_blocks, full_blocks = m.emu_anatomy.blocks, exp.loaded.anatomy.blocks
    assert emu_blocks[2] is full_blocks[4] and emu_blocks[3] is full_blocks[5]  # the adapter
    assert emu_blocks[0] is not full_blocks[0]  # an own copy, aligned on the server
    torch.testing.assert_close(
        emu_blocks[1].mlp.c_fc.weight, full_blocks[3].mlp.c_fc.weight, atol=0, rtol=0
    )
    assert all(".h.4." in k or ".h.5." in k for k in m.adapter_params)
    assert m.emu_forward(torch.ones(2, 8, dtype=torch.long)).shape[:2] == (2, 8)
    m3 = build_models(exp.model, adapter_layers=1, keep_layers=3, drop_ratio=0.5, mode="full")
    assert m3.emulator_layers == 4 and m3.kept == [0, 2, 4]
    assert all(not k.endswith(("lora_A.weight", "lora_B.weight")) for k in m3.adapter_params)


def test_alignment_lowers_the_loss_and_a_run_evaluates_both_ways(tiny_config):
    run_dir = run_experiment(
        lm(tiny_config, "run", initial_align_steps=15, align_steps=2, local_steps=2, align_lr=3e-3),
        quiet=True,
        report=False,
    )
    first = records(run_dir, "align")[0]
    assert first["round"] == 0 and first["loss_after"] < first["loss_before"]
    assert len(records(run_dir, "align")) == 3  # initial + one per round
    full, emu = records(run_dir, "eval", "server"), records(run_dir, "eval", "emulator")
    assert [r["step"] for r in full] == [r["step"] for r in emu] == [2, 4]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "perplexity" in summary["final"] and "emulator_perplexity" in summary["final"]
    assert summary["extra"]["emulator_layers"] == 3
    rounds = records(run_dir, "round")
    # Round 1 ships the whole emulator; round 2 only the re-aligned blocks + adapter.
    assert rounds[0]["bytes_down"] > rounds[1]["bytes_down"] > rounds[1]["bytes_up"]
    assert summary["costs"]["devices"]["flops"] > 0


def test_device_memory_and_flops_come_from_the_emulator(tiny_config):
    def cost(name, keep):
        d = run_experiment(
            lm(
                tiny_config,
                name,
                layers=6,
                keep_layers=keep,
                initial_align_steps=0,
                align_steps=0,
                local_steps=1,
                rounds=1,
            ),  # fmt: skip
            quiet=True,
            report=False,
        )
        s = json.loads((d / "summary.json").read_text())
        return s["costs"]["devices"]["flops"], s["costs"]["device_peak_memory_bytes"]

    small, big = cost("k1", 1), cost("k4", 4)
    assert small[0] < big[0] and small[1] < big[1]


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"keep_layers": 4}, ConfigError, r"paradigm.options.keep_layers: 4 is out of range"),
        ({"adapter_layers": 4}, ConfigError, r"paradigm.options.adapter_layers: 4 leaves no"),
        ({"public_dataset": "/nope/missing.jsonl"}, DataError, r"paradigm.options.public_dataset"),
    ],
)
def test_bad_options_name_the_option(tiny_config, options, error, match):
    with pytest.raises(error, match=match):
        run_experiment(lm(tiny_config, "bad", **options), quiet=True, report=False)


def test_resume_mid_run_equals_uninterrupted(tiny_config, monkeypatch):
    """The aligned emulator, the alignment optimizer and every device's adapter state are in the
    checkpoint: a run killed after round 2 of 4 ends exactly as the uninterrupted one."""
    from cotune.paradigms import emulator
    from tests.paradigms.test_central_local import final_params, kill_after

    base = lm(tiny_config, "bres", initial_align_steps=3, align_steps=2, local_steps=1)
    cfg = base.model_copy(update={"output": base.output.model_copy(update={"checkpoint_every": 2, "keep_checkpoints": 100}),
                                  "eval": base.eval.model_copy(update={"every": 1})})  # fmt: skip
    full = run_experiment(cfg, quiet=True, report=False)
    want, before = final_params(full), json.loads((full / "summary.json").read_text())
    align_before = [r["loss_after"] for r in records(full, "align")]
    kill_after(full, 2)
    (full / "summary.json").unlink()
    rounds, real = [], emulator.Aligner.run
    monkeypatch.setattr(
        emulator.Aligner,
        "run",
        lambda self, steps, g, t, rnd: rounds.append(rnd) or real(self, steps, g, t, rnd),
    )
    resumed = run_experiment(cfg, resume=True, quiet=True, report=False)
    assert rounds == [3, 4]  # no initial alignment, rounds 1-2 not run again
    got = final_params(resumed)
    for k in want["server"]:
        assert torch.equal(got["server"][k], want["server"][k]), k
    after = json.loads((resumed / "summary.json").read_text())
    assert after["final"] == before["final"] and after["bytes"] == before["bytes"]
    assert after["sim_time_s"] == pytest.approx(before["sim_time_s"])
    assert [r["loss_after"] for r in records(resumed, "align")] == align_before


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({}, r"model\.quantize: nf4: fedbiot aligns its emulator by training the base's lower"),
        ({"initial_align_steps": 0, "align_steps": 0, "adapter_mode": "full"},
         r"model\.quantize: nf4: adapter_mode full trains the top blocks' own weights"),
    ],
)  # fmt: skip
def test_a_quantized_base_is_refused_where_fedbiot_trains_base_weights(tiny_config, options, match):
    """The alignment trains the emulator's (base) blocks and adapter_mode full the top blocks:
    a quantized base has no weights to train there (it failed inside torch before). Without
    either, a quantized base is fine."""
    from cotune.paradigms.options import check_paradigm_options

    cfg = lm(tiny_config, "q", **options)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"quantize": "nf4"})})
    with pytest.raises(ConfigError, match=match):
        check_paradigm_options(cfg, "test")
    ok = lm(tiny_config, "q", initial_align_steps=0, align_steps=0)
    check_paradigm_options(
        ok.model_copy(update={"model": ok.model.model_copy(update={"quantize": "nf4"})}), "test"
    )
