"""The adapter layer interface every PEFT method implements, and the method registry.

A method is one `AdapterLayer` subclass (plus an optional options dataclass) registered under a
name. The layer owns its frozen `base_layer`, so a paradigm can run the base product and the
adapter branch (`delta`) in different places (DLoRA: base in the cloud, delta on the device).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from cotune.errors import AdapterError
from cotune.models.packing import group_sizes

# bitsandbytes' quantized parameter types (duck-typed: bitsandbytes is optional).
QUANTIZED_PARAMS = ("Params4bit", "Int8Params")


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's fused `Conv1D` (weight stored [in, out]); duck-typed to avoid importing transformers."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and weight is not None
        and weight.dim() == 2
    )


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of a linear layer, also when its weight is stored packed (bitsandbytes)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    w = module.weight  # GPT-2 Conv1D: [in, out]
    return int(w.shape[0]), int(w.shape[1])


def is_adaptable(module: nn.Module) -> bool:
    """Layer types an adapter can wrap: `nn.Linear` and GPT-2 `Conv1D`."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


@dataclass(frozen=True)
class LayerSpec:
    """Everything a method needs to build one adapted layer (per-layer r/alpha already resolved)."""

    path: str
    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    options: Any = None  # instance of the method's options dataclass, or None


class AdapterLayer(nn.Module):
    """Wraps one linear layer: `forward(x) = base_layer(x) + delta(x)` (only the base once merged).

    Subclasses implement `delta` and `delta_weight`; they may override `merged_weight` /
    `unmerged_weight` (e.g. DoRA's magnitude), `regularization_loss` (KaSA, GeLoRA), set
    `mergeable = False` (MoE-style adapters), or initialise from the base weight in `__init__`
    (PiSSA). Every parameter/buffer outside `base_layer` is adapter state and gets saved.
    """

    method: ClassVar[str] = ""
    mergeable: ClassVar[bool] = True
    # PEFT's peft_type for saving; None means the method has no PEFT equivalent (save refuses).
    # A type PEFT does not know (e.g. "COTUNE_BORA") is a cotune-own format in PEFT's layout:
    # cotune saves and loads it, stock PEFT refuses it (unknown peft_type).
    peft_type: ClassVar[str | None] = "LORA"
    # PEFT config field that marks this variant (e.g. "use_dora", "kasa_config"); None for the plain method.
    peft_variant: ClassVar[str | None] = None
    # The saved file's rank relative to the layer's (2 for PiSSA's rank-2r plain-LoRA export).
    peft_rank_factor: ClassVar[int] = 1

    def __init__(self, base_layer: nn.Module, spec: LayerSpec) -> None:
        if not is_adaptable(base_layer):
            raise AdapterError(
                f"{spec.path}: cannot adapt a {type(base_layer).__name__}; only nn.Linear and GPT-2 Conv1D are supported"
            )
        super().__init__()
        self.base_layer = base_layer
        self.spec = spec
        self.path = spec.path
        # Conv1D stores [in, out]; PEFT calls this fan_in_fan_out.
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.in_features, self.out_features = in_out_features(base_layer)
        self.merged = False
        # Set by `cotune.peft.grouped.row_groups`: (rows per group, adapter tensors per group).
        self.row_groups: tuple[list[int], list[Mapping[str, torch.Tensor]]] | None = None

    # ---- the method's part -------------------------------------------------------------
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter branch's contribution to the output, same leading shape as `x`."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The weight update as an `[out, in]` tensor (independent of Conv1D's layout)."""
        raise NotImplementedError

    def regularization_loss(self) -> torch.Tensor | None:
        """Extra training loss of this layer (None: the method has none)."""
        return None

    def set_trainable(self) -> None:
        """Mark the adapter parameters trainable (called by injection); staged methods (MoDULA) override."""
        for _, p in self.adapter_named_parameters():
            p.requires_grad_(True)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Base weight `[out, in]` after merging; override for non-additive methods."""
        return weight + self.delta_weight().to(weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of `merged_weight`."""
        return weight - self.delta_weight().to(weight.dtype)

    @classmethod
    def peft_config_fields(cls, options: Any) -> dict[str, Any]:
        """Method-specific fields for PEFT's adapter_config.json (e.g. use_dora, kasa_config)."""
        return {}

    @classmethod
    def options_from_peft(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """Inverse of `peft_config_fields`: cotune options from a PEFT adapter_config.json."""
        return {}

    @classmethod
    def peft_claims(cls, config: Mapping[str, Any]) -> bool:
        """Whether a PEFT adapter_config.json of this `peft_type` is this variant (default: `peft_variant` set)."""
        return cls.peft_variant is not None and bool(config.get(cls.peft_variant))

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors to write to a PEFT file, by local name (default: the adapter state as it is)."""
        return self.adapter_tensors()

    def peft_rank_scale(self) -> int:
        """This layer's saved rank over its spec's r (1; LoRA's fused form: its parts)."""
        return 1

    @classmethod
    def peft_tensor_name(cls, name: str) -> str:
        """Local tensor name (`lora_A.weight`) as PEFT spells it on disk; DoRA-like methods rename."""
        return name

    @classmethod
    def tensor_name_from_peft(cls, name: str) -> str:
        """Inverse of `peft_tensor_name`."""
        return name

    # ---- shared machinery --------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The base weight (lets HF code that peeks at `.weight` keep working)."""
        return self.base_layer.weight

    @property
    def base_quantized(self) -> bool:
        """The base layer holds a bitsandbytes-quantized weight (uint8 storage)."""
        return type(self.base_layer.weight).__name__ in QUANTIZED_PARAMS

    def base_weight_oi(self) -> torch.Tensor:
        """The base weight as `[out, in]` (a view for Conv1D; dequantized for a quantized base)."""
        w = self.base_layer.weight
        if self.base_quantized:
            from cotune.accel.quantize import dense_weight

            return dense_weight(self.base_layer)
        return w.t() if self.fan_in_fan_out else w

    def base_output_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the base layer answers ``x`` in: its weight's, or for a quantized layer
        (uint8 storage) its input's, as bitsandbytes returns."""
        return x.dtype if self.base_quantized else self.base_layer.weight.dtype

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_groups is not None:
            return self._grouped_forward(x, *self.row_groups)
        return self.adapted_forward(x)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapted layer's output; methods that are not "base + delta" (DoRA, BoRA) override."""
        y = self.base_forward(x)
        if self.merged:
            return y
        # In place: the base product is not saved for backward, and this skips one [B,T,out] buffer
        # (not when the base returns a view, as bitsandbytes' 4-bit matmul does).
        d = self.delta(x).to(y.dtype)
        return y + d if y._is_view() else y.add_(d)

    def grouped_delta(
        self, x: torch.Tensor, rows: list[int], tensors: list[Mapping[str, torch.Tensor]]
    ) -> torch.Tensor | None:
        """Every group's ``delta`` at once (a method's batched form), or None: per group."""
        return None

    def _grouped_forward(
        self, x: torch.Tensor, rows: list[int], tensors: list[Mapping[str, torch.Tensor]]
    ) -> torch.Tensor:
        """Rows ``rows[i]`` of ``x`` run through adapter tensors ``tensors[i]`` (one batched base
        product for additive methods; per group otherwise). See ``cotune.peft.grouped``."""
        from cotune.peft.grouped import bind_tensors

        rows = group_sizes(x, rows)  # a padding-free block's tokens: each group's token count
        additive = type(self).adapted_forward is AdapterLayer.adapted_forward
        y = self.base_forward(x) if additive else None
        out = self.grouped_delta(x, rows, tensors) if additive else None
        if out is None:
            parts = []
            for xs, own in zip(x.split(rows), tensors):
                with bind_tensors(self, own):
                    parts.append(self.delta(xs) if additive else self.adapted_forward(xs))
            out = torch.cat(parts)
        if y is None:
            return out
        return y + out.to(y.dtype) if y._is_view() else y.add_(out.to(y.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        if not self.mergeable:
            raise AdapterError(
                f"{self.path}: method {self.method!r} cannot be merged into the base weight"
            )
        if self.merged:
            return
        self._write_base(self.merged_weight(self.base_weight_oi().detach().clone()))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self._write_base(self.unmerged_weight(self.base_weight_oi().detach().clone()))
        self.merged = False

    def _write_base(self, weight_oi: torch.Tensor) -> None:
        if self.base_quantized:
            raise AdapterError(
                f"{self.path}: {self.method} rewrites the base weight (an SVD init or a merge), "
                "which a quantized base cannot take; use model.quantize: none"
            )
        self.base_layer.weight.data.copy_(weight_oi.t() if self.fan_in_fan_out else weight_oi)

    def adapter_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters owned by the adapter (everything outside `base_layer`), with local names."""
        for name, p in self.named_parameters():
            if not name.startswith("base_layer."):
                yield name, p

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """All adapter state to save: parameters and persistent buffers outside `base_layer`."""
        return {
            k: v
            for k, v in self.state_dict(keep_vars=True).items()
            if not k.startswith("base_layer.")
        }

    def extra_repr(self) -> str:
        return f"method={self.method}, in={self.in_features}, out={self.out_features}, merged={self.merged}"


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its layer class and options dataclass."""

    name: str
    layer_cls: type[AdapterLayer]
    options_cls: type | None = None

    def option_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.options_cls)] if self.options_cls else []

    def parse_options(self, options: Mapping[str, Any]) -> Any:
        """Validate `PeftSection.options` into the options dataclass (defaults when empty)."""
        known = self.option_names()
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise AdapterError(
                f"peft.options: unknown option(s) {unknown} for method {self.name!r}; "
                f"known options: {known or 'none (this method takes no options)'}"
            )
        if self.options_cls is None:
            return None
        try:
            return self.options_cls(**dict(options))
        except (TypeError, ValueError) as e:
            raise AdapterError(f"peft.options for method {self.name!r}: {e}") from e


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    name: str, layer_cls: type[AdapterLayer], options_cls: type | None = None
) -> None:
    """Register a method; `options_cls` is a dataclass whose fields are the allowed `options` keys."""
    if not (isinstance(layer_cls, type) and issubclass(layer_cls, AdapterLayer)):
        raise AdapterError(
            f"register_method({name!r}): {layer_cls!r} is not an AdapterLayer subclass"
        )
    if options_cls is not None and not dataclasses.is_dataclass(options_cls):
        raise AdapterError(f"register_method({name!r}): options_cls must be a dataclass")
    if name in _REGISTRY and _REGISTRY[name].layer_cls is not layer_cls:
        raise AdapterError(
            f"method {name!r} is already registered to {_REGISTRY[name].layer_cls.__name__}"
        )
    layer_cls.method = name
    _REGISTRY[name] = MethodSpec(name, layer_cls, options_cls)


def get_method(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise AdapterError(
            f"unknown PEFT method {name!r}; available methods: {available_methods()}"
        ) from None


def available_methods() -> list[str]:
    return sorted(_REGISTRY)
