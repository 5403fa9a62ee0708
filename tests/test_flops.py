"""``flop_counter``: torch's FLOP counter without its module tracker counts the same totals, and
counts attention on a CPU as torch counts its CUDA kernels."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cotune.flops import CPU_ATTENTION, flop_counter


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
    want = counted(FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION), model, x)
    assert want > 0
    assert counted(flop_counter(), model, x) == want
    with torch.no_grad(), flop_counter() as mode:
        model(x)
    assert 0 < mode.get_total_flops() < want


def test_attention_on_a_cpu_counts_what_torch_counts_for_its_cuda_kernels():
    """torch's counter knows the CUDA attention kernels, not the CPU's fused one: cotune adds
    it, with the CUDA kernels' formula (so a step counts the same on either device), forward
    and backward, grouped-query heads and a query shorter than the keys (decoding) too."""
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    plain = FlopCounterMode(display=False)
    for q_shape, kv_shape, gqa in (((2, 4, 9, 8), (2, 4, 9, 8), False),
                                   ((1, 6, 1, 16), (1, 2, 13, 16), True)):  # fmt: skip
        q = torch.randn(q_shape, requires_grad=True)
        kv = torch.randn(kv_shape, requires_grad=True)
        with plain:
            F.scaled_dot_product_attention(q, kv, kv, enable_gqa=gqa).sum().backward()
        assert plain.get_total_flops() == 0  # what torch alone counts on a CPU
        with flop_counter() as mode:
            out = F.scaled_dot_product_attention(q, kv, kv, enable_gqa=gqa)
            out.sum().backward()
        full = torch.Size([*kv_shape[:1], q_shape[1], *kv_shape[2:]])  # keys per query head
        fwd = flop_registry[aten._scaled_dot_product_flash_attention](
            q, torch.empty(full), torch.empty(full), out_val=None
        )
        bwd = flop_registry[aten._scaled_dot_product_flash_attention_backward](
            out, q, torch.empty(full), torch.empty(full), out_val=None
        )
        assert fwd > 0 and mode.get_total_flops() == fwd + bwd
