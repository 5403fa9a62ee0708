"""The frozen base quantized with bitsandbytes (``model.quantize``), QLoRA-style.

Every ``nn.Linear`` (and GPT-2 ``Conv1D``) inside the transformer blocks becomes a
bitsandbytes ``Linear8bitLt`` (LLM.int8) or ``Linear4bit`` (NF4 / FP4, double-quantized
statistics); embeddings, norms and the task head stay as they are. The weights are quantized
when the model moves to its node's device (bitsandbytes quantizes on ``.to``). Adapters wrap the
quantized layers and keep their own weights and math in float32 (or the autocast dtype):
``forward`` is ``base(x) + delta(x)`` as for any base. Methods that read the base weight (DoRA's
norm, an SVD init) see it dequantized; methods that rewrite it (PiSSA, KaSA, merging) refuse.

bitsandbytes runs on CUDA and, through its portable kernels, on the CPU (slow, but the same
numbers, so a simulation on a laptop sees what 4-bit rounding does to accuracy). Apple's MPS is
not supported: a clear error. The stored bytes (packed weights plus their quantization
statistics) are what ``stored_bytes`` counts, so the simulator's memory estimate is honest.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from cotune.errors import ConfigError
from cotune.peft.base import QUANTIZED_PARAMS


def bitsandbytes() -> Any:
    """The ``bitsandbytes`` module, or a ConfigError saying how to get it."""
    try:
        # Its CPU backend logs a warning when the optional fused `kernels` package is missing;
        # the portable path it falls back to is what cotune uses on a CPU, so keep it quiet.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(
            "model.quantize needs bitsandbytes: pip install 'cotune[quant]' "
            "(or pip install bitsandbytes)"
        ) from None
    return bnb


def check_quantize(mode: str, device: torch.device) -> None:
    """Before loading: the mode can run on ``device`` (a node's) and its library is present."""
    if mode == "none":
        return
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(
            f"model.quantize: {mode} runs on cuda or cpu (bitsandbytes), not on {device}; "
            "use model.quantize: none there"
        )
    bitsandbytes()


def is_quantized(layer: nn.Module) -> bool:
    weight = getattr(layer, "weight", None)
    return type(weight).__name__ in QUANTIZED_PARAMS


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """A quantized layer's weight as a dense ``[out, in]`` float tensor (a fresh tensor)."""
    bnb = bitsandbytes()
    w = layer.weight
    if type(w).__name__ == "Params4bit":
        return bnb.functional.dequantize_4bit(w.data, w.quant_state)
    scb = getattr(w, "SCB", None)
    if scb is None:
        scb = layer.state.SCB
    return bnb.functional.int8_vectorwise_dequant(w.data, scb)


def quantize_base(
    model: nn.Module, block_paths: list[str], mode: str, compute_dtype: torch.dtype
) -> int:
    """Swap every linear layer under ``block_paths`` for its bitsandbytes counterpart (weights
    still unquantized: ``model.to(device)`` quantizes them). Returns how many were swapped."""
    if mode == "none":
        return 0
    bnb = bitsandbytes()
    swapped = 0
    for block_path in block_paths:
        block = model.get_submodule(block_path)
        for name, layer in list(block.named_modules()):
            if not name or not _linear_like(layer) or layer.weight.is_meta:
                continue  # (a partially loaded node does not hold meta layers: nothing to do)
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, child, _quantized(bnb, layer, mode, compute_dtype))
            swapped += 1
    return swapped


def _linear_like(layer: nn.Module) -> bool:
    if is_quantized(layer):
        return False
    if isinstance(layer, nn.Linear):
        return True
    return type(layer).__name__ == "Conv1D" and getattr(layer, "weight", None) is not None


def _quantized(bnb: Any, layer: nn.Module, mode: str, compute_dtype: torch.dtype) -> nn.Module:
    weight = layer.weight.detach()
    if not isinstance(layer, nn.Linear):  # GPT-2 Conv1D keeps [in, out]: make it [out, in]
        weight = weight.t().contiguous()
    out_f, in_f = weight.shape
    bias = layer.bias is not None
    if mode == "int8":
        q = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias, has_fp16_weights=False, threshold=6.0)
        q.weight = bnb.nn.Int8Params(
            weight.to(torch.float16), requires_grad=False, has_fp16_weights=False
        )
    else:
        q = bnb.nn.Linear4bit(
            in_f, out_f, bias=bias, compute_dtype=compute_dtype, quant_type=mode,
            compress_statistics=True,
        )  # fmt: skip
        q.weight = bnb.nn.Params4bit(
            weight.to(compute_dtype), requires_grad=False, quant_type=mode,
            compress_statistics=True,
        )  # fmt: skip
        # On a CPU with AVX512-BF16, an eval-mode forward whose input needs no gradient (an
        # evaluation, the first block's projections) repacks the weight for an inference
        # kernel for good; that kernel has no backward, so every later training step would
        # silently lose the gradient through this frozen layer (bitsandbytes 0.50). cotune's
        # base is always in eval mode and trains through it: keep the differentiable path.
        q.support_avx512bf16_for_cpu = False
    if bias:
        q.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    q.train(layer.training)
    return q


def stored_bytes(p: torch.Tensor, owner: nn.Module | None = None) -> int:
    """Bytes a parameter occupies: its (packed) data plus a quantized weight's statistics
    (LLM.int8 moves its row scales from the weight to ``owner.state`` at the first forward)."""
    n = p.numel() * p.element_size()
    state = getattr(p, "quant_state", None)
    if state is not None:  # 4-bit: absmax per block (itself quantized, with its own absmax)
        n += _tensor_bytes(state.absmax)
        nested = getattr(state, "state2", None)
        if nested is not None:
            n += _tensor_bytes(nested.absmax) + _tensor_bytes(nested.code)
    scb = getattr(p, "SCB", None)
    if scb is None and owner is not None and type(p).__name__ == "Int8Params":
        scb = getattr(getattr(owner, "state", None), "SCB", None)
    if isinstance(scb, torch.Tensor):  # int8: one scale per row
        n += _tensor_bytes(scb)
    return n


def parameter_bytes(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """Every parameter of ``model`` with its ``stored_bytes`` (meta ones: not held, 0)."""
    out, seen = [], set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) not in seen:  # tied weights (an lm_head sharing the embeddings) count once
                seen.add(id(p))
                out.append((p, 0 if p.device.type == "meta" else stored_bytes(p, module)))
    return out


def _tensor_bytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
