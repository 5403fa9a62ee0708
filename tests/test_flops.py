"""``flop_counter``: torch's FLOP counter without its module tracker counts the same totals."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cotune.flops import flop_counter


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.conv = nn.Conv1d(d, d, 3, padding=1)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return x + self.out(h).relu()


def counted(counter, model, x):
    with counter as mode:
        model(x).square().sum().backward()  # forward and backward, input a leaf with grad
    return int(mode.get_total_flops())


def test_totals_equal_torchs_counter_forward_and_backward():
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    x = torch.randn(2, 5, 16, requires_grad=True)
    want = counted(FlopCounterMode(display=False), model, x)
    assert want > 0
    assert counted(flop_counter(), model, x) == want
    with torch.no_grad(), flop_counter() as mode:
        model(x)
    assert 0 < mode.get_total_flops() < want
