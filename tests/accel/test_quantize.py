"""model.quantize: bitsandbytes int8 / NF4 / FP4 bases under fp32 adapters, counted honestly."""

import dataclasses
import sys

import pytest
import torch

pytest.importorskip("bitsandbytes")

from cotune.accel.placement import place_model  # noqa: E402
from cotune.accel.quantize import is_quantized, stored_bytes  # noqa: E402
from cotune.config import PeftSection, RunConfig  # noqa: E402
from cotune.errors import AdapterError, ConfigError  # noqa: E402
from cotune.models import load_model, task_loss  # noqa: E402
from cotune.peft import inject_adapters  # noqa: E402
from cotune.sim.memory import model_param_bytes  # noqa: E402


def config(quantize, family="llama", **model):
    return RunConfig.model_validate(
        {
            "model": {
                "name_or_path": f"random:{family}",
                "task": "causal_lm",
                "max_length": 16,
                "quantize": quantize,
                "random_config": {"hidden_size": 128, "intermediate_size": 256}
                if family == "llama"
                else {"n_embd": 128, "n_inner": 256},
                **model,
            },
            "train": {"device": "cpu"},
        }
    )


def loaded(quantize, family="llama"):
    cfg = config(quantize, family)
    lm = load_model(cfg.model, vocab_size=64, seed=0)
    place_model(lm, cfg, torch.device("cpu"))
    return lm


@pytest.mark.parametrize("mode,bits", [("int8", 8), ("nf4", 4), ("fp4", 4)])
def test_block_linears_are_quantized_and_stay_close(mode, bits):
    ref, q = loaded("none"), loaded(mode)
    blocks = q.model.model.layers
    assert all(is_quantized(m) for m in (blocks[0].self_attn.q_proj, blocks[1].mlp.down_proj))
    assert not is_quantized(q.model.lm_head)  # embeddings and the head stay as they are
    ids = torch.randint(0, 64, (2, 8))
    a, b = ref.anatomy.full()(ids), q.anatomy.full()(ids)
    rel = (a - b).abs().max() / a.abs().max()
    assert rel < (0.05 if bits == 8 else 0.35)
    # Stored bytes of one quantized linear: bits/8 per weight plus its statistics (a scale per
    # row or per 64-weight block, and 4-bit's 256-entry fp32 code table of the nested state).
    lin = blocks[0].self_attn.q_proj
    n = lin.in_features * lin.out_features
    assert n * bits / 8 < stored_bytes(lin.weight, lin) < n * bits / 8 * 1.05 + 1024 + 64


def test_lora_trains_over_a_4bit_base_and_gradients_cross_it():
    lm = loaded("nf4")
    adapters = inject_adapters(lm.model, PeftSection(r=4, target_modules=["q_proj", "v_proj"]))
    assert all(p.dtype == torch.float32 for p in adapters.parameters())
    opt = torch.optim.AdamW(adapters.parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (4, 12))
    losses = []
    for _ in range(8):
        loss = task_loss(lm.anatomy.full()(ids), ids, "causal_lm")
        loss.backward()
        # The first block's adapter gets a gradient through every quantized layer above it.
        assert adapters.named_trainable()[next(iter(adapters.named_trainable()))].grad is not None
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("mode", ["nf4", "fp4", "int8"])
def test_an_evaluation_pass_leaves_the_gradients_through_the_base_as_they_were(mode):
    """bitsandbytes repacks a 4-bit weight for a CPU inference kernel (no backward) at the
    first eval-mode forward without gradients; cotune's base is always in eval mode, so an
    evaluation would have cut every later step's gradient through the frozen layers. The
    adapters' gradients after an evaluation equal those of a model that had none."""
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))

    def grads(evaluate_first: bool) -> dict[str, torch.Tensor]:
        lm = loaded(mode)
        torch.manual_seed(0)
        adapters = inject_adapters(lm.model, PeftSection(r=4, target_modules=["q_proj", "v_proj"]))
        for p in adapters.parameters():  # B = 0 at init: make every adapter's input gradient count
            torch.nn.init.normal_(p, std=0.1)
        if evaluate_first:
            with torch.no_grad():
                lm.anatomy.full()(ids)
        task_loss(lm.anatomy.full()(ids), ids, "causal_lm").backward()
        return {k: p.grad.clone() for k, p in adapters.named_trainable().items()}

    plain, after = grads(False), grads(True)
    assert plain.keys() == after.keys()
    for k in plain:
        assert torch.allclose(plain[k], after[k], rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("method", ["lora", "dora", "bora", "d2lora", "gelora", "modula", "mosld"])
def test_every_method_that_takes_a_quantized_base_trains_over_it(method):
    """The layer answers in the residual stream's dtype (a quantized weight is uint8 storage:
    BoRA cast its output to that) and every adapter tensor gets a gradient."""
    lm = loaded("nf4")
    adapters = inject_adapters(
        lm.model, PeftSection(method=method, r=4, target_modules=["q_proj", "v_proj"])
    )
    ids = torch.randint(0, 64, (2, 8))
    out = lm.anatomy.full()(ids)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    task_loss(out, ids, "causal_lm").backward()
    assert all(p.grad is not None for p in adapters.parameters())


def test_gpt2_conv1d_layers_are_quantized_too():
    lm = loaded("nf4", family="gpt2")
    attn = lm.model.transformer.h[0].attn.c_attn
    assert is_quantized(attn) and (attn.in_features, attn.out_features) == (128, 384)
    inject_adapters(lm.model, PeftSection(r=4, target_modules=["c_attn"]))
    ids = torch.randint(0, 64, (2, 8))
    assert torch.isfinite(lm.anatomy.full()(ids)).all()


def test_methods_that_read_the_base_see_it_dequantized_and_rewriters_refuse():
    lm = loaded("nf4")
    dora = inject_adapters(
        lm.model, PeftSection(method="dora", r=4, target_modules=["q_proj"])
    )  # DoRA's magnitude comes from the dequantized weight norm
    assert all(torch.isfinite(p).all() for p in dora.parameters())
    with pytest.raises(
        AdapterError, match="a quantized base cannot take; use model.quantize: none"
    ):
        inject_adapters(
            loaded("nf4").model, PeftSection(method="pissa", r=4, target_modules=["q_proj"])
        )


def test_the_memory_estimate_counts_quantized_bytes():
    """A phone-class budget that cannot hold the fp16 base can hold the 4-bit one."""
    from cotune.sim.profiles import get_profile

    fp16 = load_model(config("none", dtype="float16").model, vocab_size=64, seed=0)
    nf4 = loaded("nf4")
    fp16_bytes, nf4_bytes = sum(model_param_bytes(fp16.model)), sum(model_param_bytes(nf4.model))
    assert nf4_bytes < 0.6 * fp16_bytes
    phone = get_profile("phone-low")
    budget = (fp16_bytes + nf4_bytes) // 2
    tight = dataclasses.replace(phone, memory_bytes=budget)
    from cotune.sim.memory import estimate_memory

    def est(b):
        return estimate_memory(frozen_bytes=b, trainable_bytes=0, activation_bytes=0)

    assert not est(fp16_bytes).fits(tight) and est(nf4_bytes).fits(tight)


def test_quantize_errors_are_clear(monkeypatch):
    from cotune.accel.quantize import check_quantize

    with pytest.raises(ConfigError, match="model.quantize: nf4 runs on cuda or cpu .*not on mps"):
        check_quantize("nf4", torch.device("mps"))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ConfigError, match=r"needs bitsandbytes: pip install 'cotune\[quant\]'"):
        check_quantize("int8", torch.device("cpu"))


def test_a_fedavg_run_on_a_4bit_base_reports_less_device_memory(tiny_config):
    import json

    from cotune.run import run_experiment

    def run(quantize):
        cfg = tiny_config(
            name=f"q-{quantize}",
            model={"name_or_path": "random:llama", "task": "causal_lm", "quantize": quantize,
                   "random_config": {"hidden_size": 128, "intermediate_size": 512}},
            data={"dataset": "austen", "view": "text", "labels": [], "max_examples": 40},
            peft={"target_modules": ["q_proj", "v_proj"]},
            paradigm={"name": "fedavg"},
        )  # fmt: skip
        run_dir = run_experiment(cfg, quiet=True, report=False)
        return json.loads((run_dir / "summary.json").read_text())

    plain, nf4 = run("none"), run("nf4")
    assert 1 < nf4["final"]["perplexity"] < 2 * plain["final"]["perplexity"]
    assert nf4["costs"]["device_peak_memory_bytes"] < plain["costs"]["device_peak_memory_bytes"]
