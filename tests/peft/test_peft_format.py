"""PEFT-format files: what is written, and the errors for broken or foreign adapter directories."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cotune.errors import AdapterError
from cotune.peft import inject_adapters, load_adapter, save_adapter
from cotune.peft.peft_format import CONFIG_NAME, WEIGHTS_NAME, peft_targets

from .peft_cases import MODEL_CASES, inputs, logits, peft_cfg, perturb


@pytest.fixture
def saved_bert(tmp_path):
    case = MODEL_CASES["bert_cls"]
    model = case.build()
    adapters = inject_adapters(model, peft_cfg("lora", case))
    perturb(adapters)
    save_adapter(adapters, tmp_path, base_model_name_or_path="tiny-bert", task="classification")
    return case, model, tmp_path


def test_written_files_follow_peft_layout(saved_bert):
    _, _, d = saved_bert
    config = json.loads((d / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert config["target_modules"] == ["dense", "query", "value"]
    assert config["modules_to_save"] == ["classifier"]
    assert config["base_model_name_or_path"] == "tiny-bert"
    assert (config["r"], config["lora_alpha"], config["bias"], config["fan_in_fan_out"]) == (
        4,
        8,
        "none",
        False,
    )
    keys = set(load_file(str(d / WEIGHTS_NAME)))
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert "base_model.model.bert.pooler.dense.lora_B.weight" in keys
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    assert all(k.startswith("base_model.model.") for k in keys)


def test_old_peft_head_key_spelling_loads(saved_bert):
    case, model, d = saved_bert
    w = load_file(str(d / WEIGHTS_NAME))
    w = {k.replace("classifier.", "classifier.modules_to_save."): v for k, v in w.items()}
    save_file(w, str(d / WEIGHTS_NAME))
    fresh = case.build()
    load_adapter(fresh, d)
    torch.testing.assert_close(logits(fresh, inputs()), logits(model, inputs()), atol=1e-5, rtol=0)


def test_missing_files(saved_bert, tmp_path):
    case, _, d = saved_bert
    with pytest.raises(AdapterError, match=f"{tmp_path / 'nowhere' / CONFIG_NAME}: not found"):
        load_adapter(case.build(), tmp_path / "nowhere")
    (d / WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterError, match=f"{WEIGHTS_NAME}: not found"):
        load_adapter(case.build(), d)


def test_corrupt_files(saved_bert):
    case, _, d = saved_bert
    data = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match=f"{WEIGHTS_NAME}: cannot read safetensors"):
        load_adapter(case.build(), d)
    (d / CONFIG_NAME).write_text("{not json")
    with pytest.raises(AdapterError, match=f"{CONFIG_NAME}: not valid JSON"):
        load_adapter(case.build(), d)


def test_key_matching_no_module_names_file_and_key(saved_bert):
    case, _, d = saved_bert
    w = load_file(str(d / WEIGHTS_NAME))
    w["base_model.model.bert.encoder.layer.0.attention.self.key.lora_A.weight"] = torch.zeros(4, 64)
    save_file(w, str(d / WEIGHTS_NAME))
    with pytest.raises(
        AdapterError, match=r"adapter_model.safetensors: key '.*self.key.lora_A.weight' matches no"
    ):
        load_adapter(case.build(), d)


def test_missing_adapter_tensor_and_shape_mismatch(saved_bert):
    case, _, d = saved_bert
    w = load_file(str(d / WEIGHTS_NAME))
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
    save_file({k: v for k, v in w.items() if k != key}, str(d / WEIGHTS_NAME))
    with pytest.raises(AdapterError, match="missing adapter tensors"):
        load_adapter(case.build(), d)
    save_file({**w, key: torch.zeros(3, 64)}, str(d / WEIGHTS_NAME))
    with pytest.raises(AdapterError, match="shape"):
        load_adapter(case.build(), d)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"peft_type": "IA3"}, r"peft_type 'IA3' is not supported; supported: \[.*'LORA'"),
        ({"use_bdlora": True}, r"\['use_bdlora'\] are not supported"),
        # Randomised SVD: the residual base cannot be rebuilt ("pissa"/"olora" load as cotune's pissa/olora).
        ({"init_lora_weights": "pissa_niter_4"}, "also changes the base weights"),
        ({"target_modules": ["nothing"]}, "match no module"),
        ({"target_modules": ["word_embeddings"]}, "is a Embedding"),
    ],
)
def test_unsupported_configs(saved_bert, change, message):
    case, _, d = saved_bert
    config = json.loads((d / CONFIG_NAME).read_text())
    (d / CONFIG_NAME).write_text(json.dumps({**config, **change}))
    with pytest.raises(AdapterError, match=message):
        load_adapter(case.build(), d)


def test_save_errors(tmp_path):
    case = MODEL_CASES["bert_cls"]
    adapters = inject_adapters(case.build(), peft_cfg("lora", case))
    with pytest.raises(AdapterError, match="unknown task"):
        save_adapter(adapters, tmp_path, base_model_name_or_path=None, task="regression")
    # PEFT excludes SEQ_CLS heads from targeting, so an adapted classifier cannot be expressed.
    adapters = inject_adapters(
        case.build(), peft_cfg("lora", case, r=2, target_modules=["classifier"], train_head=False)
    )
    with pytest.raises(AdapterError, match="modules_to_save"):
        save_adapter(adapters, tmp_path, base_model_name_or_path=None, task="classification")


def test_peft_target_rules():
    paths = ["m.layers.0.q", "m.layers.1.q", "m.layers.1.k", "head"]
    assert peft_targets(paths, ["q"]) == ["m.layers.0.q", "m.layers.1.q"]
    assert peft_targets(paths, ["q"], layers_to_transform=1) == ["m.layers.1.q"]
    assert peft_targets(paths, ["q"], [0], layers_pattern="layers") == ["m.layers.0.q"]
    assert peft_targets(paths, r".*\.(q|k)") == ["m.layers.0.q", "m.layers.1.q", "m.layers.1.k"]
    assert peft_targets(paths, ["head", "q"], modules_to_save=["head"]) == [
        "m.layers.0.q",
        "m.layers.1.q",
    ]
