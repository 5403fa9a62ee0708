"""Parameter-efficient adapters: method registry, injection, and PEFT-format save/load."""

from cotune.peft.base import (
    AdapterLayer,
    LayerSpec,
    MethodSpec,
    available_methods,
    get_method,
    register_method,
)
from cotune.peft.inject import AdapterSet, inject_adapters
from cotune.peft.lora import LoraLayer, LoraOptions
from cotune.peft.peft_format import load_adapter, save_adapter

# The method registry: one line per method.
register_method("lora", LoraLayer, LoraOptions)

__all__ = [
    "AdapterLayer",
    "AdapterSet",
    "LayerSpec",
    "LoraLayer",
    "LoraOptions",
    "MethodSpec",
    "available_methods",
    "get_method",
    "inject_adapters",
    "load_adapter",
    "register_method",
    "save_adapter",
]
