"""Lossy wire codecs for activations and gradients: ``int8`` and ``topk<fraction>``.

Both touch floating tensors only (ids, masks, labels travel as is) and refuse NaN/inf: a split
server must reject such activations, and neither format can carry them faithfully anyway.

``int8`` — symmetric per-channel quantization. The channel is the **last** dimension: for
activations ``[B, T, D]`` (and their gradients) that is the hidden feature, whose outliers are
consistent across tokens, so one fp32 scale per feature isolates them at a cost of ``4·D`` bytes.
``scale_c = max|x[..., c]| / 127``, ``q = round(x / scale_c)`` in ``[-127, 127]``; an all-zero
channel gets scale 0 and decodes to exact zeros. Error: ``|x - x̂| <= max|x[..., c]| / 254``
per element (half a quantization step), i.e. ``rel_error_bound`` relative to the channel's max.

``topk<fraction>`` — keep the ``ceil(fraction · n)`` largest-magnitude elements. Indices are flat
int32 (int64 only past 2^31 elements); values are fp16 after dividing by their max magnitude,
whose fp32 value travels in the side data, so nothing overflows fp16 and tiny gradients keep
full relative precision down to ``max · 2^-14``. Kept values: relative error ``<= 2^-11`` (fp16
rounding); dropped values decode to 0 and are no larger in magnitude than the smallest kept one.
"""

from __future__ import annotations

import math

import torch

from cotune.runtime.codecs import (
    Codec,
    Parts,
    Side,
    register_codec,
    register_codec_family,
    reject_nonfinite,
)

_FP16_REL = 2.0**-11  # fp16 unit roundoff (10 mantissa bits)
_FP16_MIN_NORMAL = 2.0**-14
DEFAULT_TOPK_FRACTION = 0.1
TOPK_FORMS = (
    "topk (= topk0.1), topk<fraction> or topk:<fraction> with 0 < fraction <= 1, e.g. topk0.05"
)


def _out_rounding(dtype: torch.dtype, ref: torch.Tensor) -> torch.Tensor:
    """Error added by storing the decoded fp32 value back in ``dtype`` (0 for fp32/fp64)."""
    if dtype in (torch.float32, torch.float64):
        return torch.zeros_like(ref)
    return torch.finfo(dtype).eps * ref


def _channels(shape: tuple[int, ...] | torch.Size) -> int:
    return int(shape[-1]) if len(shape) else 1  # a 0-d tensor is one channel of one value


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, channels]`` (explicit sizes: ``-1`` is ambiguous with 0 channels)."""
    return x.reshape(math.prod(x.shape[:-1]), _channels(x.shape))


class Int8Codec(Codec):
    """Symmetric int8 with one fp32 scale per channel along the last dimension."""

    name = "int8"
    part_names = ("q", "scale")
    #: Relative to the channel's max magnitude, not to each element: half a step of 127 levels.
    rel_error_bound = 1.0 / 254

    def encode(self, tensor: torch.Tensor) -> tuple[Parts, Side]:
        reject_nonfinite(self.name, tensor)
        x = tensor.to(torch.float32)
        reject_nonfinite(self.name, x)  # float64 beyond the fp32 range
        c = _channels(x.shape)
        rows = _rows(x)
        amax = rows.abs().amax(0) if rows.shape[0] else torch.zeros(c)
        scale = amax / 127
        # Zero channels: divide by 1 instead of 0; their q is 0 and decodes to exactly 0.
        q = torch.round(rows / torch.where(scale > 0, scale, 1.0)).clamp_(-127, 127)
        return {"q": q.to(torch.int8).reshape(x.shape), "scale": scale}, {}

    def decode(
        self, parts: Parts, side: Side, dtype: torch.dtype, shape: tuple[int, ...]
    ) -> torch.Tensor:
        q, scale = parts["q"], parts["scale"]
        c = _channels(shape)
        if q.dtype != torch.int8 or tuple(q.shape) != tuple(shape):
            raise ValueError(f"q is {q.dtype}{list(q.shape)}, expected int8{list(shape)}")
        if scale.dtype != torch.float32 or tuple(scale.shape) != (c,):
            raise ValueError(f"scale is {scale.dtype}{list(scale.shape)}, expected float32[{c}]")
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise ValueError("scales must be finite and non-negative")
        return (_rows(q.to(torch.float32)) * scale).reshape(shape).to(dtype)

    def abs_error_bound(self, tensor: torch.Tensor) -> torch.Tensor:
        x = tensor.detach().to(torch.float64)
        c = _channels(x.shape)
        rows = _rows(x)
        amax = rows.abs().amax(0) if rows.shape[0] else torch.zeros(c, dtype=x.dtype)
        # Half a step, plus fp32 rounding of x/scale and q*scale (a few ulps of the channel max).
        bound = (amax * (self.rel_error_bound + 2.0**-21)).expand_as(rows).reshape(x.shape)
        return bound + _out_rounding(tensor.dtype, x.abs())


class TopKCodec(Codec):
    """The ``ceil(fraction · n)`` largest-magnitude elements, as int32 flat indices + fp16 values."""

    rel_error_bound = _FP16_REL  # on kept values; dropped ones are zeroed
    part_names = ("idx", "val")
    side_keys = ("k", "scale")

    def __init__(self, fraction: float) -> None:
        if not (isinstance(fraction, float | int) and 0 < fraction <= 1):
            raise ValueError(f"the fraction must be a number in (0, 1], got {fraction!r}")
        self.fraction = float(fraction)
        self.name = f"topk{self.fraction!r}"  # repr round-trips, so the name is canonical

    @classmethod
    def from_arg(cls, arg: str | None) -> TopKCodec:
        """Factory for the ``topk`` family: ``None`` → the default fraction, else a number."""
        if arg is None:
            return cls(DEFAULT_TOPK_FRACTION)
        try:
            if arg != arg.strip():
                raise ValueError
            fraction = float(arg)
        except ValueError:
            raise ValueError(f"{arg!r} is not a number") from None
        if not math.isfinite(fraction):
            raise ValueError(f"{arg!r} is not a finite number")
        return cls(fraction)

    def k_for(self, numel: int) -> int:
        """How many elements travel for a tensor of ``numel`` elements (at least one if any)."""
        return 0 if numel == 0 else min(numel, max(1, math.ceil(self.fraction * numel)))

    def _select(self, flat: torch.Tensor) -> torch.Tensor:
        k = self.k_for(flat.numel())
        if k == flat.numel():
            return torch.arange(k)
        idx = torch.topk(flat.abs(), k, sorted=False).indices
        return idx.sort().values  # ascending: deterministic layout, friendlier to compression

    def encode(self, tensor: torch.Tensor) -> tuple[Parts, Side]:
        reject_nonfinite(self.name, tensor)
        flat = tensor.reshape(-1)
        idx = self._select(flat)
        vals = flat[idx].to(torch.float32)
        reject_nonfinite(self.name, vals)  # float64 beyond the fp32 range
        scale = float(vals.abs().max()) if vals.numel() else 0.0
        # Normalising by the max keeps every value inside fp16's range: no overflow, and values
        # down to max·2^-14 stay normal numbers with full relative precision.
        val = (vals / scale if scale > 0 else vals).to(torch.float16)
        idx_dtype = torch.int32 if flat.numel() <= torch.iinfo(torch.int32).max else torch.int64
        return {"idx": idx.to(idx_dtype), "val": val}, {"k": int(idx.numel()), "scale": scale}

    def decode(
        self, parts: Parts, side: Side, dtype: torch.dtype, shape: tuple[int, ...]
    ) -> torch.Tensor:
        idx, val = parts["idx"], parts["val"]
        k, scale = side["k"], side["scale"]
        n = math.prod(shape)
        if idx.dtype not in (torch.int32, torch.int64) or val.dtype != torch.float16:
            raise ValueError(f"idx/val are {idx.dtype}/{val.dtype}, expected int32|int64/float16")
        if not isinstance(k, int) or isinstance(k, bool) or k != self.k_for(n):
            raise ValueError(f"k={k!r}, but {self.name} keeps {self.k_for(n)} of {n} elements")
        if not (idx.dim() == val.dim() == 1 and idx.numel() == val.numel() == k <= n):
            raise ValueError(f"{idx.numel()} indices and {val.numel()} values for k={k}, n={n}")
        if isinstance(scale, bool) or not (
            isinstance(scale, float | int) and math.isfinite(scale) and scale >= 0
        ):
            raise ValueError(f"scale {scale!r} must be a finite non-negative number")
        if k and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"indices outside [0, {n})")
        if k > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError("indices must be strictly increasing (as the encoder writes them)")
        out = torch.zeros(n, dtype=torch.float32)
        out[idx.long()] = val.to(torch.float32) * scale
        return out.reshape(shape).to(dtype)

    def abs_error_bound(self, tensor: torch.Tensor) -> torch.Tensor:
        x = tensor.detach().reshape(-1).to(torch.float64)
        bound = x.abs().clone()  # a dropped element's error is its own magnitude
        idx = self._select(tensor.detach().reshape(-1))
        if idx.numel():
            kept = x[idx].abs()
            scale = float(kept.max())
            # fp16 rounding: relative for normal numbers, absolute (half a subnormal step) below.
            slack = 1 + 2.0**-10
            bound[idx] = torch.maximum(kept * _FP16_REL, kept.new_tensor(scale * 2.0**-25)) * slack
        return bound.reshape(tensor.shape) + _out_rounding(tensor.dtype, tensor.abs().double())


register_codec(Int8Codec())
register_codec_family("topk", TopKCodec.from_arg, TOPK_FORMS)
