"""Distilling the drafter: its loss falls, it drafts better than skipping the middle, and it is
saved and found again for the same cut only."""

from __future__ import annotations

import torch

from cotune.infer.drafter import DrafterTraining, load_drafter, save_drafter, train_drafter
from cotune.infer.generate import UGenerator
from cotune.infer.speculative import MiddleAdapter
from cotune.infer.split import UCut

from .test_generate import decoder


def _model_with_a_busy_middle():
    lm = decoder("gpt2", layers=4)
    with torch.no_grad():  # random blocks barely change the hidden state: make the middle matter
        for i in (1, 2):
            for name, p in lm.anatomy.blocks[i].named_parameters():
                if name.endswith(("c_proj.weight", "c_fc.weight")):
                    p.mul_(6.0)
    return lm


def test_distillation_lowers_the_loss_and_raises_acceptance(tmp_path):
    lm = _model_with_a_busy_middle()
    a = lm.anatomy
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(2, 60, (40,), generator=g).tolist() for _ in range(50)]
    before = [p.clone() for p in lm.model.parameters()]
    adapter, losses = train_drafter(a, UCut(1, 1), seqs, DrafterTraining(steps=100))
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])
    assert all(torch.equal(p, q) for p, q in zip(before, lm.model.parameters()))  # frozen
    assert all(p.requires_grad for p in lm.model.parameters())  # and left as it was

    def acceptance(drafter):
        outs = [UGenerator(a, UCut(1, 1), drafter=drafter, gamma=4).generate(s[:20], 20)
                for s in seqs[:10]]  # fmt: skip
        return sum(o.accepted for o in outs) / sum(o.drafted for o in outs)

    assert acceptance(adapter) > acceptance(MiddleAdapter(a.hidden_size)) + 0.02

    save_drafter(adapter, UCut(1, 1), tmp_path / "d", {"steps": 100})
    back = load_drafter(tmp_path / "d", UCut(1, 1), a.hidden_size)
    assert back is not None
    for k, v in adapter.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)
    assert load_drafter(tmp_path / "d", UCut(2, 1), a.hidden_size) is None  # another cut
    assert load_drafter(tmp_path / "nothing", UCut(1, 1), a.hidden_size) is None
