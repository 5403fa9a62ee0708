"""``evaluate`` on instruction data: ``exact_match`` is the share of prompted examples whose
response greedy decoding writes token for token."""

from __future__ import annotations

import pytest
import torch

from cotune.data.batching import EncodedDataset
from cotune.models.packing import padding_free
from cotune.models.segment import causal_eval, segment_loss
from cotune.train.loop import evaluate
from tests.models.models_testlib import DECODERS, VOCAB
from tests.models.test_packing import adapted


def greedy(forward, prompt: list[int], n: int) -> list[int]:
    """The prompt and ``n`` tokens generated from it one at a time, each the most likely."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = forward(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))
            seq.append(int(logits[0, -1].argmax()))
    return seq


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "padding-free"])
@pytest.mark.parametrize("kind", DECODERS)
def test_exact_match_is_whether_greedy_decoding_writes_the_response(kind, packed):
    loaded, _ = adapted(kind, "causal_lm")
    whole = loaded.anatomy.full()
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5, 2), (2, 5), (6, 3), (4, 1)]  # (prompt tokens, response tokens)
    rows = [greedy(whole, torch.randint(2, VOCAB, (p,), generator=g).tolist(), k)
            for p, k in shapes]  # fmt: skip
    for i in (1, 3):  # a response's last token is not the one greedy decoding picks
        rows[i][-1] = rows[i][-1] + 1 if rows[i][-1] + 1 < VOCAB else rows[i][-1] - 1
    plain = [5, 6, 7, 8, 9]  # a plain text beside the instructions: not an instruction
    lens = [p for p, _ in shapes]
    ds = EncodedDataset([*rows, plain], None, "causal_lm", 0, prompt_lens=[*lens, 0])
    with padding_free(packed):
        ev = evaluate(whole, loaded.model, ds, "causal_lm", batch_size=4)  # batches of 4 and 2
        b = ds.batch(list(range(len(ds))))
        loss, exact = causal_eval(whole, b.input_ids, b.attention_mask, b.labels)
    assert exact[:5].tolist() == [True, False, True, False, True]
    assert ev["exact_match"] == pytest.approx(3 / 5)
    plain_ds = EncodedDataset([*rows, plain], None, "causal_lm", 0)
    with padding_free(packed):
        ev_plain = evaluate(whole, loaded.model, plain_ds, "causal_lm", batch_size=4)
    assert "exact_match" not in ev_plain  # plain language modelling: no instructions to answer
    with padding_free(packed):  # the loss is segment_loss's, from the same logits
        want = segment_loss(whole, b.input_ids, b.attention_mask, b.labels, "causal_lm")
    torch.testing.assert_close(loss, want)
