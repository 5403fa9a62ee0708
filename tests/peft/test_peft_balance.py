"""Router load balancing (MoSLD, MoDULA): the Switch-style auxiliary loss reaches every paradigm
through `regularization_loss` and evens out a router that starts lopsided."""

from __future__ import annotations

import pytest
import torch

from cotune.errors import AdapterError
from cotune.peft import LayerSpec, get_method
from cotune.peft.mosld import balance_loss

from .peft_cases import MODEL_CASES, peft_cfg


def test_balance_loss_values():
    e = 4
    uniform = torch.zeros(6, e)  # equal logits: a dense mixture counts argmax picks
    # Perfect balance: each expert picked equally often, equal mean probability.
    spread = torch.eye(e).repeat(3, 1) * 10.0
    assert float(balance_loss(spread, 1)) == pytest.approx(1.0, abs=1e-3)
    collapsed = torch.zeros(12, e)
    collapsed[:, 0] = 10.0
    assert float(balance_loss(collapsed, 1)) == pytest.approx(e, abs=1e-3)
    assert float(balance_loss(uniform, 0)) == pytest.approx(1.0)


def _usage(layer, x) -> torch.Tensor:
    probs = torch.softmax(layer.lora_router(x), -1)
    return torch.bincount(probs.argmax(-1), minlength=probs.shape[-1]).float() / len(x)


def _train_router(method: str, coef: float, bias: float = 1.0, **options) -> torch.Tensor:
    torch.manual_seed(0)
    spec = get_method(method)
    opts = spec.parse_options({"balance_coef": coef, "top_k": 1, **options})
    layer = spec.layer_cls(torch.nn.Linear(8, 8), LayerSpec("x", r=2, alpha=4.0, options=opts))
    if method == "modula":
        layer.set_stage("router")
    with torch.no_grad():
        for t in layer.adapter_tensors().values():
            t.normal_(0, 0.2)  # trained experts
        layer.lora_router.weight[0] += bias  # lopsided: expert 0 gets most inputs at the start
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g) + 1.0
    target = torch.randn(64, 8, generator=g)
    opt = torch.optim.SGD([layer.lora_router.weight], lr=0.5)
    start = _usage(layer, x)
    layer.train()
    for _ in range(40):
        loss = ((layer(x) - target) ** 2).mean()
        reg = layer.regularization_loss()
        assert (reg is None) == (coef == 0)
        loss = loss + reg if reg is not None else loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert layer.regularization_loss() is None  # handed out once per forward
    return start, _usage(layer, x)


@pytest.mark.parametrize(("method", "options"), [("mosld", {}), ("modula", {"num_experts": 3})])
def test_balance_loss_evens_out_a_lopsided_router(method, options):
    start, off = _train_router(method, 0.0, **options)
    _, on = _train_router(method, 1.0, **options)
    assert start.max() > 0.6  # most inputs go to expert 0 at the start
    assert on.max() < off.max() - 0.1, (on, off)


def test_no_balance_loss_when_the_router_does_not_train():
    case = MODEL_CASES["bert_cls"]
    spec = get_method("modula")
    layer = spec.layer_cls(
        torch.nn.Linear(8, 8), LayerSpec("x", r=2, alpha=4.0, options=spec.parse_options({}))
    ).train()
    layer(torch.randn(3, 8))  # universal stage: no router in the forward
    assert layer.regularization_loss() is None
    layer.set_stage("router")
    with torch.no_grad():
        layer(torch.randn(3, 8))
    assert layer.regularization_loss() is None  # no graph, nothing to learn
    with pytest.raises(AdapterError, match="balance_coef must be"):
        from cotune.peft import inject_adapters

        inject_adapters(case.build(), peft_cfg("mosld", case, options={"balance_coef": -1}))
