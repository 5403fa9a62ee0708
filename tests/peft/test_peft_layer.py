"""The AdapterLayer contract on single layers, and the method registry."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from cotune.errors import AdapterError
from cotune.peft import AdapterLayer, LayerSpec, get_method, register_method
from cotune.peft.base import MethodSpec


def _conv1d(nx: int, nf: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(nf, nx)  # weight [nx=in, nf=out]
    nn.init.normal_(layer.weight, std=0.1)
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_delta_matches_delta_weight(kind, rslora):
    torch.manual_seed(0)
    base = nn.Linear(12, 20) if kind == "linear" else _conv1d(12, 20)
    spec = LayerSpec(
        "x", r=4, alpha=6.0, use_rslora=rslora, options=get_method("lora").parse_options({})
    )
    layer = get_method("lora").layer_cls(base, spec)
    assert (layer.in_features, layer.out_features) == (12, 20)
    assert layer.fan_in_fan_out == (kind == "conv1d")
    assert layer.scaling == pytest.approx(6 / 2 if rslora else 6 / 4)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 12)
    dw = layer.delta_weight()
    assert dw.shape == (20, 12)
    torch.testing.assert_close(layer.delta(x), x @ dw.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), base(x) + x @ dw.T, atol=1e-5, rtol=1e-5)
    w0 = base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)  # merged: just the base
    torch.testing.assert_close(layer.base_weight_oi(), (w0.T if kind == "conv1d" else w0) + dw)
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=0)


def test_lora_dropout_only_in_training():
    base = nn.Linear(8, 8)
    layer = get_method("lora").layer_cls(base, LayerSpec("x", r=2, alpha=2.0, dropout=0.5))
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 8)
    layer.eval()
    torch.testing.assert_close(layer.delta(x), layer.delta(x))
    layer.train()
    torch.manual_seed(0)
    assert not torch.allclose(layer.delta(x), x @ layer.delta_weight().T)


def test_non_linear_base_is_rejected():
    with pytest.raises(AdapterError, match="cannot adapt a Embedding"):
        get_method("lora").layer_cls(nn.Embedding(4, 4), LayerSpec("emb", r=2, alpha=2.0))


def test_registry_accepts_a_new_method_with_options(monkeypatch):
    """The shape a later method takes: a layer class, an options dataclass, one register call."""
    from cotune.peft import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # keep the global registry clean

    @dataclasses.dataclass(frozen=True)
    class ScaleOptions:
        gamma: float = 1.0

    class ScaleLayer(AdapterLayer):  # delta = gamma * s * x W^T, with a trainable scalar s
        peft_type = None
        mergeable = False

        def __init__(self, base_layer: nn.Module, spec: LayerSpec) -> None:
            super().__init__(base_layer, spec)
            self.s = nn.Parameter(torch.zeros(()))
            self.gamma = spec.options.gamma

        def delta(self, x: torch.Tensor) -> torch.Tensor:
            return self.gamma * self.s * nn.functional.linear(x, self.base_weight_oi())

        def delta_weight(self) -> torch.Tensor:
            return self.gamma * self.s * self.base_weight_oi()

        def regularization_loss(self) -> torch.Tensor:
            return self.s**2

    register_method("test_scale", ScaleLayer, ScaleOptions)
    spec = get_method("test_scale")
    assert isinstance(spec, MethodSpec) and spec.option_names() == ["gamma"]
    assert spec.parse_options({"gamma": 2.0}) == ScaleOptions(2.0)
    with pytest.raises(AdapterError, match=r"known options: \['gamma'\]"):
        spec.parse_options({"beta": 1})
    layer = ScaleLayer(nn.Linear(4, 4), LayerSpec("x", r=1, alpha=1.0, options=ScaleOptions(2.0)))
    assert layer.regularization_loss() == 0
    with pytest.raises(AdapterError, match="cannot be merged"):
        layer.merge()
    with pytest.raises(AdapterError, match="already registered"):
        register_method("test_scale", get_method("lora").layer_cls)
    with pytest.raises(AdapterError, match="not an AdapterLayer"):
        register_method("bad", nn.Linear)  # type: ignore[arg-type]
